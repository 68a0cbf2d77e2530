"""How closely Keras reproduces a trained workdir's model, on all 10,000 test images.

  python benchmarks/keras_parity.py --workdir=workdir/base [--idx_dir=../shared/data/mnist]

Restores the workdir's latest checkpoint in Flax, loads its exported keras_cnn.h5 with Keras 3
and with tf-keras 2 (each if installed), and prints the max absolute difference of the class
probabilities, how many argmaxes agree, and each accuracy.
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--config', default=str(ROOT / 'configs' / 'base.py'))
  parser.add_argument('--idx_dir', default=str(ROOT.parent / 'shared' / 'data' / 'mnist'))
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location('parity_config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from flax_mnist import modes, plan as plan_lib
  from flax_mnist.data import idx
  from flax_mnist.keras import export as keras_export
  config = module.get_config()
  restored = modes.restore(config, plan_lib.decide(config), args.workdir, 'latest')
  meta = restored.meta
  images, labels = idx.read_split(args.idx_dir, 'test')
  images = images.astype(np.float32) / 255.0
  flax_probs = modes.classify(restored.model(), images)
  print(f"Flax, epoch {meta['epoch'] if meta else '?'}: accuracy "
        f'{(flax_probs.argmax(1) == labels).mean():.4f}')
  for name in ('keras', 'tf_keras'):
    try:
      keras = importlib.import_module(name)
    except ImportError:
      print(f'{name}: not installed')
      continue
    model = keras.models.load_model(str(Path(args.workdir) / keras_export.EXPORT_NAME))
    probs = model.predict(images.reshape(-1, 784), batch_size=1000, verbose=0)
    print(f'{name} {keras.__version__}: max abs difference {np.abs(probs - flax_probs).max():.3g}'
          f', argmax equal on {int((probs.argmax(1) == flax_probs.argmax(1)).sum())}/'
          f'{len(labels)}, accuracy {(probs.argmax(1) == labels).mean():.4f}')


if __name__ == '__main__':
  main()
