"""The split cache: a split read through tfds once is read back from the cache, the same arrays,
without tfds; any change to the prepared dataset, a damaged entry or an unwritable folder falls
back to tfds; the folder stays bounded; a cached eval imports neither tfds nor TensorFlow."""

import os
import pathlib

import numpy as np
import pytest

from conftest import REPO, base_config, run_python
from flax_mnist.data import checks, split_cache, tfds_source
from flax_mnist.errors import DataError


@pytest.fixture(name='cache')
def fixture_cache(tmp_path, monkeypatch) -> pathlib.Path:
  folder = tmp_path / 'splits'
  monkeypatch.setenv('FLAX_MNIST_SPLIT_CACHE', str(folder))
  return folder


@pytest.fixture(name='config')
def fixture_config(tmp_path, tiny_idx_dir):
  return base_config(data_dir=str(tmp_path / 'tfds'), idx_dir=str(tiny_idx_dir),
                     train_split='train', eval_split='test[:50]', batch_size=100)


def _without_tfds(monkeypatch):
  def fail():
    raise AssertionError('tfds was used')
  monkeypatch.setattr(tfds_source, 'import_tfds', fail)


def _data_path(config) -> pathlib.Path:
  return pathlib.Path(config.data_dir) / 'mnist' / '3.0.1'


def test_a_split_read_once_comes_back_from_the_cache_unchanged(cache, config, monkeypatch):
  read = tfds_source.load_split(config, 'test[:50]')
  assert len(list(cache.glob('*.npz'))) == 1
  with monkeypatch.context() as patched:
    _without_tfds(patched)
    again = tfds_source.load_split(config, 'test[:50]')
    assert split_cache.size(config, 'train') is None  # Not read yet: not cached.
  np.testing.assert_array_equal(again.images, read.images)
  np.testing.assert_array_equal(again.labels, read.labels)
  assert again.images.dtype == np.uint8 and again.labels.dtype == np.int32
  assert len(again) == 50 and split_cache.size(config, 'test[:50]') == 50


def test_a_changed_dataset_a_damaged_entry_and_cache_off_go_through_tfds(cache, config,
                                                                       monkeypatch):
  read = tfds_source.load_split(config, 'train')
  entry, = cache.glob('*.npz')
  # The prepared dataset changes (here: a file touched): the entry no longer counts.
  info = _data_path(config) / 'dataset_info.json'
  os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 10**9))
  assert split_cache.size(config, 'train') is None
  assert split_cache.load(config, 'train') is None
  np.testing.assert_array_equal(tfds_source.load_split(config, 'train').images, read.images)
  assert split_cache.size(config, 'train') == 300  # Stored again, for the changed dataset.
  # A damaged entry: read through tfds again, and replaced.
  entry.write_bytes(entry.read_bytes()[:1000])
  assert split_cache.load(config, 'train') is None
  np.testing.assert_array_equal(tfds_source.load_split(config, 'train').labels, read.labels)
  assert split_cache.load(config, 'train') is not None
  # Off: nothing read from or written to any folder.
  monkeypatch.setenv('FLAX_MNIST_SPLIT_CACHE', 'off')
  assert split_cache.folder() is None and split_cache.load(config, 'train') is None
  tfds_source.load_split(config, 'test[:50]')
  assert len(list(cache.glob('*.npz'))) == 1


def test_an_unwritable_cache_folder_changes_nothing(tmp_path, config, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  monkeypatch.setenv('FLAX_MNIST_SPLIT_CACHE', str(blocker / 'splits'))
  assert len(tfds_source.load_split(config, 'test[:50]')) == 50
  assert blocker.read_text() == 'not a folder'


def test_the_cache_keeps_the_newest_entries_of_datasets_that_exist(cache, config, tmp_path):
  loaded = tfds_source.load_split(config, 'test[:50]')
  for n in range(split_cache._KEEP + 2):  # Splits of the same dataset, under other names.
    split_cache.store(config, f'test[:{n + 1}]', _data_path(config), loaded)
  assert len(list(cache.glob('*.npz'))) == split_cache._KEEP
  assert split_cache.size(config, 'test[:1]') is None  # The oldest went first.
  assert split_cache.size(config, f'test[:{split_cache._KEEP + 2}]') == 50
  gone = base_config(data_dir=str(tmp_path / 'gone'))
  (tmp_path / 'gone').mkdir()
  split_cache.store(gone, 'test', tmp_path / 'gone', loaded)
  (tmp_path / 'gone').rmdir()
  split_cache.store(config, 'test[:99]', _data_path(config), loaded)
  assert split_cache.size(gone, 'test') is None
  # 9 entries: the one of the removed dataset and the oldest go.
  assert len(list(cache.glob('*.npz'))) == split_cache._KEEP - 1


def test_checks_of_cached_splits_need_no_tfds_and_still_fail_in_one_line(cache, config,
                                                                        monkeypatch, tmp_path):
  tfds_source.load_split(config, 'train')
  tfds_source.load_split(config, 'test[:50]')
  _without_tfds(monkeypatch)
  checks.check(config, None, 'train', tmp_path / 'w')
  too_big = config.copy_and_resolve_references()
  too_big.batch_size = 400
  with pytest.raises(DataError, match=r"config.train_split='train' holds 300 examples, fewer "
                     r'than 400; widen the split or lower config.batch_size.'):
    checks.check(too_big, None, 'train', tmp_path / 'w')
  for classes in (5, 11):  # The dataset's 10 classes, recorded with the split, still count.
    other = config.copy_and_resolve_references()
    other.num_classes = classes
    with pytest.raises(DataError, match=rf"config.dataset='mnist' has images of shape "
                       rf'\(28, 28, 1\) and 10 label classes; this model needs 28x28x1 images '
                       rf'and {classes} classes'):
      checks.check(other, None, 'eval', tmp_path / 'w')


def test_a_cached_eval_imports_neither_tfds_nor_tensorflow(cache, tmp_path, tiny_idx_dir):
  flags = [f'--config={REPO}/configs/base.py', f'--config.data_dir={tmp_path}/tfds',
           f'--config.idx_dir={tiny_idx_dir}', '--config.train_split=train',
           '--config.eval_split=test', '--config.batch_size=100', '--config.num_epochs=1',
           '--config.progress_bar=False', f'--workdir={tmp_path}/w']
  code = f'''
import atexit, runpy, sys
atexit.register(lambda: print('imported:', sorted(
    {{m.split('.')[0] for m in sys.modules}} & {{'tensorflow', 'tensorflow_datasets'}})))
sys.argv = ['flax_mnist.main', *{flags!r}, *sys.argv[1:]]
runpy.run_module('flax_mnist.main', run_name='__main__')
'''
  trained = run_python(code)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'tensorflow_datasets' in trained.stdout  # The first run read through tfds.
  evaluated = run_python(code.replace("*sys.argv[1:]", "'--mode=eval'"))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'on 100 test samples' in evaluated.stdout
  assert evaluated.stdout.rstrip().endswith('imported: []'), evaluated.stdout[-1000:]
