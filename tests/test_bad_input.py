"""Bad input on the command line: each fails before any work with one `error:` line, exit 2,
and writes nothing (no workdir, no prepared dataset), whether or not the dataset was prepared
before."""

import gzip
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO, base_config


def _run(tmp_path, *flags, mode='train'):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  command = [sys.executable, '-m', 'flax_mnist.main', '--config', 'configs/base.py',
             f'--workdir={tmp_path / "w"}', f'--mode={mode}', *flags]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _assert_one_line_and_nothing_written(result, tmp_path, *expected):
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
  assert 'Traceback' not in result.stderr and 'Variant folder' not in result.stderr
  for text in expected:
    assert text in errors[0], errors[0]
  assert not (tmp_path / 'w').exists()
  assert not (tmp_path / 'tfds').exists() or not any((tmp_path / 'tfds').iterdir())


def _malformed_idx(tmp_path, mnist_dir):
  folder = tmp_path / 'idx'
  shutil.copytree(mnist_dir, folder)
  labels = folder / 't10k-labels-idx1-ubyte.gz'
  data = gzip.decompress(labels.read_bytes())
  labels.write_bytes(gzip.compress(data[:-100]))  # Truncated: 100 labels short.
  return folder


def _not_hdf5(tmp_path):
  path = tmp_path / 'weights.h5'
  path.write_text('not an HDF5 file')
  return path


@pytest.mark.parametrize('flags, expected', [
    (['--config.batch_size=0'], ['config.batch_size=0 is invalid: must be a positive integer']),
    (['--config.num_epochs=-2'], ['config.num_epochs=-2 is invalid']),
    (['--config.conv1_features=0'], ['config.conv1_features=0 is invalid']),
    (['--config.kernel_size=15'], ['config.kernel_size=15 is invalid: must be between 1 and 14']),
    (['--config.learnig_rate=0.1'], ['unknown config field', 'learnig_rate']),
    (['--config.dataset=mnits'], ["config.dataset='mnits' is not a tfds dataset"]),
    (['--config.dataset=cifar10'], ["config.dataset='cifar10' has images of shape (32, 32, 3)",
                                    'needs 28x28x1 images and 10 classes']),
    (['--config.dataset=emnist'], ['62 label classes']),
], ids=['batch_size', 'num_epochs', 'features', 'kernel', 'mistyped', 'unknown_dataset',
        'not_28x28x1', 'not_10_classes'])
def test_bad_config(tmp_path, flags, expected):
  result = _run(tmp_path, f'--config.data_dir={tmp_path / "tfds"}', *flags)
  _assert_one_line_and_nothing_written(result, tmp_path, *expected)


def test_malformed_idx_files(tmp_path, mnist_dir):
  folder = _malformed_idx(tmp_path, mnist_dir)
  result = _run(tmp_path, f'--config.data_dir={tmp_path / "tfds"}',
                f'--config.idx_dir={folder}')
  _assert_one_line_and_nothing_written(result, tmp_path, 't10k-labels-idx1-ubyte.gz: header '
                                       'promises 10000 bytes', 'truncated or corrupt')


def test_bad_split(tmp_path, prepared_data_dir):
  result = _run(tmp_path, f'--config.data_dir={prepared_data_dir}', '--config.eval_split=tset')
  _assert_one_line_and_nothing_written(result, tmp_path, "config.eval_split='tset'",
                                       "Unknown split 'tset'")


@pytest.mark.parametrize('flags, expected', [
    (['--config.eval_split=validation'], ["config.eval_split='validation'",
                                          "Unknown split 'validation'"]),
    (['--config.train_split=train[:99999999]'], ["config.train_split='train[:99999999]'",
                                                 'incompatible with 60000 examples']),
    (['--config.train_split=train[:100]'], ["config.train_split='train[:100]' holds 100 "
                                            'examples, fewer than 500']),
    (['--config.dataset=fashion_mnist'], ["train-labels-idx1-ubyte.gz is one of mnist's IDX "
                                          'files (tfds registers its SHA-256 for mnist), not '
                                          "fashion_mnist's; pass --config.dataset=mnist"]),
], ids=['unknown_split', 'split_too_large', 'split_smaller_than_batch', 'another_datasets_files'])
def test_bad_split_on_first_run(tmp_path, mnist_dir, flags, expected):
  """An empty data_dir: split sizes come from the IDX files, before anything is prepared."""
  result = _run(tmp_path, f'--config.data_dir={tmp_path / "tfds"}',
                f'--config.idx_dir={mnist_dir}', *flags)
  _assert_one_line_and_nothing_written(result, tmp_path, *expected)
  assert 'Downloading and preparing' not in result.stdout


