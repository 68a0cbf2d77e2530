"""flax_mnist on a GPU/TPU: whole training runs, and the train step against PyTorch there.

  python benchmarks/accelerator.py --idx_dir=DIR                 # runs + throughput table
  python benchmarks/accelerator.py --idx_dir=DIR --runs=base_bf16 --no_torch

Runs: the real training loop (flax_mnist.loop.train_and_evaluate: device-resident data, one
lax.scan per epoch, validation, checkpoint and metrics every epoch) of a named config; reports
compile time, training time after compile (the sum of the epochs' train passes), wall time of
the whole call and the final val_accuracy. Throughput: samples/s of whole epochs (55,000
images, batch 500, shuffled on the device) of flax_mnist and of the same model in PyTorch on
the same device, eager and torch.compile, float32 and bfloat16; warm-up excluded, median of
--repeats epochs.

Where TensorFlow is not installed (bare accelerator images), the splits are read straight from
the IDX files in --idx_dir, in file order. tfds stores the same examples hash-shuffled, so its
train[:55000] is another 55,000 of the 60,000 training images; the test split is the same
10,000 images (tests/test_benchmarks.py). Figures are comparable, not bit-identical.
"""

import argparse
import contextlib
import importlib.util
import io
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

RUNS = {'base': ('configs/base.py', {}),
        'base_bf16': ('configs/base.py', {'dtype': 'bfloat16'}),
        'k5_nodropout': ('configs/k5_nodropout.py', {})}


