"""Writes the model as a Keras HDF5 file (the seed's `keras_cnn.h5`) with h5py alone.

h5py rather than Keras itself: exporting must not need TensorFlow or Keras installed. The file
follows keras/layout.py, which both Keras 3 and tf-keras 2 load with keras.models.load_model.
"""

import json
import pathlib

import h5py
import numpy as np

from flax_mnist import model as model_lib
from flax_mnist.keras.layout import (EXPORT_NAME, KERAS_VERSION, WEIGHT_LAYERS, model_config,
                                     training_config)

__all__ = ['EXPORT_NAME', 'export_h5']


def _strings(names: list[str]) -> np.ndarray:
  return np.array([n.encode('utf8') for n in names], dtype='S')


def export_h5(model: model_lib.CNN, config, path: str | pathlib.Path) -> pathlib.Path:
  """Writes `model` to `path` (.h5/.hdf5) as a Keras model file; returns the path.

  Written to a temporary name first and renamed, so an existing file is never left half
  overwritten.
  """
  path = pathlib.Path(path)
  if path.suffix not in ('.h5', '.hdf5'):
    raise ValueError(f'{path}: Keras needs a .h5 or .hdf5 name for an HDF5 model.')
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  with h5py.File(partial, 'w') as f:
    f.attrs['keras_version'] = KERAS_VERSION
    f.attrs['backend'] = 'tensorflow'
    f.attrs['model_config'] = json.dumps(model_config(config))
    f.attrs['training_config'] = json.dumps(training_config(config))
    weights = f.create_group('model_weights')
    weights.attrs['keras_version'] = KERAS_VERSION
    weights.attrs['backend'] = 'tensorflow'
    weights.attrs['layer_names'] = _strings([r[0] for r in model_lib.layer_table(config)])
    for name, *_ in model_lib.layer_table(config):
      weights.create_group(name).attrs['weight_names'] = _strings([])
    for attr, name in WEIGHT_LAYERS:
      layer = getattr(model, attr)
      group = weights[name]
      group.attrs['weight_names'] = _strings([f'{name}/kernel:0', f'{name}/bias:0'])
      inner = group.create_group(name)
      inner.create_dataset('kernel:0', data=np.asarray(layer.kernel[...], np.float32))
      inner.create_dataset('bias:0', data=np.asarray(layer.bias[...], np.float32))
  partial.replace(path)
  return path
