"""tfds datasets read into memory, and their offline preparation from IDX files."""

import numpy as np
import pytest

from conftest import base_config
from flax_mnist.data import tfds_source
from flax_mnist.errors import DataError


def _config(data_dir, **overrides):
  return base_config(data_dir=data_dir, **overrides)


def test_offline_preparation_gives_full_splits_through_tfds(prepared_data_dir, mnist_dir):
  from flax_mnist.data import idx
  config = _config(prepared_data_dir)
  train = tfds_source.load_split(config, 'train')
  test = tfds_source.load_split(config, 'test')
  assert (len(train), len(test)) == (60000, 10000)
  assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
  # Same examples as the IDX files (tfds stores them in its own key-hash order).
  images, labels = idx.read_split(mnist_dir, 'test')
  assert np.bincount(test.labels).tolist() == np.bincount(labels).tolist()
  assert int(test.images.astype(np.int64).sum()) == int(images.astype(np.int64).sum())


def test_seed_split_and_second_preparation_is_a_no_op(prepared_data_dir, mnist_dir):
  config = _config(prepared_data_dir, idx_dir=str(mnist_dir))
  train = tfds_source.load_split(config, config.train_split)
  assert len(train) == 55000


def test_unknown_dataset(tmp_path):
  with pytest.raises(DataError, match="config.dataset='mnits' is not a tfds dataset"):
    tfds_source.get_builder(_config(str(tmp_path), dataset='mnits'))


def test_dataset_with_other_shape(tmp_path):
  with pytest.raises(DataError, match=r"'cifar10' has images of shape \(32, 32, 3\) and 10 "
                     "label classes; this model needs 28x28x1"):
    tfds_source.get_builder(_config(str(tmp_path), dataset='cifar10'))


def test_download_failure_points_to_idx_dir(tmp_path, monkeypatch):
  config = _config(str(tmp_path))
  builder = tfds_source.get_builder(config)

  def offline(*args, **kwargs):
    raise ConnectionError('Failed to resolve host\nmore detail')
  monkeypatch.setattr(builder, 'download_and_prepare', offline)
  with pytest.raises(DataError, match=r"could not download 'mnist' \(ConnectionError: Failed to "
                     r"resolve host\); to work offline.*--config.idx_dir=FOLDER"):
    tfds_source.ensure_prepared(config, builder)


def test_bad_idx_file_fails_before_writing(tmp_path, mnist_dir):
  idx_dir = tmp_path / 'idx'
  idx_dir.mkdir()
  for f in mnist_dir.glob('*.gz'):
    (idx_dir / f.name).write_bytes(f.read_bytes())
  (idx_dir / 't10k-labels-idx1-ubyte.gz').write_bytes(b'not an idx file')
  config = _config(str(tmp_path / 'tfds'), idx_dir=str(idx_dir))
  with pytest.raises(DataError, match='t10k-labels-idx1-ubyte.gz: bad magic number'):
    tfds_source.ensure_prepared(config, tfds_source.get_builder(config))
  assert not (tmp_path / 'tfds' / 'mnist').exists()
