"""flax_mnist/run_lock.py: one training run per workdir; the lock adds no file and goes with
the holder; readers beside a training run leave its save in progress alone."""

import shutil
import subprocess
import sys

import pytest
from orbax import checkpoint as ocp

from conftest import REPO, cpu_plan, small_config
from flax_mnist import loop, modes, run_lock
from flax_mnist.data import checks
from flax_mnist.errors import WorkdirError


def test_a_second_run_in_a_busy_workdir_fails_at_once_and_writes_nothing(tmp_path):
  with run_lock.held(tmp_path):
    with pytest.raises(WorkdirError, match=f'--workdir={tmp_path} is in use by another training '
                       'run; wait for it to end, or pass another --workdir.'):
      loop.train_and_evaluate(small_config(str(tmp_path / 'tfds')), str(tmp_path))
  assert not any(tmp_path.iterdir())
  assert not run_lock.busy(tmp_path)  # Released: free again.
  with run_lock.held(tmp_path):
    assert run_lock.busy(tmp_path)


def test_the_lock_goes_with_a_killed_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, pathlib; from flax_mnist import run_lock\n'
       f'with run_lock.held(pathlib.Path({str(tmp_path)!r})):\n'
       '  print("held", flush=True); sys.stdin.read()'],
      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    with pytest.raises(WorkdirError, match='in use by another training run'):
      with run_lock.held(tmp_path):
        pass
  finally:
    holder.kill()
    holder.wait()
  with run_lock.held(tmp_path):
    pass


def test_a_reader_beside_a_training_run_leaves_its_save_in_progress(trained_workdir,
                                                                    prepared_data_dir):
  """An eval (export, ...) opening the checkpoints removes the temporary folders of saves a
  kill cut short, unless a training run holds the workdir: then one is its save in progress."""
  saving = trained_workdir / 'checkpoints' / f'99{ocp.utils.TMP_DIR_SUFFIX}1'
  saving.mkdir()
  config = small_config(prepared_data_dir)
  try:
    with run_lock.held(trained_workdir):
      modes.restore(config, cpu_plan(config), str(trained_workdir), 'latest')
    assert saving.is_dir()
    modes.restore(config, cpu_plan(config), str(trained_workdir), 'latest')
    assert not saving.exists()  # Alone: a leftover, removed.
  finally:
    shutil.rmtree(saving, ignore_errors=True)


def test_only_complete_step_folders_count_as_checkpoints(tmp_path):
  folder = tmp_path / 'checkpoints'
  folder.mkdir()
  (folder / f'10{ocp.utils.TMP_DIR_SUFFIX}1').mkdir()  # A save cut short: not a checkpoint.
  assert not checks.has_checkpoints(tmp_path)
  (folder / '5').mkdir()
  assert checks.has_checkpoints(tmp_path)
