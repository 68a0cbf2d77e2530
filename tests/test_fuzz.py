"""Fuzzing the two file readers: any bytes fail only with the package's own error type.

The IDX reader and the Keras .h5/.keras importer read files a user names. Whatever is in them
(random bytes, a mangled real file, a well-formed file with odd contents) they may return data
or raise a FlaxMnistError, never anything else. Bounded example counts keep CI fast.
"""

import contextlib
import gzip
import pathlib
import struct
import tempfile
import zipfile

import h5py
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import base_config
from flax_mnist import model as model_lib
from flax_mnist import plan as plan_lib
from flax_mnist.data import idx
from flax_mnist.errors import FlaxMnistError
from flax_mnist.keras import export as keras_export
from flax_mnist.keras import weights as keras_weights

FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def _file(data: bytes, name: str = 'f'):
  with tempfile.TemporaryDirectory() as folder:
    path = pathlib.Path(folder) / name
    path.write_bytes(data)
    yield path


def _read_all_ways(path):
  for read in (lambda p: idx.read_idx(p, 1), lambda p: idx.read_idx(p, 3), idx.read_images,
               idx.read_labels):
    try:
      read(path)
    except FlaxMnistError:
      pass


@FUZZ
@given(data=st.binary(max_size=3000), gzipped=st.booleans())
def test_idx_reader_on_random_bytes(data, gzipped):
  with _file(gzip.compress(data) if gzipped else data) as path:
    _read_all_ways(path)


_DIM = st.one_of(st.integers(0, 30), st.sampled_from([28, 2**31, 2**32 - 1]))


@FUZZ
@given(dtype=st.sampled_from([8, 8, 9, 0x0d, 255]), dims=st.lists(_DIM, max_size=4),
       ndim_byte=st.one_of(st.none(), st.integers(0, 255)), extra=st.integers(-50, 50),
       fill=st.integers(0, 255), gzipped=st.booleans(), cut=st.integers(0, 3))
def test_idx_reader_on_plausible_headers(dtype, dims, ndim_byte, extra, fill, gzipped, cut):
  """Headers that pass the magic check, with sizes that fit, overflow or disagree."""
  ndim = len(dims) if ndim_byte is None else ndim_byte
  header = bytes([0, 0, dtype, ndim]) + struct.pack(f'>{len(dims)}I', *dims)
  size = int(np.prod([d for d in dims if d < 1000], dtype=np.int64)) if dims else 0
  body = bytes([fill]) * max(min(size, 40000) + extra, 0)
  data = (header + body)[:len(header) + len(body) - cut]
  with _file(gzip.compress(data) if gzipped else data) as path:
    _read_all_ways(path)


class _Short(tuple):
  def __repr__(self):  # Hypothesis prints failing arguments: not 1.2M weights and 5 MB.
    return '(model, exported bytes)'


@pytest.fixture(scope='module')
def model_and_file():
  """A fresh model of the base config and the bytes of its own Keras export."""
  config = base_config()
  model = model_lib.CNN(config, plan_lib.make(config, 'cpu', 1), rngs=nnx.Rngs(params=0))
  with tempfile.TemporaryDirectory() as folder:
    path = keras_export.export_h5(model, config, pathlib.Path(folder) / 'm.h5')
    keras_weights.load_weights(model, path)  # The unmangled file imports.
    return _Short((model, path.read_bytes()))


def _import(model, data: bytes, name: str = 'm.h5'):
  with _file(data, name) as path:
    try:
      keras_weights.load_weights(model, path)
    except FlaxMnistError:
      pass


@FUZZ
@given(data=st.binary(max_size=2000), hdf5_signature=st.booleans())
def test_h5_importer_on_random_bytes(model_and_file, data, hdf5_signature):
  model, _ = model_and_file
  _import(model, (b'\x89HDF\r\n\x1a\n' if hdf5_signature else b'') + data)


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      max_size=20),
       keep=st.floats(0.05, 1))
def test_h5_importer_on_mangled_exports(model_and_file, edits, keep):
  """A real export with random bytes overwritten and its tail cut off."""
  model, original = model_and_file
  data = bytearray(original[:max(int(len(original) * keep), 8)])
  for where, value in edits:
    data[int(where * len(data))] = value
  _import(model, bytes(data))


_NAMES = st.sampled_from(['conv2d', 'conv2d_1', 'dense', 'dense_1', 'x', '', '/', '.', 'a/b',
                          'kernel:0', 'conv2d/kernel:0'])
_ATTR = st.one_of(st.lists(_NAMES, max_size=5), _NAMES, st.integers(), st.floats(),
                  st.just([1, 2]))
