"""Multi-process training: two processes with one CPU device each train exactly like one
process with two devices (loopback coordinator, gloo CPU collectives), and a stop signal to
either stops both after the same step, with one checkpoint to resume from exactly."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, base_config, cpu_plan
from flax_mnist import distributed, modes, schema, sharding
from flax_mnist.data import batches
from flax_mnist.errors import ConfigError

_TIMEOUT = 240  # Seconds for one run; the two processes take ~40 s here.
_SETTINGS = dict(train_split='train[:600]', eval_split='test[:300]', batch_size=200,
                 eval_batch_size=200, num_epochs=2, progress_bar=False)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, devices: int, *extra):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  command = [sys.executable, '-m', 'flax_mnist.main', '--config', 'configs/base.py',
             f'--workdir={workdir}', f'--config.data_dir={data_dir}',
             *(f'--config.{k}={v}' for k, v in _SETTINGS.items()), *extra]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(processes) -> list[str]:
  """Waits for every process (bounded); returns their stdouts, or fails with their stderr."""
  outputs = []
  try:
    for process in processes:
      out, err = process.communicate(timeout=_TIMEOUT)
      assert process.returncode == 0, err[-3000:]
      outputs.append(out)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  return outputs


def _params(workdir):
  config = base_config(**_SETTINGS)
  restored = modes.restore(config, cpu_plan(config), str(workdir), 'latest')
  state, meta = restored.state, restored.meta
  return int(state.step), meta['history'], jax.tree.leaves(jax.device_get(state.params))


def test_two_processes_train_like_one_process_with_two_devices(prepared_data_dir, tmp_path):
  one = _finish([_start(tmp_path / 'one', prepared_data_dir, 2)])[0]
  address = f'127.0.0.1:{_free_port()}'
  outputs = _finish([_start(tmp_path / 'two', prepared_data_dir, 1,
                            f'--config.coordinator_address={address}',
                            '--config.num_processes=2', f'--config.process_id={i}')
                     for i in (0, 1)])
  assert 'Plan: cpu x2 - ' in one and 'Plan: cpu x2 on 2 processes - ' in outputs[0]
  assert 'Epoch 2/2' in outputs[0]
  # Only process 0 prints (gloo's C++ start-up line aside).
  assert [line for line in outputs[1].splitlines() if not line.startswith('[Gloo]')] == []
  rows = {name: [json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').open()]
          for name in ('one', 'two')}
  assert [r['epoch'] for r in rows['two']] == [1, 2]
  for single, multi in zip(rows['one'], rows['two']):
    for key in ('loss', 'accuracy', 'val_loss', 'val_accuracy'):
      np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-6)
  assert (tmp_path / 'two' / 'keras_cnn.h5').is_file()
  step_one, _, params_one = _params(tmp_path / 'one')
  step_two, history, params_two = _params(tmp_path / 'two')
  assert step_one == step_two == 6 and len(history) == 2
  difference = max(float(np.abs(a - b).max()) for a, b in zip(params_one, params_two))
  print(f'2 processes vs 1 process: metrics {rows["two"]} vs {rows["one"]}; '
        f'max param difference {difference:.3g}')
  assert difference < 1e-5


_STOP_SETTINGS = ('--config.train_split=train[:1000]', '--config.batch_size=100',
                  '--config.num_epochs=3')


def _two_processes(workdir, data_dir, *extra):
  address = f'127.0.0.1:{_free_port()}'
  return [_start(workdir, data_dir, 1, f'--config.coordinator_address={address}',
                 '--config.num_processes=2', f'--config.process_id={i}', *_STOP_SETTINGS,
                 *extra) for i in (0, 1)]


def _final(workdir):
  config = base_config(**{**_SETTINGS, 'train_split': 'train[:1000]', 'batch_size': 100,
                          'num_epochs': 3})
  state = modes.restore(config, cpu_plan(config), str(workdir), 'latest').state
  return int(state.step), [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.fixture(scope='module')
def two_process_reference(prepared_data_dir, tmp_path_factory):
  """(step, params) at the end of an uninterrupted two-process run."""
  workdir = tmp_path_factory.mktemp('two_processes')
  _finish(_two_processes(workdir, prepared_data_dir))
  return _final(workdir)


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=['SIGTERM', 'Ctrl-C'])
def test_a_signal_to_one_process_stops_both_at_the_same_step(
    prepared_data_dir, two_process_reference, tmp_path, signum, code):
  workdir = tmp_path / 'w'
  processes = _two_processes(workdir, prepared_data_dir)
  try:
    for line in processes[0].stdout:  # Only process 0 prints.
      if line.startswith('Epoch 1/3'):
        processes[1].send_signal(signum)  # The other process is not signalled.
        break
    results = [p.communicate(timeout=_TIMEOUT) for p in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  for process, (_, err) in zip(processes, results):
    assert process.returncode == code, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: interrupted at step ') and 'resume exactly' in last, last
  assert len({err.strip().splitlines()[-1] for _, err in results}) == 1  # The same step.
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] < two_process_reference[0]
  _finish(_two_processes(workdir, prepared_data_dir))  # Resume: both processes, to the end.
  step, params = _final(workdir)
  assert step == two_process_reference[0]
  for got, want in zip(params, two_process_reference[1]):
    np.testing.assert_array_equal(got, want)


def test_process_rows_cover_the_batch_in_order():
  mesh = sharding.make_mesh()
  np.testing.assert_array_equal(sharding.process_rows(mesh, 4 * mesh.size),
                                np.arange(4 * mesh.size))


def test_process_shares_make_up_the_global_batches():
  split = batches.Split(images=np.arange(250, dtype=np.uint8).reshape(250, 1, 1, 1),
                               labels=np.arange(250, dtype=np.int32))
  halves = (np.arange(0, 50), np.arange(50, 100))
  for whole, *shares in zip(batches.train_batches(split, 100, 3, 1),
                            *(batches.train_batches(split, 100, 3, 1, h) for h in halves)):
    np.testing.assert_array_equal(np.concatenate([s[1] for s in shares]), whole[1])
  for whole, *shares in zip(batches.eval_batches(split, 100),
                            *(batches.eval_batches(split, 100, h) for h in halves)):
    for i in range(3):  # images, labels, mask; the last batch is half padding.
      np.testing.assert_array_equal(np.concatenate([s[i] for s in shares]), whole[i])


@pytest.mark.parametrize('setting, environ, expected', [
    ({}, {}, False),
    ({}, {'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1234'}, True),
    ({}, {'TPU_WORKER_HOSTNAMES': 'a,b'}, True),
    ({}, {'TPU_WORKER_HOSTNAMES': 'a'}, False),
    ({}, {'SLURM_NTASKS': '4'}, True),
    ({'coordinator_address': '10.0.0.2:1234'}, {}, True),
    ({'distributed': 'on'}, {}, True),
    ({'distributed': 'off'}, {'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1234'}, False),
])
def test_when_distributed_starts(setting, environ, expected):
  assert distributed.wanted(base_config(**setting), environ) is expected


def test_process_id_must_be_below_process_count():
  with pytest.raises(ConfigError, match='config.process_id=2 must be below'):
    schema.validate(base_config(num_processes=2, process_id=2))
  with pytest.raises(ConfigError, match='config.coordinator_address'):
    schema.validate(base_config(coordinator_address='no-port'))


def test_two_processes_train_lanes_like_one_process_with_two_devices(prepared_data_dir,
                                                                    tmp_path):
  """Lanes (config.num_models) over two processes: each lane's metrics as one process with two
  devices gives them, and every lane's files written once, by process 0."""
  lanes = ('--config.num_models=2', '--config.num_epochs=1')
  one = _finish([_start(tmp_path / 'one', prepared_data_dir, 2, *lanes)])[0]
  address = f'127.0.0.1:{_free_port()}'
  outputs = _finish([_start(tmp_path / 'two', prepared_data_dir, 1, *lanes,
                            f'--config.coordinator_address={address}',
                            '--config.num_processes=2', f'--config.process_id={i}')
                     for i in (0, 1)])
  assert 'Ensemble of 2' in one and 'Ensemble of 2' in outputs[0]
  assert [line for line in outputs[1].splitlines() if not line.startswith('[Gloo]')] == []
  rows = {name: [json.loads(line) for line in (tmp_path / name / 'summary.jsonl').open()]
          for name in ('one', 'two')}
  assert len(rows['two']) == 1 and rows['two'][0]['models'] == 2
  keys = ('loss_mean', 'val_loss_mean', 'val_accuracy_mean', 'ensemble_val_accuracy')
  np.testing.assert_allclose([rows['two'][0][k] for k in keys],
                             [rows['one'][0][k] for k in keys], rtol=1e-5, atol=1e-6)
  for lane in (0, 1):
    folder = tmp_path / 'two' / 'models' / str(lane)
    single, multi = (json.loads((tmp_path / name / 'models' / str(lane) / 'metrics.jsonl')
                                .read_text()) for name in ('one', 'two'))
    for key in ('loss', 'accuracy', 'val_loss', 'val_accuracy'):
      np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-6)
    assert (folder / 'keras_cnn.h5').is_file()
  assert rows['two'][0]['loss_std'] > 0  # The lanes are different models (seeds 42, 43).
