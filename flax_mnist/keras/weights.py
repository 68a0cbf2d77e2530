"""Reads weights from a Keras file with h5py and zipfile: HDF5 (Keras 2 or 3, model or
weights-only) or Keras 3's native `.keras` zip.

Only the weights are read, never the file's model config, so no Lambda layer or other code in
the file can run; of a .keras zip, only its model.weights.h5 is read, after checking the zip's
member names and that member's size. Only expected paths are followed, through hard links
only (h5py would follow soft and external links into other files), and each array's shape is
checked before it is read.
"""

import io
import pathlib
import zipfile
import zlib

import h5py
import numpy as np

from flax_mnist.errors import FlaxMnistError, first_line
from flax_mnist.keras.layout import (KERAS3_MEMBERS, KERAS3_WEIGHTS, WEIGHT_LAYERS,
                                     keras3_weight_path)

_SUFFIXES = ('.h5', '.hdf5', '.keras')
_ZIP_SIGNATURE = b'PK\x03\x04'
# What a damaged file raises from inside h5py, zipfile or its decompressors.
_DAMAGED = (OSError, KeyError, ValueError, TypeError, RuntimeError, EOFError,
            NotImplementedError, zipfile.BadZipFile, zlib.error)


class KerasImportError(FlaxMnistError):
  """A .h5/.keras file that is not a usable Keras file for this model."""


def _attr_strings(group, name: str, where: pathlib.Path) -> list[str]:
  # Keras splits long lists over `name0`, `name1`, ... attributes.
  if name in group.attrs:
    values = _strings(group, name, where)
  else:
    values, i = [], 0
    while f'{name}{i}' in group.attrs:
      values += _strings(group, f'{name}{i}', where)
      i += 1
  return values


def _strings(group, name: str, where: pathlib.Path) -> list[str]:
  values = np.atleast_1d(group.attrs[name]).tolist()
  if not all(isinstance(v, (str, bytes)) for v in values) or np.ndim(values) != 1:
    raise KerasImportError(f'{where}: attribute {group.name}:{name} is not a list of names; '
                           'not a Keras weights file.')
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


def _has_signature(path: pathlib.Path, signature: bytes) -> bool:
  with open(path, 'rb') as f:
    return f.read(len(signature)) == signature


def open_h5(path: pathlib.Path) -> h5py.File:
  """Opens `path` read-only, or raises KerasImportError naming it."""
  if not path.is_file():
    raise KerasImportError(f'{path}: no such file; init_from needs a Keras .h5 or .keras file.')
  try:
    return h5py.File(path, 'r')
  except OSError:
    hint = (' It is a zip: a Keras 3 .keras file? Name it .keras.'
            if _has_signature(path, _ZIP_SIGNATURE) else '')
    raise KerasImportError(f'{path} is not an HDF5 file; init_from needs a Keras .h5 file '
                           '(model.save("x.h5") or model.save_weights("x.weights.h5")).'
                           + hint) from None


def size_limit(model) -> int:
  """The most bytes a .keras file's model.weights.h5 may declare for `model`.

  Eight times the model's float32 weights plus 16 MiB: a Keras-trained file holds the weights,
  Adam's two moments (three times the weights) and HDF5's own structure. A bigger member cannot
  be this model, so it is refused before anything is decompressed into memory.
  """
  count = sum(int(np.prod(getattr(model, attr).kernel.shape))
              + int(np.prod(getattr(model, attr).bias.shape)) for attr, _ in WEIGHT_LAYERS)
  return 8 * 4 * count + (16 << 20)


def open_keras(path: pathlib.Path, limit: int) -> h5py.File:
  """Opens model.weights.h5 of the .keras zip `path` read-only (from memory), or raises
  KerasImportError naming it.

  Nothing else in the zip is read, and nothing is extracted to disk. The zip must hold only
  the members Keras 3 writes for this model, each once (no assets, no paths), and its weights
  member must declare at most `limit` bytes: zipfile never decompresses more than a member
  declares, so that bounds the memory used.
  """
  if not path.is_file():
    raise KerasImportError(f'{path}: no such file; init_from needs a Keras .h5 or .keras file.')
  if not zipfile.is_zipfile(path):
    hint = (' It is HDF5: name it .h5.' if _has_signature(path, b'\x89HDF\r\n\x1a\n') else '')
    raise KerasImportError(f'{path} is not a zip; init_from needs a .keras file as Keras 3 '
                           'writes it (model.save("x.keras")).' + hint)
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    odd = [n for n in names if n not in KERAS3_MEMBERS or names.count(n) > 1]
    if odd or KERAS3_WEIGHTS not in names:
      found = (f'unexpected zip members {", ".join(repr(n[:60]) for n in odd[:3])}' if odd
               else f'no {KERAS3_WEIGHTS} in the zip')
      raise KerasImportError(f'{path}: {found}; a .keras file of this model holds only '
                             f'{", ".join(KERAS3_MEMBERS)}, once each. Save it again with '
                             'model.save("x.keras").')
    info = archive.getinfo(KERAS3_WEIGHTS)
    if info.flag_bits & 0x1:
      raise KerasImportError(f'{path}: {KERAS3_WEIGHTS} is encrypted; save the model again '
                             'without a password.')
    if info.file_size > limit:
      raise KerasImportError(f'{path}: {KERAS3_WEIGHTS} declares {info.file_size:,} bytes; a '
                             f'Keras file of this model needs at most {limit:,}. Another '
                             'architecture, or not a Keras file: match the config to the file.')
    with archive.open(info) as member:
      data = member.read(limit + 1)
  return h5py.File(io.BytesIO(data), 'r')


