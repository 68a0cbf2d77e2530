"""Reads weights from a Keras HDF5 file (Keras 2 or 3, model or weights-only) with h5py.

Only the weights are read, never the file's model config, so no Lambda layer or other code in
the file can run. Only expected paths are followed, through hard links only (h5py would follow
soft and external links into other files), and each array's shape is checked before it is read.
"""

import pathlib

import h5py
import numpy as np

from flax_mnist.errors import FlaxMnistError, first_line
from flax_mnist.keras.layout import WEIGHT_LAYERS


class KerasImportError(FlaxMnistError):
  """A .h5 file that is not a usable Keras file for this model."""


def _attr_strings(group, name: str) -> list[str]:
  # Keras splits long lists over `name0`, `name1`, ... attributes.
  if name in group.attrs:
    values = _strings(group, name)
  else:
    values, i = [], 0
    while f'{name}{i}' in group.attrs:
      values += _strings(group, f'{name}{i}')
      i += 1
  return values


def _strings(group, name: str) -> list[str]:
  values = np.atleast_1d(group.attrs[name]).tolist()
  if not all(isinstance(v, (str, bytes)) for v in values) or np.ndim(values) != 1:
    raise KerasImportError(f'{group.file.filename}: attribute {group.name}:{name} is not a list '
                           'of names; not a Keras weights file.')
  return [v.decode('utf8', 'replace') if isinstance(v, bytes) else v for v in values]


def _hard_child(group, path: str, where: pathlib.Path):
  node = group
  for part in path.strip('/').split('/'):
    link = node.get(part, getlink=True)
    if link is None:
      raise KerasImportError(f'{where}: missing {node.name}/{part}; not a Keras weights file.')
    if not isinstance(link, h5py.HardLink):
      raise KerasImportError(f'{where}: {node.name}/{part} is a {type(link).__name__}; only '
                             'plain (hard-linked) datasets are read.')
    node = node[part]
  return node


def open_h5(path: pathlib.Path) -> h5py.File:
  """Opens `path` read-only, or raises KerasImportError naming it."""
  if not path.is_file():
    raise KerasImportError(f'{path}: no such file; init_from needs a Keras .h5 file.')
  try:
    return h5py.File(path, 'r')
  except OSError:
    raise KerasImportError(f'{path} is not an HDF5 file; init_from needs a Keras .h5 file '
                           '(model.save("x.h5") or model.save_weights("x.weights.h5")).') from None


def read_layers(f: h5py.File, path: pathlib.Path) -> list[tuple[str, list[h5py.Dataset]]]:
  """[(layer name, weight datasets)] for the layers of open file `f` that hold weights."""
  root = _hard_child(f, 'model_weights', path) if 'model_weights' in f else f
  layer_names = _attr_strings(root, 'layer_names')
  if not layer_names:
    raise KerasImportError(f'{path}: no layer_names attribute; not a Keras HDF5 model file.')
  layers = []
  for name in layer_names:
    group = _hard_child(root, name, path)
    weight_names = _attr_strings(group, 'weight_names')
    if weight_names:
      layers.append((name, [_hard_child(group, w, path) for w in weight_names]))
  return layers


def load_weights(model, path: str | pathlib.Path) -> None:
  """Copies the Keras file's conv and dense weights into `model` (in place), checking shapes.

  A different architecture fails naming the first mismatching layer and its shapes.
  """
  path = pathlib.Path(path)
  try:
    with open_h5(path) as f:
      values = _checked_values(model, read_layers(f, path), path)
  except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # Damaged HDF5 inside.
    raise KerasImportError(f'{path} is damaged or not a Keras HDF5 file ({first_line(e, 160)}); '
                           'export it again.') from None
  for layer, (kernel, bias) in values:  # Only after every layer checked out.
    layer.kernel[...] = kernel
    layer.bias[...] = bias


def _checked_values(model, layers, path):
  if len(layers) != len(WEIGHT_LAYERS):
    names = ', '.join(name for name, _ in layers)
    raise KerasImportError(f'{path} has {len(layers)} layers with weights ({names}); this model '
                           f'has {len(WEIGHT_LAYERS)} (conv2d, conv2d_1, dense, dense_1).')
  values = []
  for (attr, keras_name), (name, datasets) in zip(WEIGHT_LAYERS, layers):
    layer = getattr(model, attr)
    expected = [tuple(layer.kernel.shape), tuple(layer.bias.shape)]
    found = [tuple(d.shape) if isinstance(d, h5py.Dataset) and d.dtype.kind == 'f' else None
             for d in datasets]
    if found != expected:
      raise KerasImportError(f'{path}: layer {name!r} has weights of shapes {found}; this '
                             f'model\'s {keras_name!r} needs {expected}. Different architecture '
                             '(kernel_size, features)? Match the config to the file.')
    arrays = [np.asarray(d[()], np.float32) for d in datasets]
    if not all(np.isfinite(a).all() for a in arrays):
      raise KerasImportError(f'{path}: layer {name!r} holds non-finite weights.')
    values.append((layer, arrays))
  return values
