"""The IDX reader on the real MNIST files and on deliberately broken ones."""

import gzip
import struct

import numpy as np
import pytest

from flax_mnist.data import idx
from flax_mnist.errors import DataError

TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_idx(path, array, magic=None, dims=None):
  array = np.asarray(array, np.uint8)
  dims = array.shape if dims is None else dims
  magic = bytes([0, 0, 8, len(dims)]) if magic is None else magic
  path.write_bytes(magic + struct.pack(f'>{len(dims)}I', *dims) + array.tobytes())
  return path


def test_real_test_split(mnist_dir):
  images, labels = idx.read_split(mnist_dir, 'test')
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert np.bincount(labels).tolist() == TEST_LABEL_COUNTS
  assert 0 < images.mean() < 255


def test_real_train_split(mnist_dir):
  images, labels = idx.read_split(mnist_dir, 'train')
  assert images.shape == (60000, 28, 28)
  assert labels.shape == (60000,) and labels.max() == 9


def test_reads_uncompressed_files(tmp_path):
  images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
  _write_idx(tmp_path / 'imgs', images)
  np.testing.assert_array_equal(idx.read_images(tmp_path / 'imgs'), images)


def test_bad_magic(tmp_path):
  path = _write_idx(tmp_path / 'x', np.zeros((1, 28, 28)), magic=b'\x50\x4b\x03\x04')
  with pytest.raises(DataError, match=r'x: bad magic number 504b0304'):
    idx.read_images(path)


def test_wrong_kind_of_file(tmp_path):
  path = _write_idx(tmp_path / 'labels', np.zeros(5))
  with pytest.raises(DataError, match='1 dims, expected unsigned bytes .* with 3 dims'):
    idx.read_images(path)


def test_truncated_gzip_data(tmp_path):
  path = tmp_path / 'imgs.gz'
  raw = bytes([0, 0, 8, 3]) + struct.pack('>3I', 10, 28, 28) + bytes(5 * 28 * 28)
  path.write_bytes(gzip.compress(raw))
  with pytest.raises(DataError, match=r'imgs.gz: header promises 7840 bytes .* has 3920'):
    idx.read_images(path)


def test_truncated_gzip_stream(tmp_path, mnist_dir):
  path = tmp_path / 'broken.gz'
  path.write_bytes((mnist_dir / 't10k-labels-idx1-ubyte.gz').read_bytes()[:200])
  with pytest.raises(DataError, match='broken.gz: corrupt gzip data'):
    idx.read_labels(path)


def test_wrong_image_size(tmp_path):
  path = _write_idx(tmp_path / 'imgs', np.zeros((2, 32, 32)))
  with pytest.raises(DataError, match='images are 32x32, expected 28x28'):
    idx.read_images(path)


def test_label_out_of_range(tmp_path):
  path = _write_idx(tmp_path / 'labels', [1, 2, 10, 3])
  with pytest.raises(DataError, match=r'label 10 at index 2 is outside 0..9'):
    idx.read_labels(path)


def test_count_mismatch(tmp_path):
  _write_idx(tmp_path / 't10k-images-idx3-ubyte', np.zeros((3, 28, 28)))
  _write_idx(tmp_path / 't10k-labels-idx1-ubyte', [1, 2])
  with pytest.raises(DataError, match='has 3 images but .* has 2 labels'):
    idx.read_split(tmp_path, 'test')


def test_missing_file_names_the_file(tmp_path):
  with pytest.raises(DataError, match='has no t10k-images-idx3-ubyte.gz'):
    idx.read_split(tmp_path, 'test')


def test_missing_folder(tmp_path):
  with pytest.raises(DataError, match='is not a folder'):
    idx.read_split(tmp_path / 'nope', 'test')