def _layer_count_error(path: pathlib.Path, names: list[str]) -> KerasImportError:
  # Names as repr writes them (no newline from the file), shortened: the error is one line.
  shown = ', '.join(repr(n)[1:-1][:40] for n in names[:8]) + (', ...' if len(names) > 8 else '')
  return KerasImportError(f'{path} has {len(names)} layers with weights ({shown}); this model '
                          f'has {len(WEIGHT_LAYERS)} '
                          f'({", ".join(name for _, name in WEIGHT_LAYERS)}).')


def read_layers(f: h5py.File, path: pathlib.Path) -> list[tuple[str, list[h5py.Dataset]]]:
  """[(layer name, weight datasets)] for the layers of open file `f` that hold weights."""
  legacy = 'model_weights' in f or 'layer_names' in f.attrs or 'layer_names0' in f.attrs
  if not legacy and f.get('layers', getlink=True) is not None:  # Even a link: refused below.
    return _keras3_layers(f, path)
  root = _hard_child(f, 'model_weights', path) if 'model_weights' in f else f
  layer_names = _attr_strings(root, 'layer_names', path)
  if not layer_names:
    raise KerasImportError(f'{path}: no layer_names attribute; not a Keras HDF5 model file.')
  layers = []
  for name in layer_names:
    group = _hard_child(root, name, path)
    weight_names = _attr_strings(group, 'weight_names', path)
    if weight_names:
      layers.append((name, [_hard_child(group, w, path) for w in weight_names]))
  return layers


def _keras3_layers(f: h5py.File, path: pathlib.Path) -> list[tuple[str, list[h5py.Dataset]]]:
  """The Keras 3 layout (a .keras file's model.weights.h5, or model.save_weights' file).

  Keras 3 names each layer's group after its class, numbered per model (conv2d, conv2d_1,
  dense, dense_1), so the groups of this architecture have fixed names and WEIGHT_LAYERS gives
  their order. The other layers' groups are listed to check that they hold no variables (a
  deeper model would); their contents are not read.
  """
  root = _hard_child(f, 'layers', path)
  holding = []
  for name in root:
    group = _hard_child(root, name, path)
    if not isinstance(group, h5py.Group):
      raise KerasImportError(f'{path}: {group.name} is not a group; not a Keras weights file.')
    if group.get('vars', getlink=True) is not None:
      variables = _hard_child(group, 'vars', path)
      if not isinstance(variables, h5py.Group):
        raise KerasImportError(f'{path}: {variables.name} is not a group; not a Keras weights '
                               'file.')
      if len(variables):
        holding.append((name, len(variables)))
  if sorted(name for name, _ in holding) != sorted(name for _, name in WEIGHT_LAYERS):
    raise _layer_count_error(path, [name for name, _ in holding])
  counts = dict(holding)
  return [(name, [_hard_child(f, keras3_weight_path(name, i), path) for i in range(counts[name])])
          for _, name in WEIGHT_LAYERS]


def load_weights(model, path: str | pathlib.Path) -> None:
  """Copies the Keras file's conv and dense weights into `model` (in place), checking shapes.

  `.keras` files are read as Keras 3's zip, any other name as HDF5. A different architecture
  fails naming the first mismatching layer and its shapes.
  """
  path = pathlib.Path(path)
  native = path.suffix == '.keras'
  try:
    with open_keras(path, size_limit(model)) if native else open_h5(path) as f:
      values = _checked_values(model, read_layers(f, path), path)
  except _DAMAGED as e:  # Damaged HDF5 or zip inside.
    kind = 'Keras 3 .keras' if native else 'Keras HDF5'
    raise KerasImportError(f'{path} is damaged or not a {kind} file ({first_line(e, 160)}); '
                           'export it again.') from None
  for layer, (kernel, bias) in values:  # Only after every layer checked out.
    layer.kernel[...] = kernel
    layer.bias[...] = bias


def _checked_values(model, layers, path):
  if len(layers) != len(WEIGHT_LAYERS):
    raise _layer_count_error(path, [name for name, _ in layers])
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
    if any(d.is_virtual or d.external for d in datasets):  # Their data lies in other files.
      raise KerasImportError(f'{path}: layer {name!r} keeps its weights in other files (virtual '
                             'or external datasets); only data inside the file is read.')
    arrays = [np.asarray(d[()], np.float32) for d in datasets]
    if not all(np.isfinite(a).all() for a in arrays):
      raise KerasImportError(f'{path}: layer {name!r} holds non-finite weights.')
    values.append((layer, arrays))
  return values
