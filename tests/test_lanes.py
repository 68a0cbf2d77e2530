"""Many models in one program: lane i trains what seed + i trains alone; sweeps, resume, the
device-resident path, several devices, outputs and the modes' --lane."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from conftest import base_config, cpu_plan, run_python, small_config
from flax_mnist import interrupt, lanes, loop, modes, schema, sharding
from flax_mnist import plan as plan_lib
from flax_mnist import steps as steps_lib
from flax_mnist.data import tfds_source
from flax_mnist.errors import ConfigError
from flax_mnist.reporting import report, summary
from test_faults import TINY, final_params, without_timings
from test_modes import digit_files  # noqa: F401 (a fixture)


# The lanes and the sweep (no JAX involved).

def test_a_sweep_is_a_grid_of_values_times_seeds():
  config = base_config(num_models=2, sweep='learning_rate=1e-3,3e-3; dense_dropout=0.5,0.25,0')
  assert lanes.count(config) == 12
  all_lanes = lanes.lanes(config)
  assert [lane.index for lane in all_lanes] == list(range(12))
  assert [lane.seed for lane in all_lanes[:4]] == [42, 43, 42, 43]
  assert all_lanes[5].values == {'learning_rate': 1e-3, 'dense_dropout': 0.0}
  assert all_lanes[7].label() == 'seed 43, learning_rate 0.003, dense_dropout 0.5'
  single = lanes.lane_config(config, all_lanes[7])
  assert (single.seed, single.learning_rate, single.dense_dropout, single.num_models,
          single.sweep) == (43, 3e-3, 0.5, 1, '')
  np.testing.assert_array_equal(lanes.swept_values(config)['learning_rate'],
                                np.float32([1e-3] * 6 + [3e-3] * 6))


def test_without_a_sweep_lane_i_has_seed_plus_i():
  config = base_config(num_models=4, seed=7)
  assert [(lane.index, lane.seed, lane.values) for lane in lanes.lanes(config)] == [
      (i, 7 + i, {}) for i in range(4)]
  assert lanes.swept_values(config) == {}


@pytest.mark.parametrize('overrides, message', [
    (dict(sweep='momentum=0.1,0.2'), r"'momentum=0.1,0.2' is not NAME=V1,V2,\.\.\. with NAME one "
                                     r'of learning_rate, .*dense_dropout; separate names'),
    (dict(sweep='learning_rate=1e-3,fast'), 'the values of learning_rate must be numbers'),
    (dict(sweep='learning_rate=1e-3,-1'), r'learning_rate=-1.0 is invalid: must be a positive'),
    (dict(sweep='dense_dropout=0.5,1.0'), r'dense_dropout=1.0 is invalid: must be in \[0, 1\)'),
    (dict(sweep='learning_rate=1e-3;learning_rate=2e-3'), 'names learning_rate twice'),
    (dict(sweep='learning_rate=1e-3,1e-3'), 'repeats a value of learning_rate'),
    (dict(sweep='learning_rate=3e-3'), r'gives one lane; set --config.learning_rate=0.003'),
    (dict(num_models=0), r'config.num_models=0 is invalid: must be a positive integer'),
    (dict(lanes_per_pass=-1), r'config.lanes_per_pass=-1 is invalid'),
])
def test_bad_lanes_are_one_line_config_errors(overrides, message):
  with pytest.raises(ConfigError, match=message) as error:
    schema.validate(base_config(**overrides))
  assert '\n' not in str(error.value)


def test_the_plan_runs_lanes_one_after_another_on_cpu_and_together_elsewhere():
  config = base_config(num_models=4)
  cpu, gpu = plan_lib.make(config, 'cpu', 1), plan_lib.make(config, 'gpu', 1)
  assert (cpu.lanes, cpu.lanes_per_pass, gpu.lanes_per_pass) == (4, 1, 4)
  assert cpu.line().endswith(', 4 lanes (1 per pass)')
  assert plan_lib.make(base_config(num_models=4, lanes_per_pass=2), 'cpu', 1).lanes_per_pass == 2
  assert plan_lib.make(base_config(), 'cpu', 1).lanes == 1
  assert 'lanes' not in plan_lib.make(base_config(), 'cpu', 1).line()


@pytest.mark.parametrize('mode, lane, output, message', [
    ('eval', 3, '', r'--lane=3: this config has 3 lanes \(0 to 2\)'),
    ('export', None, 'x.h5', '--output names one file but this config trains 3 lanes'),
])
def test_bad_lane_flags_are_one_line_errors(mode, lane, output, message):
  plan = plan_lib.make(base_config(num_models=3), 'cpu', 1)
  with pytest.raises(ConfigError, match=message):
    modes.check_lane(plan, mode, lane, output)
  modes.check_lane(plan, 'eval', 2)  # A lane that exists.


# Lane i equals the single run of seed + i.

def _test_predictions(config, graphdef, params):
  test = tfds_source.load_split(config, 'test')
  probs = report.probabilities(graphdef, params, sharding.make_mesh(), test, 1000)
  return probs.argmax(-1)


def _restored(config, workdir):
  return modes.restore(config, cpu_plan(config), str(workdir), 'latest')


@pytest.fixture(scope='module')
def three_lanes(prepared_data_dir, tmp_path_factory):
  """3 lanes of the base config, 2 epochs on train[:10000]: (config, workdir, history)."""
  config = base_config(data_dir=prepared_data_dir, train_split='train[:10000]', num_epochs=2,
                       num_models=3, progress_bar=False)
  workdir = tmp_path_factory.mktemp('three_lanes')
  return config, workdir, loop.train_and_evaluate(config, str(workdir))


def test_lane_i_equals_the_single_run_of_seed_plus_i(three_lanes, tmp_path):
  """The last lane (seed + 2) against its single run; the sweep test compares lane 0."""
  config, workdir, history = three_lanes
  lane = 2
  single = lanes.lane_config(config, lanes.lanes(config)[lane])
  assert single.seed == 42 + lane
  alone = loop.train_and_evaluate(single, str(tmp_path))
  for row, alone_row in zip(history, alone):
    assert abs(row['lanes'][lane]['val_accuracy'] - alone_row['val_accuracy']) <= 0.001
  restored = _restored(config, workdir)
  together = _test_predictions(config, restored.graphdef, restored.lane_state(lane).params)
  by_itself = _restored(single, tmp_path)
  same = (together == _test_predictions(single, by_itself.graphdef,
                                        by_itself.state.params)).mean()
  print(f'lane {lane}: {same:.4%} of test predictions equal the single run of seed {42 + lane}')
  assert same >= 0.999


def test_lanes_write_a_summary_row_per_epoch_and_each_lane_its_files(three_lanes):
  config, workdir, history = three_lanes
  rows = [json.loads(line) for line in (workdir / 'summary.jsonl').read_text().splitlines()]
  assert [row['epoch'] for row in rows] == [1, 2] and rows[-1]['models'] == 3
  for key in summary.STAT_KEYS:
    values = [lane[key] for lane in history[-1]['lanes']]
    assert rows[-1][f'{key}_mean'] == pytest.approx(np.mean(values))
    assert rows[-1][f'{key}_std'] == pytest.approx(np.std(values, ddof=1))
    assert (rows[-1][f'{key}_min'], rows[-1][f'{key}_max']) == (min(values), max(values))
  assert 0.9 < rows[-1]['ensemble_val_accuracy'] <= 1
  for lane in range(3):
    folder = workdir / 'models' / str(lane)
    lane_rows = [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]
    assert lane_rows == [row['lanes'][lane] for row in history]
    assert (folder / 'keras_cnn.h5').is_file() and (folder / 'plots' / 'curves.png').is_file()
    assert any((folder / 'tensorboard').glob('events.out.tfevents.*'))
  assert not (workdir / 'metrics.jsonl').exists()


def test_the_ensemble_averages_the_lanes_probabilities(three_lanes):
  config, workdir, history = three_lanes
  restored = _restored(config, workdir)
  test = tfds_source.load_split(config, 'test')
  probs = np.mean([report.probabilities(restored.graphdef, restored.lane_state(i).params,
                                        sharding.make_mesh(), test, 1000) for i in range(3)], 0)
  accuracy = (probs.argmax(-1) == test.labels).mean()
  assert history[-1]['ensemble_val_accuracy'] == pytest.approx(accuracy, abs=1e-4)


# Sweeps: traced hyperparameters, one compile.

def _recorded(path):
  """(learning rate, dense dropout) that a Keras .h5 file records."""
  import h5py
  with h5py.File(path, 'r') as f:
    training, model = (json.loads(f.attrs[k]) for k in ('training_config', 'model_config'))
  dropouts = [layer['config']['rate'] for layer in model['config']['layers']
              if layer['class_name'] == 'Dropout']
  return training['optimizer_config']['config']['learning_rate'], dropouts[-1]


def test_a_sweep_lane_trains_like_the_single_run_of_its_values(prepared_data_dir, tmp_path):
  config = small_config(prepared_data_dir, sweep='learning_rate=3e-3,1e-3; dense_dropout=0.2')
  history = loop.train_and_evaluate(config, str(tmp_path / 'sweep'))
  restored = _restored(config, tmp_path / 'sweep')
  lane = lanes.lanes(config)[0]  # learning_rate 3e-3 and dense_dropout 0.2: neither a default.
  single = lanes.lane_config(config, lane)
  assert (single.learning_rate, single.dense_dropout) == (3e-3, 0.2)
  alone = loop.train_and_evaluate(single, str(tmp_path / 'alone'))
  for row, alone_row in zip(history, alone):
    assert abs(row['lanes'][0]['val_accuracy'] - alone_row['val_accuracy']) <= 0.005
    assert row['lanes'][0]['loss'] == pytest.approx(alone_row['loss'], rel=1e-3)
  by_itself = _restored(single, tmp_path / 'alone')
  ours = _test_predictions(config, restored.graphdef, restored.lane_state(0).params)
  theirs = _test_predictions(single, by_itself.graphdef, by_itself.state.params)
  assert (ours == theirs).mean() >= 0.995
  finals = [row['loss'] for row in history[-1]['lanes']]
  assert len(set(finals)) > 1  # Lane 1 (learning_rate 1e-3) did differ.
  assert [_recorded(tmp_path / 'sweep' / 'models' / str(i) / 'keras_cnn.h5') for i in (0, 1)
          ] == [pytest.approx((3e-3, 0.2)), pytest.approx((1e-3, 0.2))]


# Resume, the device-resident path and several devices.

@pytest.fixture(scope='module')
def two_tiny_lanes(prepared_data_dir, tmp_path_factory):
  """(config, history, final params) of an uninterrupted tiny run of 2 lanes."""
  config = small_config(prepared_data_dir, **TINY, num_models=2)
  workdir = tmp_path_factory.mktemp('two_tiny_lanes')
  history = loop.train_and_evaluate(config, str(workdir))
  return config, history, final_params(config, workdir)


def _untimed(history):
  """Summary rows and their lanes' rows without the timings."""
  return [dict(row, lanes=without_timings(row['lanes'])) for row in without_timings(history)]


