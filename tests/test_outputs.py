"""flax_mnist/reporting/outputs.py: one model's outputs and several lanes', behind one interface
(the full runs that write them: tests/test_main.py and tests/test_lanes.py)."""

import types

import jax.numpy as jnp
import numpy as np

from flax_mnist import schema, steps
from flax_mnist.reporting import jsonl, outputs, summary


def _sums(loss_sum, correct, count):
  return steps.MetricSums(loss_sum=jnp.asarray(loss_sum, jnp.float32),
                          correct=jnp.asarray(correct, jnp.float32),
                          count=jnp.asarray(count, jnp.float32))


def _config(num_models=1):
  config = schema.defaults()
  config.num_models, config.num_epochs = num_models, 2
  return config


def test_one_model_writes_metrics_jsonl_and_a_keras_line(tmp_path, capsys):
  out = outputs.for_plan(_config(), types.SimpleNamespace(lanes=1), tmp_path)
  assert type(out) is outputs.ModelOutputs and out.trained == ''
  row = out.row(1, _sums(50.0, 90, 100), _sums(20.0, 45, 50), 3.0, 2.0, 100)
  assert row == dict(epoch=1, loss=0.5, accuracy=0.9, val_loss=0.4, val_accuracy=0.9,
                     seconds=3.0, samples_per_second=50.0)
  out.show(row, 100)
  assert jsonl.read(tmp_path / jsonl.METRICS_FILE) == [row]
  assert 'Epoch 1/2' in capsys.readouterr().out
  state = object()
  assert list(out.models(state, [row])) == [(state, [row], tmp_path)]
  out.rewrite([])
  assert jsonl.read(tmp_path / jsonl.METRICS_FILE) == []


def test_lanes_write_a_summary_and_each_lanes_own_files(tmp_path, capsys):
  out = outputs.for_plan(_config(num_models=2), types.SimpleNamespace(lanes=2), tmp_path)
  assert type(out) is outputs.LaneOutputs and out.trained == '2 models, each '
  out.introduce()
  assert '2 lanes of this model: 0: seed 42; 1: seed 43' in capsys.readouterr().out
  train = _sums([50.0, 40.0], [90, 80], [100, 100])
  evaluation = (_sums([20.0, 10.0], [45, 40], [50, 50]), _sums(12.0, 46, 50))
  row = out.row(1, train, evaluation, 3.0, 2.0, 100)
  out.rewrite([])  # As a run starts: the lanes' folders, empty files.
  assert [lane['val_accuracy'] for lane in row['lanes']] == [0.9, 0.8]
  assert row['ensemble_val_accuracy'] == 0.92
  out.show(row, 100)
  assert 'ensemble val_accuracy: 0.9200' in capsys.readouterr().out
  assert jsonl.read(tmp_path / summary.SUMMARY_FILE)[0]['models'] == 2
  for lane in range(2):
    assert jsonl.read(summary.lane_dir(tmp_path, lane) / jsonl.METRICS_FILE) == [
        row['lanes'][lane]]
  state = steps.TrainState(step=jnp.int32(4), params={'w': jnp.arange(2.0)},
                           opt_state={'m': jnp.arange(2.0)}, key=jnp.zeros((2, 2), jnp.uint32))
  models = list(out.models(state, [row]))
  assert [folder for _, _, folder in models] == [summary.lane_dir(tmp_path, i) for i in (0, 1)]
  assert [float(s.params['w']) for s, _, _ in models] == [0.0, 1.0]
  assert [h for _, h, _ in models] == [[row['lanes'][0]], [row['lanes'][1]]]
  out.close([row])
  assert 'Ensemble of 2: val_accuracy 0.9200' in capsys.readouterr().out
  np.testing.assert_equal(int(models[1][0].step), 4)


def test_throughput_counts_only_the_samples_this_process_trained(tmp_path, capsys):
  """After a mid-epoch resume 300 of the epoch's 1000 samples were trained here, in 2 s."""
  out = outputs.for_plan(_config(), types.SimpleNamespace(lanes=1), tmp_path)
  row = out.row(1, _sums(50.0, 90, 100), _sums(20.0, 45, 50), 3.0, 2.0, 300)
  assert row['samples_per_second'] == 150.0 and row['seconds'] == 3.0
  out.show(row, 1000, 300)
  # 3 s with validation; per sample, the 2 s of training alone.
  assert '1000 samples (300 since resuming) - 3.0s 6667us/sample' in capsys.readouterr().out
  lanes = outputs.for_plan(_config(num_models=2), types.SimpleNamespace(lanes=2), tmp_path)
  train = _sums([50.0, 40.0], [90, 80], [100, 100])
  evaluation = (_sums([20.0, 10.0], [45, 40], [50, 50]), _sums(12.0, 46, 50))
  row = lanes.row(1, train, evaluation, 3.0, 2.0, 300)
  assert [lane['samples_per_second'] for lane in row['lanes']] == [150.0, 150.0]
  assert row['samples_per_second'] == 300.0
  assert summary.epoch_line(row, 2, 1000, 300).startswith(  # Lanes say a resumed epoch too.
      'Epoch 1/2 - 2 models of 1000 samples (300 since resuming) - 3.0s - ')
