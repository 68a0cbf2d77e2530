"""The two epoch engines: device-resident epochs (one lax.scan each) give the host-fed path's
numbers, and either resumes an epoch cut short with nothing compiled at run time."""

import logging

import jax
import numpy as np
import pytest

from conftest import assert_adam_params_close, cpu_plan, small_config
from flax_mnist import epochs, interrupt, loop, modes, sharding, steps
from flax_mnist.data import batches, tfds_source
from flax_mnist.reporting import console
from flax_mnist.reporting import tensorboard
from test_tensorboard import read_scalars


def test_device_epochs_equal_host_fed_epochs(prepared_data_dir, tmp_path):
  runs = {}
  for mode in ('off', 'on'):
    config = small_config(prepared_data_dir, device_data=mode, log_every_steps=3)
    plan = cpu_plan(config)
    assert plan.device_data == (mode == 'on')
    rows = loop.train_and_evaluate(config, str(tmp_path / mode), plan)
    state = modes.restore(config, plan, str(tmp_path / mode), 'latest').state
    runs[mode] = rows, jax.tree.leaves(jax.device_get(state.params)), read_scalars(
        tmp_path / mode / tensorboard.LOG_DIR)
  # The two compiled programs round differently (the conv's custom backward fuses differently
  # inside the epoch's scan), by a few float32 ulps of the means, more on some CPUs than others.
  for host_row, device_row in zip(runs['off'][0], runs['on'][0]):
    for key in ('loss', 'accuracy', 'val_loss', 'val_accuracy'):
      np.testing.assert_allclose(device_row[key], host_row[key], rtol=1e-5)
  assert_adam_params_close(runs['on'][1], runs['off'][1], config.learning_rate)
  for tag in ('steps/loss', 'steps/accuracy'):  # TensorBoard every 3 steps, on both paths.
    host, device = runs['off'][2][tag], runs['on'][2][tag]
    assert [s for s, _ in host] == [s for s, _ in device] == [3, 6, 9]
    np.testing.assert_allclose([v for _, v in device], [v for _, v in host], rtol=1e-5)


def test_epoch_rows_are_the_host_batches():
  split = batches.Split(images=np.zeros((1050, 28, 28, 1), np.uint8),
                        labels=np.arange(1050, dtype=np.int32))
  host = [labels for _, labels in batches.train_batches(split, 100, seed=4, epoch=2)]
  np.testing.assert_array_equal(epochs.epoch_rows(1050, 100, seed=4, epoch=2), host)


def _engine_and_state(config, split, resume=None):
  plan = cpu_plan(config)
  graphdef, state, tx = steps.create(config, plan)
  mesh = sharding.make_mesh()
  state = jax.device_put(state, sharding.replicated(mesh))
  return epochs.build(graphdef, tx, state, mesh, plan, config, split, resume), state


def _progress():
  return epochs.Progress(console.ProgressBar(5, enabled=False))


@pytest.mark.parametrize('device_data', ['off', 'on'])
def test_a_resumed_epoch_equals_a_whole_one_without_compiling_at_run_time(
    prepared_data_dir, device_data, monkeypatch, caplog):
  config = small_config(prepared_data_dir, device_data=device_data)
  split = tfds_source.load_split(config, config.train_split)
  engine, state = _engine_and_state(config, split)
  whole, whole_sums = engine.run(state, 1, _progress())
  # Stop after 2 of the epoch's 5 batches (as Ctrl-C on the host-fed path does), then resume.
  host_engine, state = _engine_and_state(small_config(prepared_data_dir), split)
  calls = iter([False, False, True])
  monkeypatch.setattr(interrupt, 'requested', lambda: next(calls))
  with pytest.raises(interrupt.StoppedMidEpoch) as stopped:
    host_engine.run(state, 1, _progress())
  monkeypatch.setattr(interrupt, 'requested', lambda: False)
  resume = epochs.Resume(1, stopped.value.batches, stopped.value.sums)
  assert resume.batches == 2
  engine, _ = _engine_and_state(config, split, resume)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    resumed, resumed_sums = engine.run(stopped.value.state, 1, _progress(), resume)
  compiled = [r.getMessage() for r in caplog.records if 'Compiling jit(' in r.getMessage()]
  assert not [m for m in compiled if 'jit(epoch)' in m or 'jit(<lambda>)' in m], compiled
  assert int(resumed.step) == int(whole.step) == 5
  np.testing.assert_allclose(resumed_sums.means(), whole_sums.means(), rtol=1e-6)
  assert_adam_params_close(jax.tree.leaves(resumed.params), jax.tree.leaves(whole.params),
                           config.learning_rate)


def test_a_resumed_epoch_trains_and_announces_only_its_remaining_batches():
  resume = epochs.Resume(1, 91, None)
  assert epochs.samples_to_train(100, 128, None) == 12_800
  assert epochs.samples_to_train(100, 128, resume) == 9 * 128
  assert resume.line(91, 100) == 'Resumed from epoch 0, step 91: 91 of 100 batches into epoch 1'


def test_epoch_timings_wait_for_the_work(prepared_data_dir, tmp_path, monkeypatch):
  """JAX dispatches asynchronously: with no progress bar and no step logging nothing waits for
  an epoch's steps, and its seconds and samples/s once timed their queueing (365,703 samples/s
  on 2 cores). An epoch engine whose result takes 0.4 s more to compute must show it."""
  import time
  from test_faults import tiny_config

  def slow(x):  # The same value, 0.4 s later, computed where the device computes.
    return jax.pure_callback(lambda v: (time.sleep(0.4), v)[1],
                             jax.ShapeDtypeStruct(x.shape, x.dtype), x)
  real_build = epochs.build

  def build(*args, **kwargs):
    engine = real_build(*args, **kwargs)
    real_run = engine.run
    engine.run = lambda *a, **k: (lambda state, sums: (state, jax.tree.map(
        jax.jit(slow), sums)))(*real_run(*a, **k))
    return engine
  monkeypatch.setattr(epochs, 'build', build)
  config = tiny_config(prepared_data_dir, num_epochs=2, progress_bar=False, log_every_steps=0)
  rows = loop.train_and_evaluate(config, str(tmp_path / 'w'))
  for row in rows:
    assert row['seconds'] >= 0.4 and row['samples_per_second'] <= 1000 / 0.4, row
