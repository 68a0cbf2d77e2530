"""SIGTERM (preemption) is handled like Ctrl-C: the step finishes, a checkpoint of it is saved,
the process exits 143 with one line saying how to resume, and the resumed run ends bit for bit
as an uninterrupted one."""

import os
import signal
import subprocess
import time

import pytest

from conftest import REPO
from flax_mnist import interrupt, loop, sharding
from flax_mnist import checkpoints as checkpoints_lib
from test_faults import (assert_same_params, cli, cli_env, final_params, tiny_config,
                         without_timings)


@pytest.fixture(scope='module')
def uninterrupted(prepared_data_dir, tmp_path_factory):
  """(history, final params) of an uninterrupted tiny run."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  config = tiny_config(prepared_data_dir)
  history = loop.train_and_evaluate(config, str(workdir))
  return history, final_params(config, workdir)


def test_sigterm_mid_epoch_saves_that_step_and_resumes_bit_for_bit(
    prepared_data_dir, uninterrupted, tmp_path, monkeypatch):
  workdir = tmp_path / 'w'
  config = tiny_config(prepared_data_dir)
  real_put, fed = sharding.put_batch, []

  def put_batch(mesh, *arrays):
    if len(arrays) == 2:  # A training batch (eval batches carry a mask too).
      fed.append(1)
      if len(fed) == 13:  # Epoch 2, batch 3: the preemption notice arrives while it is fed.
        os.kill(os.getpid(), signal.SIGTERM)
    return real_put(mesh, *arrays)
  monkeypatch.setattr(sharding, 'put_batch', put_batch)
  with pytest.raises(interrupt.Interrupted, match=r'^interrupted at step 13 \(epoch 2, batch 3\)'
                     ) as stopped:
    loop.train_and_evaluate(config, str(workdir))
  assert stopped.value.exit_code == 143
  monkeypatch.undo()
  with checkpoints_lib.open_checkpoints(workdir) as checkpoints:
    assert checkpoints.steps() == [10, 13]
    assert checkpoints.read_meta(13)['partial']['batches'] == 3
  history = loop.train_and_evaluate(config, str(workdir))
  assert without_timings(history) == without_timings(uninterrupted[0])
  assert_same_params(final_params(config, workdir), uninterrupted[1])


def test_sigterm_on_the_command_line_exits_143_with_one_line(
    prepared_data_dir, uninterrupted, tmp_path):
  workdir = tmp_path / 'w'
  command = cli(workdir, prepared_data_dir)
  process = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  for line in process.stdout:
    if line.startswith('Epoch 1/3'):
      process.send_signal(signal.SIGTERM)
      sent = time.perf_counter()
      break
  _, stderr = process.communicate(timeout=300)
  seconds = time.perf_counter() - sent
  assert process.returncode == 143, stderr[-2000:]
  lines = stderr.strip().splitlines()
  assert lines[-1].startswith('error: interrupted at step 1') and lines[-1].endswith(
      'Run the same command again to resume exactly where it stopped.'), lines[-1]
  assert any(line.startswith('Terminated (SIGTERM): stopping after the current step')
             for line in lines)
  assert 'Traceback' not in stderr
  print(f'SIGTERM to exit: {seconds:.2f} s')  # benchmarks/preemption.py: the base model's.
  resumed = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'Resumed from epoch ' in resumed.stdout
  assert_same_params(final_params(tiny_config(prepared_data_dir), workdir), uninterrupted[1])