_SHAPES = st.lists(st.integers(0, 4), max_size=4).map(tuple)


def _set_attr(node, name, value):
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    value = np.array([v.encode() for v in value], dtype='S')
  node.attrs[name] = value


def _build(f, layer_names, layers, model_weights, links):
  root = f.create_group('model_weights') if model_weights else f
  _set_attr(root, 'layer_names', layer_names)
  for group_name, weight_names, datasets in layers:
    group = root.require_group(group_name)
    _set_attr(group, 'weight_names', weight_names)
    for name, shape, kind in datasets:
      if name in group:
        continue
      dtype = {'f': np.float32, 'i': np.int32, 's': 'S3'}[kind]
      group.create_dataset(name, data=np.zeros(shape, dtype))
  for name, kind in links:
    if name not in root:
      root[name] = (h5py.SoftLink('/model_weights') if kind == 'soft'
                    else h5py.ExternalLink('other.h5', '/x'))


@FUZZ
@given(layer_names=_ATTR, model_weights=st.booleans(),
       layers=st.lists(st.tuples(st.sampled_from(['conv2d', 'conv2d_1', 'dense', 'dense_1', 'x']),
                                 _ATTR,
                                 st.lists(st.tuples(st.sampled_from(['kernel:0', 'bias:0', 'w']),
                                                    _SHAPES, st.sampled_from('fis')),
                                          max_size=3)),
                       max_size=5),
       links=st.lists(st.tuples(st.sampled_from(['conv2d', 'dense_1', 'y']),
                                st.sampled_from(['soft', 'external'])), max_size=2))
def test_h5_importer_on_odd_well_formed_files(model_and_file, layer_names, model_weights,
                                              layers, links):
  model, _ = model_and_file
  with tempfile.TemporaryDirectory() as folder:
    path = pathlib.Path(folder) / 'm.h5'
    try:
      with h5py.File(path, 'w') as f:
        _build(f, layer_names, layers, model_weights, links)
    except (ValueError, TypeError, KeyError):  # h5py refused to write this combination.
      return
    try:
      keras_weights.load_weights(model, path)
    except FlaxMnistError:
      pass


@pytest.fixture(scope='module')
def keras_members():
  """The base model's own .keras export, as its zip members [(name, bytes)]."""
  config = base_config()
  model = model_lib.CNN(config, plan_lib.make(config, 'cpu', 1), rngs=nnx.Rngs(params=0))
  with tempfile.TemporaryDirectory() as folder:
    path = keras_export.export_keras(model, config, pathlib.Path(folder) / 'm.keras')
    keras_weights.load_weights(model, path)  # The unmangled file imports.
    with zipfile.ZipFile(path) as archive:
      members = [(name, archive.read(name)) for name in archive.namelist()]
  return _Short((model, members))


def _zipped(members) -> bytes:
  with tempfile.TemporaryDirectory() as folder:
    path = pathlib.Path(folder) / 'm.keras'
    with zipfile.ZipFile(path, 'w') as z:
      for name, data in members:
        z.writestr(name, data)
    return path.read_bytes()


_EDITS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=20)


def _mangle(data: bytes, edits, keep: float, near_end: bool = False) -> bytes:
  data = bytearray(data[:max(int(len(data) * keep), 8)])
  span = min(len(data), 400) if near_end else len(data)  # The zip's directory is at its end.
  for where, value in edits:
    data[len(data) - span + int(where * span)] = value
  return bytes(data)


@FUZZ
@given(edits=_EDITS, keep=st.floats(0.05, 1))
def test_keras_importer_on_mangled_weights_inside_a_good_zip(keras_members, edits, keep):
  """A real .keras whose model.weights.h5 has random bytes overwritten and its tail cut off,
  zipped again (so the zip's checksums hold and h5py parses the damage)."""
  model, members = keras_members
  (meta, config, (name, weights)) = members
  _import(model, _zipped([meta, config, (name, _mangle(weights, edits, keep))]), 'm.keras')


@FUZZ
@given(edits=_EDITS, keep=st.floats(0.9, 1), near_end=st.booleans(),
       prefix=st.sampled_from([b'', b'PK\x03\x04', b'PK\x05\x06']))
def test_keras_importer_on_mangled_zips(keras_members, edits, keep, near_end, prefix):
  """A real .keras with bytes overwritten (often in the zip's central directory), cut, or
  preceded by a zip signature."""
  model, members = keras_members
  data = prefix + _mangle(_zipped(members), edits, keep, near_end)
  _import(model, data, 'm.keras')