def test_init_from_not_hdf5_on_first_run(tmp_path, mnist_dir):
  result = _run(tmp_path, f'--config.data_dir={tmp_path / "tfds"}', f'--config.idx_dir={mnist_dir}',
                f'--config.init_from={_not_hdf5(tmp_path)}')
  _assert_one_line_and_nothing_written(result, tmp_path, 'weights.h5 is not an HDF5 file')


def test_offline_without_idx_dir_fails_fast(tmp_path):
  """No network and no idx_dir: one line within seconds, not minutes of tfds' retries. The
  download host is a closed local port, so the test means the same with or without a network."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  argv = ['flax_mnist.main', '--config', 'configs/base.py', f'--workdir={tmp_path / "w"}',
          f'--config.data_dir={tmp_path / "tfds"}']
  code = ('import runpy, sys\n'
          'from flax_mnist.data import prepare\n'
          f'prepare.download_hosts = lambda builder: [("127.0.0.1", {port})]\n'
          f'sys.argv = {argv!r}\n'
          'runpy.run_module("flax_mnist.main", run_name="__main__")\n')
  start = time.perf_counter()
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
  seconds = time.perf_counter() - start
  assert result.stderr.splitlines() == [
      f"error: cannot download 'mnist': no connection to 127.0.0.1:{port}: "
      'ConnectionRefusedError: [Errno 111] Connection refused; to work offline, put the four '
      'IDX files in a folder and pass --config.idx_dir=FOLDER.'], result.stderr[-3000:]
  assert result.returncode == 2
  assert 'Downloading and preparing' not in result.stdout
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'tfds').exists()
  assert seconds < 60, seconds  # Start-up (JAX, TensorFlow) and a refused connection.


def test_init_from_not_hdf5(tmp_path, prepared_data_dir):
  result = _run(tmp_path, f'--config.data_dir={prepared_data_dir}',
                f'--config.init_from={_not_hdf5(tmp_path)}')
  _assert_one_line_and_nothing_written(result, tmp_path, 'weights.h5 is not an HDF5 file')


def test_init_from_another_architecture(tmp_path, prepared_data_dir, trained_workdir):
  result = _run(tmp_path, f'--config.data_dir={prepared_data_dir}', '--config.kernel_size=5',
                f'--config.init_from={trained_workdir / "keras_cnn.h5"}')
  _assert_one_line_and_nothing_written(result, tmp_path, "layer 'conv2d' has weights of shapes "
                                       '[(3, 3, 1, 32), (32,)]', 'needs [(5, 5, 1, 32), (32,)]')


def test_predict_path_that_is_not_an_image(tmp_path, prepared_data_dir, trained_workdir):
  notes = tmp_path / 'notes.png'
  notes.write_text('shopping list')
  Image.new('L', (28, 28)).save(tmp_path / 'unused.png')  # Not named: must not matter.
  result = _run(tmp_path, f'--config.data_dir={prepared_data_dir}', f'--images={notes}',
                f'--config.init_from={trained_workdir / "keras_cnn.h5"}', mode='predict')
  _assert_one_line_and_nothing_written(result, tmp_path, f'{notes}: not a readable image')


@pytest.mark.parametrize('below', [False, True])
def test_workdir_that_is_a_file_on_first_run(tmp_path, mnist_dir, below):
  """--workdir=FILE (or FILE/run): one line before the dataset is prepared."""
  blocker = tmp_path / 'notes.txt'
  blocker.write_text('a file')
  workdir = blocker / 'run' if below else blocker
  result = _run(tmp_path, f'--config.data_dir={tmp_path / "tfds"}',
                f'--config.idx_dir={mnist_dir}', f'--workdir={workdir}')
  _assert_one_line_and_nothing_written(result, tmp_path, f'error: --workdir={workdir}: '
                                       f'{blocker} is a file, not a folder')
  assert blocker.read_text() == 'a file'


def test_workdir_that_is_a_link_to_nothing(tmp_path):
  from flax_mnist.data import checks
  from flax_mnist.errors import WorkdirError
  (tmp_path / 'w').symlink_to(tmp_path / 'gone')
  with pytest.raises(WorkdirError, match=f'{tmp_path}/w is a link to nothing, not a folder'):
    checks.check_folder(tmp_path / 'w' / 'run', '--workdir')
  checks.check_folder(tmp_path / 'new' / 'run', '--workdir', writes=True)  # Not there yet.


def test_checkpoint_folder_blocked(tmp_path, prepared_data_dir):
  (tmp_path / 'w').mkdir()
  (tmp_path / 'w' / 'checkpoints').write_text('a file where the folder should be')
  result = _run(tmp_path, f'--config.data_dir={prepared_data_dir}',
                '--config.train_split=train[:200]', '--config.batch_size=100')
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: cannot use {tmp_path}/w/checkpoints as the checkpoint folder (File exists)')
  assert sorted(p.name for p in (tmp_path / 'w').iterdir()) == ['checkpoints']


@pytest.mark.parametrize('flags, expected', [
    (['--workdir=/proc/w/run'], 'error: --workdir=/proc/w/run: /proc cannot be written'),
    (['--mode=export', '--output=/proc/m.h5'], 'error: --output=/proc/m.h5: /proc cannot be '
     'written'),
], ids=['workdir', 'export_output'])
def test_folders_that_cannot_be_written(tmp_path, flags, expected):
  """/proc takes no new files, even from root (where permission bits would not stop a write)."""
  result = _run(tmp_path, f'--config.data_dir={tmp_path / "tfds"}', *flags)
  _assert_one_line_and_nothing_written(result, tmp_path, expected)


@pytest.mark.parametrize('mode, workdir, output, flag', [
    ('train', 'gs://bucket/run', '', '--workdir=gs://bucket/run'),
    ('predict', 'gs://bucket/run', '', '--workdir=gs://bucket/run'),
    ('export', 'w', 's3://bucket/m.h5', '--output=s3://bucket/m.h5'),
])
def test_a_url_for_a_folder_is_refused(tmp_path, monkeypatch, mode, workdir, output, flag):
  """pathlib reads gs://bucket/run as the local folder gs:/bucket/run: refused, not created."""
  from flax_mnist.data import checks
  from flax_mnist.errors import WorkdirError
  monkeypatch.chdir(tmp_path)
  with pytest.raises(WorkdirError, match=f'^{flag}: a URL; flax_mnist writes to local folders '
                     'only'):
    checks.check(base_config(), None, mode, workdir, output=output)
  assert not list(tmp_path.iterdir())


