"""flax_mnist/run_lock.py: one training run per workdir; the lock adds no file and goes with
the holder."""

import subprocess
import sys

import pytest

from conftest import REPO, small_config
from flax_mnist import loop, run_lock
from flax_mnist.errors import WorkdirError


def test_a_second_run_in_a_busy_workdir_fails_at_once_and_writes_nothing(tmp_path):
  with run_lock.held(tmp_path):
    with pytest.raises(WorkdirError, match=f'--workdir={tmp_path} is in use by another training '
                       'run; wait for it to end, or pass another --workdir.'):
      loop.train_and_evaluate(small_config(str(tmp_path / 'tfds')), str(tmp_path))
  assert not any(tmp_path.iterdir())
  with run_lock.held(tmp_path):  # Released: free again.
    pass


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