def test_lanes_stopped_mid_epoch_resume_bit_for_bit(two_tiny_lanes, tmp_path, monkeypatch):
  config, straight, params = two_tiny_lanes
  real_put, fed = sharding.put_batch, []

  def put_batch(mesh, *arrays, lanes=False):
    if lanes:  # A training batch of every lane.
      fed.append(1)
      if len(fed) == 14:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_put(mesh, *arrays, lanes=lanes)
  monkeypatch.setattr(sharding, 'put_batch', put_batch)
  with pytest.raises(interrupt.Interrupted, match=r'^interrupted at step 14 \(epoch 2, batch 4\)'):
    loop.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  resumed = loop.train_and_evaluate(config, str(tmp_path))
  assert _untimed(resumed) == _untimed(straight)
  for got, want in zip(final_params(config, tmp_path), params):
    np.testing.assert_array_equal(got, want)


def test_device_resident_lanes_equal_host_fed_lanes(two_tiny_lanes, tmp_path):
  config, straight, _ = two_tiny_lanes
  on_device = config.copy_and_resolve_references()
  on_device.device_data = 'on'
  history = loop.train_and_evaluate(on_device, str(tmp_path))
  for row, want in zip(history, straight):
    for lane, lane_want in zip(row['lanes'], want['lanes']):
      for key in summary.STAT_KEYS:
        assert lane[key] == pytest.approx(lane_want[key], rel=1e-5, abs=1e-6), key


