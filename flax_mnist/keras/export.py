"""Writes the model as a Keras file with h5py, zipfile and json alone: the seed's HDF5
`keras_cnn.h5`, or Keras 3's native `.keras`.

Not with Keras itself: exporting must not need TensorFlow or Keras installed. The files follow
keras/layout.py; keras.models.load_model loads the .h5 in Keras 3 and tf-keras 2, and the
.keras in Keras 3 (with safe_mode=True: it holds no code).
"""

import datetime
import io
import json
import pathlib
import zipfile

import h5py
import numpy as np

from flax_mnist import model as model_lib
from flax_mnist.errors import FlaxMnistError
from flax_mnist.keras.layout import (EXPORT_NAME, KERAS3_VERSION, KERAS3_WEIGHTS, KERAS_VERSION,
                                     WEIGHT_LAYERS, keras3_config, keras3_weight_path,
                                     model_config, training_config)

__all__ = ['EXPORT_NAME', 'ExportNameError', 'check_name', 'export', 'export_h5', 'export_keras']
H5_SUFFIXES = ('.h5', '.hdf5')


class ExportNameError(FlaxMnistError, ValueError):
  """An export path whose suffix names no format written here: a one-line error for the CLI
  (FlaxMnistError), and still the ValueError that a bad argument is."""


def check_name(path: str | pathlib.Path) -> pathlib.Path:
  """`path` as a Path if its suffix names a format written here; else ExportNameError.

  Checked before any work, so that a typo fails at once, not after restoring a checkpoint.
  """
  path = pathlib.Path(path)
  if path.suffix != path.suffix.lower() and path.suffix.lower() in (*H5_SUFFIXES, '.keras'):
    raise ExportNameError(f'{path}: write the suffix in lower case ({path.stem}'
                          f'{path.suffix.lower()}); Keras\' loaders know a file by its lower-case '
                          '.h5, .hdf5 or .keras suffix.')
  if path.suffix not in (*H5_SUFFIXES, '.keras'):
    raise ExportNameError(f'{path}: a Keras file needs a .h5 or .hdf5 name (HDF5, as the '
                          'seed\'s) or a .keras name (Keras 3\'s native format).')
  if path.is_dir():
    raise ExportNameError(f'{path}: is a folder; pass a file name (e.g. {path / EXPORT_NAME}).')
  return path


def export(model: model_lib.CNN, config, path: str | pathlib.Path) -> pathlib.Path:
  """Writes `model` to `path` in the format its suffix names (.h5/.hdf5 or .keras)."""
  path = check_name(path)
  write = export_keras if path.suffix == '.keras' else export_h5
  return write(model, config, path)


def _strings(names: list[str]) -> np.ndarray:
  return np.array([n.encode('utf8') for n in names], dtype='S')


def export_h5(model: model_lib.CNN, config, path: str | pathlib.Path) -> pathlib.Path:
  """Writes `model` to `path` (.h5/.hdf5) as a Keras model file; returns the path.

  Written to a temporary name first and renamed, so an existing file is never left half
  overwritten.
  """
  path = pathlib.Path(path)
  if path.suffix not in H5_SUFFIXES:
    raise ExportNameError(f'{path}: Keras needs a .h5 or .hdf5 name for an HDF5 model.')
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


def _float32(variable) -> np.ndarray:
  return np.asarray(variable[...], np.float32)


def _keras3_weights(f: h5py.File, model: model_lib.CNN, config) -> None:
  """Fills `f` as Keras 3 fills model.weights.h5 for this model, compiled and not yet trained.

  Keras writes a `vars` group for every object it walks, named in its `name` attribute. The
  optimizer's variables are Adam's before its first step (iterations 0, then a zero momentum
  and velocity per weight, in Keras' order): with them Keras loads the file without warning
  that the optimizer's variables do not match. Those zeros are declared, never written, so
  HDF5 stores no bytes for them.
  """
  f.create_group('vars').attrs['name'] = 'sequential'
  for name, *_ in model_lib.layer_table(config):
    f.create_group(f'layers/{name}/vars').attrs['name'] = name
  weights = []
  for attr, name in WEIGHT_LAYERS:
    layer = getattr(model, attr)
    for index, variable in enumerate((layer.kernel, layer.bias)):
      f.create_dataset(keras3_weight_path(name, index), data=_float32(variable))
      weights.append(variable.shape)
  optimizer = f.create_group('optimizer/vars')
  optimizer.attrs['name'] = 'adam'
  optimizer.create_dataset('0', data=np.int64(0))  # iterations
  optimizer.create_dataset('1', data=np.float32(config.learning_rate))
  for i, shape in enumerate(weights):
    optimizer.create_dataset(str(2 + 2 * i), shape=shape, dtype=np.float32)  # momentum
    optimizer.create_dataset(str(3 + 2 * i), shape=shape, dtype=np.float32)  # velocity


def export_keras(model: model_lib.CNN, config, path: str | pathlib.Path) -> pathlib.Path:
  """Writes `model` to `path` (.keras) as Keras 3 saves a model; returns the path.

  The zip holds what Keras 3 writes (metadata.json, config.json, model.weights.h5), stored
  uncompressed as Keras stores them. Written to a temporary name first and renamed, so an
  existing file is never left half overwritten.
  """
  path = pathlib.Path(path)
  if path.suffix != '.keras':
    raise ExportNameError(f'{path}: Keras 3 needs a .keras name for its native format.')
  path.parent.mkdir(parents=True, exist_ok=True)
  weights = io.BytesIO()
  with h5py.File(weights, 'w') as f:
    _keras3_weights(f, model, config)
  metadata = {'keras_version': KERAS3_VERSION,
              'date_saved': datetime.datetime.now().strftime('%Y-%m-%d@%H:%M:%S')}
  partial = path.with_name(path.name + '.partial')
  with zipfile.ZipFile(partial, 'w', zipfile.ZIP_STORED) as z:
    z.writestr('metadata.json', json.dumps(metadata))
    z.writestr('config.json', json.dumps(keras3_config(config)))
    z.writestr(KERAS3_WEIGHTS, weights.getvalue())
  partial.replace(path)
  return path
