"""Faults done for real: Ctrl-C, damaged checkpoints, failed writes. Kills: test_kill.py.

Every recovery must be exact: the run that went through the fault ends with the same params,
bit for bit, as one that did not.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import REPO, cpu_plan, small_config
from flax_mnist import checkpoints as checkpoints_lib
from flax_mnist import interrupt, loop, modes, sharding
from flax_mnist.reporting import jsonl

# A model small enough that compiling and training take seconds on 2 cores.
TINY = dict(train_split='train[:1000]', eval_split='test[:200]', batch_size=100,
            eval_batch_size=100, num_epochs=3, conv1_features=4, conv2_features=8,
            dense_features=16, micro_batch_size=100)
TINY_FLAGS = [f'--config.{k}={v}' for k, v in TINY.items()] + ['--config.progress_bar=False']


def tiny_config(data_dir, **overrides):
  return small_config(data_dir, **{**TINY, **overrides})


def final_params(config, workdir):
  state = modes.restore(config, cpu_plan(config), str(workdir), 'latest').state
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def assert_same_params(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def without_timings(rows):
  return [{k: v for k, v in r.items() if k not in ('seconds', 'samples_per_second')}
          for r in rows]


@pytest.fixture(scope='session')
def reference(prepared_data_dir, tmp_path_factory):
  """An uninterrupted tiny run: (workdir, history, final params)."""
  workdir = tmp_path_factory.mktemp('reference')
  config = tiny_config(prepared_data_dir)
  history = loop.train_and_evaluate(config, str(workdir))
  return workdir, history, final_params(config, workdir)


def cli(workdir, data_dir, *flags):
  """The training command line as a list, for subprocess."""
  return [sys.executable, '-m', 'flax_mnist.main', '--config', 'configs/base.py',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}', *TINY_FLAGS, *flags]


def cli_env(cache_dir=None):
  """The environment for the command line; `cache_dir`: a JAX compilation cache to share."""
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
  if cache_dir:  # Restarts then compile in a blink instead of seconds.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


@pytest.fixture(scope='session')
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def test_ctrl_c_mid_epoch_saves_and_resumes_bit_for_bit(prepared_data_dir, reference, tmp_path,
                                                        monkeypatch, capsys):
  workdir = tmp_path / 'w'
  config = tiny_config(prepared_data_dir)
  real_put = sharding.put_batch
  train_batches = []
  handler = signal.getsignal(signal.SIGINT)

  def put_batch(mesh, *arrays):
    if len(arrays) == 2:  # A training batch (eval batches carry a mask too).
      train_batches.append(1)
      if len(train_batches) == 13:  # Epoch 2, batch 3: Ctrl-C arrives while it is fed.
        os.kill(os.getpid(), signal.SIGINT)
    return real_put(mesh, *arrays)
  monkeypatch.setattr(sharding, 'put_batch', put_batch)
  with pytest.raises(interrupt.Interrupted,
                     match=r'^interrupted at step 13 \(epoch 2, batch 3\).*resume exactly'):
    loop.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  assert signal.getsignal(signal.SIGINT) == handler  # Training's handler is gone again.
  with checkpoints_lib.open_checkpoints(workdir) as checkpoints:
    assert checkpoints.steps() == [10, 13]
    assert checkpoints.best_step() == 10  # A mid-epoch checkpoint has no val_accuracy.
    assert checkpoints.read_meta(13)['partial']['batches'] == 3
  plan = cpu_plan(config)
  assert modes.restore(config, plan, str(workdir), 'latest').describe() == (
      'step 13 (3 batches into epoch 2, saved mid-epoch)')
  assert modes.restore(config, plan, str(workdir), 'best').describe() == 'step 10 (epoch 1)'
  capsys.readouterr()
  history = loop.train_and_evaluate(config, str(workdir))
  assert without_timings(history) == without_timings(reference[1])
  assert_same_params(final_params(config, workdir), reference[2])
  out = capsys.readouterr().out  # The epoch's rate is that of the 7 batches trained since.
  assert f'Resumed from epoch 1, step 13: 3 of 10 batches into epoch 2 ({workdir}' in out
  assert f'Epoch 2/{config.num_epochs} - {10 * config.batch_size} samples ' \
         f'({7 * config.batch_size} since resuming) - ' in out


def test_ctrl_c_on_the_command_line(prepared_data_dir, reference, tmp_path, jax_cache):
  workdir = tmp_path / 'w'
  command = cli(workdir, prepared_data_dir)
  process = subprocess.Popen(command, cwd=REPO, env=cli_env(jax_cache), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  for line in process.stdout:
    if line.startswith('Epoch 1/3'):
      process.send_signal(signal.SIGINT)
      break
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == interrupt.EXIT_CODE, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: interrupted at step 1') and last.endswith(
      'Run the same command again to resume exactly where it stopped.'), last
  assert 'Traceback' not in stderr
  resumed = subprocess.run(command, cwd=REPO, env=cli_env(jax_cache), capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'Resumed from epoch ' in resumed.stdout
  assert_same_params(final_params(tiny_config(prepared_data_dir), workdir), reference[2])


def _truncate(step_dir):
  for path in (step_dir / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 100:
      os.truncate(path, path.stat().st_size // 2)


def _delete_part(step_dir):
  shutil.rmtree(step_dir / 'state' / 'd', ignore_errors=True)
  shutil.rmtree(step_dir / 'state' / 'ocdbt.process_0', ignore_errors=True)


@pytest.mark.parametrize('damage', [_truncate, _delete_part], ids=['truncated', 'deleted'])
def test_damaged_newest_checkpoint_falls_back_and_continues(prepared_data_dir, reference,
                                                            tmp_path, capsys, damage):
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  damage(workdir / 'checkpoints' / '30')
  config = tiny_config(prepared_data_dir)
  history = loop.train_and_evaluate(config, str(workdir))
  out, err = capsys.readouterr()
  warnings = [line for line in err.splitlines() if line.startswith('warning:')]
  assert len(warnings) == 1 and 'checkpoint step 30 cannot be read' in warnings[0]
  assert 'resuming from step 20' in warnings[0]
  assert 'Resumed from epoch 2, step 20' in out
  assert (workdir / 'checkpoints_unreadable' / '30').is_dir()  # Kept for a look, out of the way.
  assert without_timings(history) == without_timings(reference[1])
  assert_same_params(final_params(config, workdir), reference[2])
  assert [r['epoch'] for r in jsonl.read(workdir / 'metrics.jsonl')] == [1, 2, 3]


def test_eval_of_a_damaged_checkpoint_is_one_line(prepared_data_dir, reference, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  _truncate(workdir / 'checkpoints' / '30')
  with pytest.raises(checkpoints_lib.UnreadableCheckpoint,
                     match=r'checkpoint step 30 in .* cannot be read .*Other checkpoints: 10, '
                           r'20 \(pass --step=N\)'):
    config = tiny_config(prepared_data_dir)
    modes.run_eval(config, cpu_plan(config), str(workdir), 'latest')


def test_all_checkpoints_damaged_moves_nothing(prepared_data_dir, reference, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  for step in (10, 20, 30):
    _delete_part(workdir / 'checkpoints' / str(step))
  with pytest.raises(checkpoints_lib.UnreadableCheckpoint, match='checkpoint step 30'):
    loop.train_and_evaluate(tiny_config(prepared_data_dir), str(workdir))
  assert not (workdir / 'checkpoints_unreadable').exists()


def test_incomplete_checkpoint_folder_is_ignored_and_removed(prepared_data_dir, reference,
                                                             tmp_path, capsys):
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  # What a kill during the save of step 30 leaves: its temporary folder, step 30 never renamed.
  (workdir / 'checkpoints' / '30').rename(workdir / 'checkpoints' / '30.orbax-checkpoint-tmp')
  config = tiny_config(prepared_data_dir)
  history = loop.train_and_evaluate(config, str(workdir))
  assert 'removed 30.orbax-checkpoint-tmp' in capsys.readouterr().err
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['10', '20', '30']
  assert without_timings(history) == without_timings(reference[1])
  assert_same_params(final_params(config, workdir), reference[2])


def test_checkpoint_folder_in_the_way_is_one_line(prepared_data_dir, tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'checkpoints').write_text('not a folder')
  with pytest.raises(checkpoints_lib.CheckpointWriteError,
                     match=r'cannot use .*/w/checkpoints as the checkpoint folder'):
    loop.train_and_evaluate(tiny_config(prepared_data_dir), str(workdir))


_FULL_DISK = '''
import resource, runpy, sys
# Files may grow to 64 KB: metrics lines fit, a checkpoint's arrays do not (EFBIG, as ENOSPC).
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
sys.argv = {argv!r}
runpy.run_module('flax_mnist.main', run_name='__main__')
'''


def test_full_disk_is_one_line_and_older_checkpoints_stay(prepared_data_dir, reference,
                                                          tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  for step in ('20', '30'):
    shutil.rmtree(workdir / 'checkpoints' / step)
  argv = cli(workdir, prepared_data_dir)[2:]
  argv[0] = 'flax_mnist.main'
  result = subprocess.run([sys.executable, '-c', _FULL_DISK.format(argv=argv)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: could not write a checkpoint to {workdir}/checkpoints (')
  assert 'File too large' in last and last.endswith(
      'checkpoint step 10 is intact. Free disk space or fix the folder, then run the same '
      'command again.')
  # orbax's threads may still print 'Exception ignored ... Event loop is closed' as the process
  # exits (its race, not an error of the run); no traceback may come from this package.
  assert 'flax_mnist/' not in result.stderr and result.stderr.count('error:') == 1
  config = tiny_config(prepared_data_dir)
  with checkpoints_lib.open_checkpoints(workdir) as checkpoints:  # Also clears the failed write.
    assert checkpoints.steps() == [10]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['10']
  loop.train_and_evaluate(config, str(workdir))  # Room again: goes on, exactly.
  assert_same_params(final_params(config, workdir), reference[2])


_TMP = 'checkpoints/*.orbax-checkpoint-tmp*'


def _kill_at(command, env, moment, rng, workdir):
  """Starts `command` and SIGKILLs it at `moment`; returns what the kill hit, in words."""
  start = time.monotonic()
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  compiled = threading.Event()  # Training begins right after the line that sets it.

  def read():
    for line in process.stdout:
      if line.startswith(('Compiled', 'Already finished')):
        compiled.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  if moment == 'start-up':  # Imports, data loading, compiling: however fast they are.
    compiled.wait(rng.uniform(0.5, 6.0))
  else:
    compiled.wait(300)
    if moment == 'training':
      time.sleep(rng.uniform(0.0, 3.0))
    else:  # 'checkpoint write': the moment orbax's temporary folder appears.
      while process.poll() is None and not list(workdir.glob(_TMP)):
        time.sleep(0.0005)
  process.kill()
  process.wait()
  reader.join()
  folder = workdir / 'checkpoints'
  names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  return (f'{moment} kill at {time.monotonic() - start:.1f}s (exit {process.returncode}): '
          f'left {names}')


def test_sigkill_at_random_moments_then_the_same_command_finishes_bit_for_bit(
    prepared_data_dir, reference, tmp_path, jax_cache):
  rng = random.Random(6)  # Fixed: the same moments on every run of the test.
  workdir = tmp_path / 'w'
  command = cli(workdir, prepared_data_dir)
  env = cli_env(jax_cache)
  hits = [_kill_at(command, env, moment, rng, workdir)
          for moment in ('start-up', 'checkpoint write', 'training')]
  print('\n'.join(hits))
  assert 'orbax-checkpoint-tmp' in hits[1]  # The second kill did land inside a write.
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not list(workdir.glob('checkpoints/*tmp*'))
  assert [r['epoch'] for r in jsonl.read(workdir / 'metrics.jsonl')] == [1, 2, 3]
  assert_same_params(final_params(tiny_config(prepared_data_dir), workdir), reference[2])


@pytest.mark.parametrize('num_models', [1, 2])
def test_ctrl_c_before_the_first_step_leaves_no_outputs(prepared_data_dir, tmp_path,
                                                        monkeypatch, num_models):
  """Stopped while compiling: no metrics, lane folders or TensorBoard files of a run that
  trained nothing (the next run starts as if this one had not)."""
  workdir = tmp_path / 'w'
  real_compile = loop.compile_eval

  def compile_eval(*args):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the steps compile.
    return real_compile(*args)
  monkeypatch.setattr(loop, 'compile_eval', compile_eval)
  with pytest.raises(interrupt.Interrupted, match='^interrupted before the first step'):
    loop.train_and_evaluate(tiny_config(prepared_data_dir, num_models=num_models), str(workdir))
  left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))
  assert left == ['checkpoints'], left