def test_lanes_together_by_vmap_equal_lanes_one_after_another(two_tiny_lanes, tmp_path):
  """lanes_per_pass=2 (jax.vmap, the GPU/TPU plan) computes what 1 (lax.map, CPU's) does."""
  config, straight, _ = two_tiny_lanes
  together = config.copy_and_resolve_references()
  together.lanes_per_pass = 2
  assert cpu_plan(together).lanes_per_pass == 2
  history = loop.train_and_evaluate(together, str(tmp_path))
  for row, want in zip(history, straight):
    assert row['ensemble_val_accuracy'] == pytest.approx(want['ensemble_val_accuracy'], abs=0.01)
    for lane, lane_want in zip(row['lanes'], want['lanes']):
      for key in summary.STAT_KEYS:
        assert lane[key] == pytest.approx(lane_want[key], rel=1e-3, abs=1e-3), key


# conv_impl named: one device would otherwise take the C++ kernels, two XLA's Winograd.
_PADDED = dict(TINY, batch_size=99, eval_batch_size=99, micro_batch_size=0, num_models=2,
               conv_impl='winograd')
_ON_DEVICES = '''
import json
from conftest import small_config
from flax_mnist import loop
config = small_config({data_dir!r}, **{settings!r})
print('ROWS', json.dumps(loop.train_and_evaluate(config, {workdir!r})))
'''