def test_a_read_only_workdir_still_predicts_and_exports_elsewhere(tmp_path, monkeypatch):
  from flax_mnist.data import checks
  from flax_mnist.errors import WorkdirError

  def refuse(**_):
    raise PermissionError(13, 'Permission denied')
  (tmp_path / 'w').mkdir()
  monkeypatch.setattr(checks.tempfile, 'TemporaryFile', refuse)
  for mode in ('train', 'eval', 'report', 'export'):
    with pytest.raises(WorkdirError, match=f'--workdir={tmp_path}/w: {tmp_path}/w cannot be '
                       r'written \(Permission denied\); pass another --workdir.'):
      checks.check(base_config(), None, mode, tmp_path / 'w')
  checks.check(base_config(), None, 'predict', tmp_path / 'w')  # Reads the workdir only.
  with pytest.raises(WorkdirError, match='--output=/x/m.h5: / cannot be written'):
    checks.check(base_config(), None, 'export', tmp_path / 'w', output='/x/m.h5')


@pytest.mark.parametrize('lanes', [1, 3])
def test_a_folder_where_the_keras_file_goes_is_refused_before_training(tmp_path, lanes):
  """Training writes WORKDIR/keras_cnn.h5 (each lane's in models/<lane>/) at its end."""
  import types
  from flax_mnist.data import checks
  from flax_mnist.errors import WorkdirError
  folder = tmp_path / 'w' / ('models/2/keras_cnn.h5' if lanes > 1 else 'keras_cnn.h5')
  folder.mkdir(parents=True)
  for mode in ('train', 'export'):
    with pytest.raises(WorkdirError, match=f'^{folder}: a folder where the run writes its Keras '
                       'file; move it away, or pass another --workdir.$'):
      checks.check(base_config(), types.SimpleNamespace(lanes=lanes), mode, tmp_path / 'w')
  checks.check(base_config(), None, 'export', tmp_path / 'w', output=str(tmp_path / 'm.h5'))


def test_init_from_beside_checkpoints_is_named_as_not_read(tmp_path, capsys):
  """A resume (the same command again) keeps its init_from; the run says it reads the
  checkpoints instead, even when the file is gone, rather than ignoring it in silence."""
  from flax_mnist.data import checks
  (tmp_path / 'w' / 'checkpoints' / '10').mkdir(parents=True)
  config = base_config(init_from=str(tmp_path / 'gone.h5'))
  checks.check(config, None, 'predict', tmp_path / 'w')
  assert capsys.readouterr().out == (f'Not reading config.init_from={tmp_path}/gone.h5: '
                                     f'{tmp_path}/w has checkpoints, which --mode=predict reads '
                                     'instead.\n')
