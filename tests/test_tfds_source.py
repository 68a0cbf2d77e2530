"""tfds datasets read into memory, and their offline preparation from IDX files."""

import pathlib
import re
import socket
import tempfile
import time

import numpy as np
import pytest
import requests

from conftest import base_config
from flax_mnist.data import prepare, tfds_source
from flax_mnist.errors import DataError


pytestmark = pytest.mark.usefixtures('split_cache_off')  # These tests check the tfds paths.


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


def _closed_port() -> int:
  """A local TCP port that nothing listens on: connecting to it is refused at once."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_download_failure_points_to_idx_dir_and_leaves_nothing(tmp_path, monkeypatch):
  config = _config(str(tmp_path / 'tfds'))
  builder = tfds_source.get_builder(config)
  port = _closed_port()

  def download_fails(*args, **kwargs):  # As tfds fails: temporary folders, then requests' error.
    (tmp_path / 'tfds' / 'downloads' / 'cvdf-datasets.tmp.5f3a').mkdir(parents=True)
    (tmp_path / 'tfds' / 'mnist' / 'incomplete.AB12_3.0.1').mkdir(parents=True)
    requests.get(f'http://127.0.0.1:{port}/train-images-idx3-ubyte.gz', timeout=5)
  monkeypatch.setattr(prepare, 'check_reachable', lambda config, builder: None)
  monkeypatch.setattr(builder, 'download_and_prepare', download_fails)
  with pytest.raises(DataError) as error:
    prepare.ensure_prepared(config, builder)
  # The OS's reason whole, not requests' 300-character repr cut mid-bracket.
  assert str(error.value) == (
      "could not download 'mnist' (ConnectionRefusedError: [Errno 111] Connection refused); to "
      'work offline, put the four IDX files in a folder and pass --config.idx_dir=FOLDER.')
  assert not (tmp_path / 'tfds').exists()


def test_no_network_fails_within_seconds(tmp_path, monkeypatch):
  port = _closed_port()
  monkeypatch.setattr(prepare, 'download_hosts', lambda builder: [('127.0.0.1', port)])
  config = _config(str(tmp_path / 'tfds'))
  builder = tfds_source.get_builder(config)
  start = time.perf_counter()
  with pytest.raises(DataError, match=rf"^cannot download 'mnist': no connection to 127.0.0.1:"
                     rf'{port}: ConnectionRefusedError: \[Errno 111\] Connection refused; to '
                     r'work offline, .* pass --config.idx_dir=FOLDER\.$'):
    prepare.ensure_prepared(config, builder)
  assert time.perf_counter() - start < 5
  assert not (tmp_path / 'tfds').exists()


def test_download_hosts_of_mnist_and_behind_a_proxy(tmp_path, monkeypatch):
  for name in ('HTTPS_PROXY', 'https_proxy', 'NO_PROXY', 'no_proxy'):
    monkeypatch.delenv(name, raising=False)
  builder = tfds_source.get_builder(_config(str(tmp_path)))
  assert prepare.download_hosts(builder) == [('storage.googleapis.com', 443)]
  monkeypatch.setenv('https_proxy', 'http://proxy.internal:3128')
  assert prepare.download_hosts(builder) == [('proxy.internal', 3128)]


def _tiny_idx_splits(mnist_dir):
  """40 real test digits as the IDX arrays to prepare from: a preparation in a second."""
  from flax_mnist.data import idx
  images, labels = idx.read_split(mnist_dir, 'test')
  return {'train': (images[:30], labels[:30]), 'test': (images[30:40], labels[30:40])}


def test_offline_preparation_says_a_line_as_it_starts_and_one_when_done(tmp_path, mnist_dir,
                                                                         capfd, caplog):
  (tmp_path / 'tfds' / 'mnist' / '3.0.1').mkdir(parents=True)  # Unprepared: tfds would warn.
  config = _config(str(tmp_path / 'tfds'), idx_dir=str(mnist_dir))
  builder = tfds_source.get_builder(config)
  prepare.ensure_prepared(config, builder, _tiny_idx_splits(mnist_dir))
  out, err = capfd.readouterr()
  first, last = out.splitlines()
  assert first == f'Preparing mnist from IDX files in {mnist_dir} (once per data_dir)'
  assert re.fullmatch(rf'Prepared mnist in {re.escape(str(builder.data_path))} \(\d+\.\ds\)', last)
  assert err == ''  # No progress bars.
  assert 'Variant folder' not in caplog.text
  assert len(tfds_source.load_split(config, 'train')) == 30
  # The dataset alone: no downloads/ folder that the download manager would have made.
  assert sorted(p.name for p in (tmp_path / 'tfds').iterdir()) == ['mnist']


def test_unfinished_dataset_folder_is_not_taken_for_prepared(tmp_path, mnist_dir):
  folder = tmp_path / 'tfds' / 'mnist' / '3.0.1'
  folder.mkdir(parents=True)
  (folder / 'mnist-train.tfrecord-00000-of-00001').write_bytes(b'')
  config = _config(str(tmp_path / 'tfds'), idx_dir=str(mnist_dir))
  with pytest.raises(DataError, match=f'{folder} holds an unfinished dataset'):
    prepare.ensure_prepared(config, tfds_source.get_builder(config))
  assert [p.name for p in folder.iterdir()] == ['mnist-train.tfrecord-00000-of-00001']


def test_failed_offline_preparation_leaves_no_half_made_folder(tmp_path, mnist_dir,
                                                               monkeypatch):
  from flax_mnist.data import offline
  (tmp_path / 'tfds').mkdir()
  (tmp_path / 'tfds' / 'other_dataset').mkdir()  # Someone else's: must stay.
  config = _config(str(tmp_path / 'tfds'), idx_dir=str(mnist_dir))
  examples = offline._examples

  def disk_fills(images, labels):
    yield from list(examples(images, labels))[:5]
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(offline, '_examples', disk_fills)
  with pytest.raises(DataError, match=r"could not write 'mnist' into .*/tfds \(OSError: \[Errno "
                     r'28\] No space left on device\); make room'):
    prepare.ensure_prepared(config, tfds_source.get_builder(config),
                                _tiny_idx_splits(mnist_dir))
  assert sorted(p.name for p in (tmp_path / 'tfds').iterdir()) == ['other_dataset']


def test_split_sizes_known_before_preparing(tmp_path):
  builder = tfds_source.get_builder(_config(str(tmp_path)))
  splits = tfds_source.split_dict(builder, {'train': 60000, 'test': 10000})
  assert [splits[s].num_examples for s in ('train[:55000]', 'train[10%:]', 'test')] == [
      55000, 54000, 10000]
  with pytest.raises(ValueError, match=r'incompatible with 60000 examples'):
    splits['train[:99999999]']  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    splits['validation']  # pylint: disable=pointless-statement
  assert not any(tmp_path.iterdir())


def test_a_builder_of_a_dataset_not_prepared_leaves_no_temporary_folder(tmp_path):
  """tfds alone leaves an empty /tmp/tmp*tfds behind for each such builder."""
  temporary = pathlib.Path(tempfile.gettempdir())
  before = set(temporary.glob('tmp*tfds'))
  for _ in range(3):
    assert not tfds_source.get_builder(_config(str(tmp_path))).is_prepared()
  assert set(temporary.glob('tmp*tfds')) <= before
  assert tempfile.gettempdir() == str(temporary)
  assert not list(temporary.glob('flax_mnist_tfds_*'))


def test_bad_idx_file_fails_before_writing(tmp_path, mnist_dir):
  idx_dir = tmp_path / 'idx'
  idx_dir.mkdir()
  for f in mnist_dir.glob('*.gz'):
    (idx_dir / f.name).write_bytes(f.read_bytes())
  (idx_dir / 't10k-labels-idx1-ubyte.gz').write_bytes(b'not an idx file')
  config = _config(str(tmp_path / 'tfds'), idx_dir=str(idx_dir))
  with pytest.raises(DataError, match='t10k-labels-idx1-ubyte.gz: bad magic number'):
    prepare.ensure_prepared(config, tfds_source.get_builder(config))
  assert not (tmp_path / 'tfds' / 'mnist').exists()