def load_config(path: str, overrides: dict):
  spec = importlib.util.spec_from_file_location('bench_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(overrides)
  return config


def read_idx_splits_if_no_tensorflow(idx_dir: str) -> str:
  """Makes tfds_source.load_split read IDX files when TensorFlow is missing; says which."""
  from flax_mnist.data import batches, idx, tfds_source
  if importlib.util.find_spec('tensorflow') is not None:
    return 'tfds (offline preparation from the IDX files)'

  def load_split(config, split):
    match = re.fullmatch(r'(train|test)(?:\[:(\d+)\])?', split)
    if match is None:
      raise SystemExit(f'split {split!r}: without TensorFlow only train[:N] and test are read')
    images, labels = idx.read_split(idx_dir, match[1])
    count = int(match[2]) if match[2] else len(labels)
    return batches.Split(images[:count, ..., None], labels[:count].astype(np.int32))
  tfds_source.load_split = load_split
  return ('IDX files read directly, in file order (TensorFlow is not installed here; '
          "train[:N] is the file's first N)")


def full_run(name: str, idx_dir: str, epochs: int = 0) -> dict:
  """One whole training run of RUNS[name] in a fresh workdir; returns its figures."""
  from flax_mnist import loop
  path, overrides = RUNS[name]
  config = load_config(path, dict(overrides, idx_dir=idx_dir, progress_bar=False))
  config.num_epochs = epochs or config.num_epochs
  out = io.StringIO()
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
      history = loop.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
  print(out.getvalue(), flush=True)
  num_samples = int(re.search(r'Train on (\d+) samples', out.getvalue())[1])
  train_seconds = sum(num_samples / row['samples_per_second'] for row in history)
  return dict(run=name, compile=float(re.search(r'Compiled in ([\d.]+)s', out.getvalue())[1]),
              train=train_seconds, wall=wall, epochs=len(history),
              val_accuracy=history[-1]['val_accuracy'])


def kernel_config_and_split(kernel: str, idx_dir: str, **overrides):
  """The benchmark config of kernel size `kernel` ('3': base, '5': k5_nodropout) and its
  training split."""
  from flax_mnist.data import tfds_source
  path, config_overrides = RUNS['base' if kernel == '3' else 'k5_nodropout']
  config = load_config(path, dict(config_overrides, idx_dir=idx_dir, **overrides))
  return config, tfds_source.load_split(config, config.train_split)


def device_epoch_rate(dtype: str, kernel: str, repeats: int, idx_dir: str) -> float:
  """flax_mnist: samples/s of whole device-resident epochs (the training loop's own path)."""
  import jax
  from flax_mnist import epochs, plan as plan_lib, sharding, steps
  from flax_mnist.reporting import console
  config, split = kernel_config_and_split(kernel, idx_dir, dtype=dtype, device_data='on')
  plan = plan_lib.make(config, jax.default_backend(), jax.device_count())
  mesh = sharding.make_mesh()
  graphdef, state, tx = steps.create(config, plan)
  state = jax.device_put(state, sharding.replicated(mesh))
  engine = epochs.build(graphdef, tx, state, mesh, plan, config, split)  # DeviceResident.
  progress = epochs.Progress(console.ProgressBar(1, enabled=False))  # Nothing drawn.

  def epoch(state, number):
    """One epoch, its sums read to the host (which waits for the device)."""
    state, sums = engine.run(state, number, progress)
    sums.means()
    return state
  state = epoch(state, 1)  # Warm-up.
  rates = []
  for number in range(2, repeats + 2):
    start = time.perf_counter()
    state = epoch(state, number)
    rates.append(len(split) // config.batch_size * config.batch_size
                 / (time.perf_counter() - start))
  return statistics.median(rates)


def torch_epoch_rate(dtype: str, kernel: str, repeats: int, idx_dir: str,
                     compiled: bool) -> float:
  """PyTorch on the same device: the seed model, data on the device, shuffled each epoch."""
  import peers
  import torch
  config, split = kernel_config_and_split(kernel, idx_dir)
  device = 'cuda'
  # JAX computes float32 matmuls and convolutions with TF32 on such GPUs by default; so does
  # PyTorch for convolutions, and with this for matmuls too.
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.manual_seed(config.seed)
  model = peers._torch_model(config).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                               betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
  images = torch.from_numpy(split.images.reshape(-1, 1, 28, 28).copy()).to(device)
  labels = torch.from_numpy(split.labels.astype(np.int64)).to(device)
  autocast = torch.autocast('cuda', torch.bfloat16, enabled=dtype == 'bfloat16')

  def step(x, y):
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = torch.nn.functional.cross_entropy(model(x.float() / 255.0), y)
    loss.backward()
    optimizer.step()
    return loss
  step = torch.compile(step) if compiled else step
  steps = len(labels) // config.batch_size

  def epoch():
    order = torch.randperm(len(labels), device=device)
    for i in range(steps):
      rows = order[i * config.batch_size:(i + 1) * config.batch_size]
      loss = step(images[rows], labels[rows])
    loss.item()
  epoch()  # Warm-up (and compilation).
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    epoch()
    rates.append(steps * config.batch_size / (time.perf_counter() - start))
  return statistics.median(rates)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--idx_dir', required=True, help='folder with the four MNIST IDX files')
  parser.add_argument('--runs', default='base,base_bf16', help=f'whole runs: {", ".join(RUNS)}')
  parser.add_argument('--epochs', type=int, default=0, help="runs' epochs (0: the config's)")
  parser.add_argument('--kernels', default='3,5')
  parser.add_argument('--repeats', type=int, default=5, help='timed epochs per throughput cell')
  parser.add_argument('--no_torch', action='store_true', help='skip the PyTorch peer')
  parser.add_argument('--torch_modes', default='eager,compile',
                      help='PyTorch peers: eager and/or compile (torch.compile)')
  args = parser.parse_args()
  import jax
  source = read_idx_splits_if_no_tensorflow(args.idx_dir)
  print(f'Devices: {jax.devices()}; data: {source}', flush=True)
  rows = [full_run(name, args.idx_dir, args.epochs) for name in args.runs.split(',') if name]
  table = ['| run | compile (s) | training after compile (s) | wall of the call (s) | epochs '
           '| final val_accuracy |', '|---|---|---|---|---|---|']
  table += [f"| {r['run']} | {r['compile']:.1f} | {r['train']:.2f} | {r['wall']:.1f} | "
            f"{r['epochs']} | {r['val_accuracy']:.4f} |" for r in rows]
  modes = {'eager': 'torch', 'compile': 'torch.compile'}
  systems = ['flax_mnist'] + ([] if args.no_torch else
                              [modes[m] for m in args.torch_modes.split(',') if m])
  table += ['', '| k | dtype | ' + ' | '.join(systems) + ' | flax_mnist / fastest peer |',
            '|---' * (len(systems) + 3) + '|']
  for kernel in args.kernels.split(','):
    for dtype in ('float32', 'bfloat16'):
      rates = {'flax_mnist': device_epoch_rate(dtype, kernel, args.repeats, args.idx_dir)}
      for name in systems[1:]:
        rates[name] = torch_epoch_rate(dtype, kernel, args.repeats, args.idx_dir,
                                       compiled=name == 'torch.compile')
      peer = max((v for n, v in rates.items() if n != 'flax_mnist'), default=None)
      ratio = f"{rates['flax_mnist'] / peer:.2f}x" if peer else 'n/a'
      table.append(f'| {kernel} | {dtype} | ' + ' | '.join(f'{rates[n]:.0f}' for n in systems)
                   + f' | {ratio} |')
      print(table[-1], flush=True)
  print('\n'.join(table))


if __name__ == '__main__':
  main()
