"""Multi-process training: two processes with one CPU device each train exactly like one
process with two devices (loopback coordinator, gloo CPU collectives)."""

import json
import os
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