def test_lanes_on_two_devices_with_a_padded_batch_train_like_one_device(prepared_data_dir,
                                                                        tmp_path):
  """Batch 99 on 2 devices: 100 rows, one masked, shared by both lanes (1 device: here)."""
  result = run_python(_ON_DEVICES.format(data_dir=prepared_data_dir, settings=_PADDED,
                                         workdir=str(tmp_path / '2')), devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  two_devices = json.loads(result.stdout.split('ROWS ', 1)[1])
  assert jax.device_count() == 1
  one_device = loop.train_and_evaluate(small_config(prepared_data_dir, **_PADDED),
                                       str(tmp_path / '1'))
  for one, two in zip(one_device, two_devices):
    for lane_one, lane_two in zip(one['lanes'], two['lanes']):
      for key in summary.STAT_KEYS:
        # Two devices sum in another order: a borderline image may change its argmax, so an
        # accuracy may differ by one example (of >= 600); losses agree to 1e-4.
        close = dict(abs=1.01 / 600) if 'accuracy' in key else dict(rel=1e-4, abs=1e-5)
        assert lane_two[key] == pytest.approx(lane_one[key], **close), key


def test_lane_state_is_the_lanes_own(two_tiny_lanes):
  config = two_tiny_lanes[0]
  graphdef, state, _ = steps_lib.create(config, cpu_plan(config))
  single = lanes.lane_config(config, lanes.lanes(config)[1])
  _, alone, _ = steps_lib.create(single, cpu_plan(single))
  for got, want in zip(jax.tree.leaves(steps_lib.lane_state(state, 1)), jax.tree.leaves(alone)):
    np.testing.assert_array_equal(got, want)


def test_each_lane_exports_its_own_seed_and_swept_values(prepared_data_dir, tmp_path):
  """A sweep's lanes differ in learning rate and dropout: each lane's Keras file says its own,
  not the base config's (the weights here are one init_from file, so no training is needed)."""
  from flax_mnist.keras import export as keras_export
  single = small_config(prepared_data_dir)
  graphdef, state, _ = steps_lib.create(single, cpu_plan(single))
  weights = tmp_path / 'init.h5'
  keras_export.export(loop.nnx_model(graphdef, state), single, weights)
  config = small_config(prepared_data_dir, init_from=str(weights),
                        sweep='learning_rate=0.002,0.004; dense_dropout=0.25,0.4')
  paths = modes.run_export(config, cpu_plan(config), str(tmp_path / 'w'), 'latest', '')
  written = [value for path in paths for value in _recorded(path)]
  assert written == pytest.approx([0.002, 0.25, 0.002, 0.4, 0.004, 0.25, 0.004, 0.4])
  assert [p.relative_to(tmp_path / 'w').as_posix() for p in paths] == [
      f'models/{i}/keras_cnn.h5' for i in range(4)]


# The command line: console lines, and the modes with and without --lane.

def test_three_lanes_on_the_command_line(prepared_data_dir, tmp_path, digit_files):
  from test_modes import _cli
  workdir = tmp_path / 'w'
  trained = _cli(workdir, prepared_data_dir, '--config.num_models=3', '--config.num_epochs=1',
                 '--config.progress_bar=False')
  assert trained.returncode == 0, trained.stderr[-2000:]
  out = trained.stdout
  assert out.splitlines()[0].endswith(', 3 lanes (1 per pass)')
  assert '3 lanes of this model: 0: seed 42; 1: seed 43; 2: seed 44' in out
  epoch_lines = [line for line in out.splitlines() if line.startswith('Epoch ')]
  assert len(epoch_lines) == 1 and all(
      ' - 3 models of 1000 samples - ' in line and ' - val_accuracy: 0.' in line and ' +- ' in line
      and ' - ensemble val_accuracy: 0.' in line for line in epoch_lines), epoch_lines
  assert 'lane  model' in out and '   2  seed 44' in out and 'Ensemble of 3: val_accuracy' in out
  history = [json.loads(line) for line in (workdir / 'summary.jsonl').read_text().splitlines()]

  lanes_flag = ['--config.num_models=3']
  one = _cli(workdir, prepared_data_dir, *lanes_flag, '--mode=eval', '--lane=2')
  assert one.returncode == 0, one.stderr[-2000:]
  lane_2 = json.loads((workdir / 'models' / '2' / 'metrics.jsonl').read_text().splitlines()[-1])
  assert f"lane 2 on 600 test[:600] samples - val_loss: {lane_2['val_loss']:.4f}" in one.stdout
  every = _cli(workdir, prepared_data_dir, *lanes_flag, '--mode=eval')
  assert "ensemble of 3 on 600 test[:600] samples - val_loss: " in every.stdout
  assert f"val_accuracy: {history[-1]['ensemble_val_accuracy']:.4f}" in every.stdout
  bad = _cli(workdir, prepared_data_dir, *lanes_flag, '--mode=eval', '--lane=3')
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      'error: --lane=3: this config has 3 lanes (0 to 2); pass one of them, or no --lane for '
      'all.']
  assert bad.stdout == ''  # Refused before the plan line.

  exported = _cli(workdir, prepared_data_dir, *lanes_flag, '--mode=export', '--lane=1',
                  f'--output={tmp_path}/lane1.keras')
  assert exported.returncode == 0 and (tmp_path / 'lane1.keras').is_file()

  folder, paths, images = digit_files
  config = small_config(prepared_data_dir, num_models=3)
  restored = modes.restore(config, cpu_plan(config), str(workdir), 'latest')
  expected = modes.classify([restored.model(i) for i in range(3)], images / np.float32(255))
  predicted = _cli(workdir, prepared_data_dir, *lanes_flag, '--mode=predict',
                   f'--images={folder}/digit*.png')
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  assert 'Predictions of the ensemble of 3 lanes, step ' in predicted.stdout
  for line, path, p in zip(predicted.stdout.strip().splitlines()[-8:], paths, expected):
    assert line == f'{path}: {int(p.argmax())} ({float(p.max()):.4f})'

  (workdir / 'models' / '0' / 'plots' / 'errors.png').unlink()
  reported = _cli(workdir, prepared_data_dir, *lanes_flag, '--mode=report', '--lane=0')
  assert reported.returncode == 0 and (workdir / 'models' / '0' / 'plots' / 'errors.png').is_file()
