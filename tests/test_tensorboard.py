"""TensorBoard event files: tags and steps as TensorBoard reads them, resume, process 0 only.

Both epoch engines logging the same steps is tested in test_epochs.
"""

import numpy as np
import pytest

from conftest import base_config
from flax_mnist import schema, steps
from flax_mnist.reporting import jsonl
from flax_mnist.reporting import tensorboard as metric_writers
from flax_mnist.errors import ConfigError


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} as TensorBoard's own loader sees the folder."""
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={'scalars': 0})
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()['scalars']}


def test_training_writes_epoch_metrics_and_step_loss(trained_workdir):
  scalars = read_scalars(trained_workdir / metric_writers.LOG_DIR)
  rows = jsonl.read(trained_workdir / 'metrics.jsonl')
  # small_config: 5 steps per epoch, 2 epochs; base log_every_steps=10.
  for key in metric_writers.EPOCH_TAGS:
    logged = scalars.pop(metric_writers.epoch_tag(key))
    assert [step for step, _ in logged] == [5, 10]
    np.testing.assert_allclose([v for _, v in logged], [row[key] for row in rows], rtol=1e-6)
  assert {tag: [s for s, _ in v] for tag, v in scalars.items()} == {
      'steps/loss': [10], 'steps/accuracy': [10]}


def _write_run(workdir, start, stop, every=2, tag_value=0.0):
  writer = metric_writers.MetricWriter(workdir, start, every, enabled=True)
  for epoch_start in range(start, stop, 5):
    log = writer.step_log(epoch_start)
    for index in range(1, 6):
      log.record(index, steps.MetricSums(loss_sum=tag_value + epoch_start + index,
                                         correct=1.0, count=1.0))
    row = {k: tag_value + epoch_start for k in metric_writers.EPOCH_TAGS}
    writer.write_epoch(epoch_start + 5, row)
  return writer


def test_resume_cuts_events_past_the_checkpoint(tmp_path):
  # A run killed at step 14, after its checkpoint at step 10 and a torn write; resumed from 10.
  _write_run(tmp_path, 0, 15, tag_value=0.5)  # Not closed: as a kill leaves it.
  logdir = tmp_path / metric_writers.LOG_DIR
  (old,) = logdir.glob('events.out.tfevents.*')
  with open(old, 'ab') as f:
    f.write(b'\x40\x00\x00\x00\x00\x00\x00\x00torn')
  _write_run(tmp_path, 10, 20).close()
  scalars = read_scalars(logdir)
  assert [s for s, _ in scalars['epoch/loss']] == [5, 10, 15, 20]
  assert [v for _, v in scalars['epoch/loss']] == [0.5, 5.5, 10, 15]
  assert [s for s, _ in scalars['steps/loss']] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
  assert [v for _, v in scalars['steps/loss']][4:6] == [10.5, 12]
  assert not list(logdir.glob('*.tmp'))


def test_fresh_start_drops_events_of_a_deleted_run(tmp_path):
  _write_run(tmp_path, 0, 10).close()
  _write_run(tmp_path, 0, 5, tag_value=1).close()
  scalars = read_scalars(tmp_path / metric_writers.LOG_DIR)
  assert scalars['epoch/loss'] == [(5, 1.0)]


def test_zero_disables_step_logging_and_other_processes_write_nothing(tmp_path):
  _write_run(tmp_path / 'a', 0, 5, every=0).close()
  assert 'steps/loss' not in read_scalars(tmp_path / 'a' / metric_writers.LOG_DIR)
  writer = metric_writers.MetricWriter(tmp_path / 'b', 0, 2, enabled=False)
  writer.write_epoch(5, {k: 0.0 for k in metric_writers.EPOCH_TAGS})
  writer.close()
  assert not (tmp_path / 'b').exists()


def test_negative_log_every_steps_is_rejected():
  with pytest.raises(ConfigError, match=r'config.log_every_steps=-1 is invalid'):
    schema.validate(base_config(log_every_steps=-1))
