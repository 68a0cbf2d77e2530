"""Checkpoints: exact resume, restore across device counts, incompatible configs."""

import json

import jax
import numpy as np
import pytest

from conftest import cpu_plan, run_python, small_config
from flax_mnist import checkpoints as checkpoints_lib
from flax_mnist import loop, modes, steps
from flax_mnist.reporting import jsonl


def _final_params(config, workdir):
  state = modes.restore(config, cpu_plan(config), str(workdir), 'latest').state
  return jax.tree.leaves(jax.device_get(state.params))


def _without_timings(rows):
  return [{k: v for k, v in row.items() if k not in ('seconds', 'samples_per_second')}
          for row in rows]


def test_resume_is_bit_identical(prepared_data_dir, tmp_path, capsys):
  config = small_config(prepared_data_dir, num_epochs=3)
  straight = loop.train_and_evaluate(config, str(tmp_path / 'straight'))
  loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=2),
                           str(tmp_path / 'resumed'))
  resumed = loop.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert 'Resumed from epoch 2, step 10' in capsys.readouterr().out
  assert _without_timings(resumed) == _without_timings(straight)
  for a, b in zip(_final_params(config, tmp_path / 'straight'),
                  _final_params(config, tmp_path / 'resumed')):
    np.testing.assert_array_equal(a, b)
  rows = jsonl.read(tmp_path / 'resumed' / 'metrics.jsonl')
  assert [r['epoch'] for r in rows] == [1, 2, 3]


def test_finished_run_is_a_no_op(trained_workdir, prepared_data_dir, capsys):
  before = sorted(p.name for p in (trained_workdir / 'checkpoints').iterdir())
  rows = loop.train_and_evaluate(small_config(prepared_data_dir), str(trained_workdir))
  assert 'Already finished: epoch 2/2' in capsys.readouterr().out
  assert [r['epoch'] for r in rows] == [1, 2]
  loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=1), str(trained_workdir))
  assert 'Already finished: epoch 2, past num_epochs=1 in ' in capsys.readouterr().out
  assert sorted(p.name for p in (trained_workdir / 'checkpoints').iterdir()) == before


def test_metrics_rows_follow_the_checkpoint(prepared_data_dir, tmp_path, capsys):
  """Rows of a lost run are dropped; a changed eval_split is said once (its rows differ)."""
  workdir = tmp_path / 'w'
  loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=1), str(workdir))
  with open(workdir / 'metrics.jsonl', 'a') as f:  # As if killed after logging epoch 2 only.
    f.write(json.dumps({'epoch': 2, 'loss': 0.0}) + '\n')
  capsys.readouterr()
  rows = loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=2,
                                              eval_split='test[:400]'), str(workdir))
  logged = jsonl.read(workdir / 'metrics.jsonl')
  assert [r['epoch'] for r in logged] == [1, 2] and logged[1]['loss'] == rows[1]['loss'] > 0
  assert ('Note: validating on test[:400] from epoch 2 on; epochs up to 1 were validated on '
          'test[:600], so their val_ metrics (and --step=best) compare different sets.'
          ) in capsys.readouterr().out


def test_keeps_latest_and_best(prepared_data_dir, tmp_path):
  config = small_config(prepared_data_dir, num_epochs=4, keep_checkpoints=2)
  rows = loop.train_and_evaluate(config, str(tmp_path))
  with checkpoints_lib.open_checkpoints(tmp_path) as checkpoints:
    kept = checkpoints.steps()
    best = checkpoints.best_step()
    assert kept[-2:] == [15, 20]
    best_epoch = max((r['val_accuracy'], r['epoch']) for r in rows)[1]  # Ties: the later.
    assert checkpoints.read_meta(best)['epoch'] == best_epoch and best in kept
    assert len(kept) == (2 if best_epoch >= 3 else 3)


def test_incompatible_config_names_the_fields(trained_workdir, prepared_data_dir):
  config = small_config(prepared_data_dir, kernel_size=5, learning_rate=0.01)
  with pytest.raises(checkpoints_lib.CheckpointError,
                     match=r'another config \(kernel_size: 3 -> 5; learning_rate: 0.001 -> '
                           r'0.01\); use another --workdir'):
    loop.train_and_evaluate(config, str(trained_workdir))


_TRAIN_AND_REPORT = '''
import json, sys
import jax
from conftest import small_config
from flax_mnist import loop, modes, plan
config = small_config({data_dir!r})
if {train!r}:
  rows = loop.train_and_evaluate(config, {workdir!r})
  print('VAL', json.dumps(rows[-1]['val_accuracy']))
row = modes.run_eval(config, plan.decide(config), {workdir!r}, 'latest')
print('EVAL', json.dumps(row['val_accuracy']), jax.device_count())
'''


def _report(result, tag):
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith(tag)][-1]
  return line.split()[1:]


@pytest.mark.parametrize('train_devices, restore_devices', [(8, 1), (1, 8)])
def test_restore_on_another_device_count(prepared_data_dir, tmp_path, train_devices,
                                         restore_devices):
  workdir = str(tmp_path / 'w')
  code = dict(data_dir=prepared_data_dir, workdir=workdir)
  trained = run_python(_TRAIN_AND_REPORT.format(train=True, **code), train_devices)
  recorded = float(_report(trained, 'VAL')[0])
  restored = run_python(_TRAIN_AND_REPORT.format(train=False, **code), restore_devices)
  accuracy, devices = _report(restored, 'EVAL')
  assert int(devices) == restore_devices
  assert float(accuracy) == recorded


def test_divergence_stops_without_saving_non_finite_weights(prepared_data_dir, tmp_path,
                                                           monkeypatch):
  workdir = str(tmp_path / 'w')
  loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=1), workdir)
  poisoned = steps.to_unit_float
  monkeypatch.setattr(steps, 'to_unit_float', lambda images: poisoned(images) * float('nan'))
  config = small_config(prepared_data_dir, num_epochs=2)
  with pytest.raises(loop.TrainingDiverged,
                     match=r'diverged in epoch 2 \(loss nan.*newest checkpoint \(step 5\) is '
                           r'intact\. Lower --config.learning_rate'):
    loop.train_and_evaluate(config, workdir)
  with checkpoints_lib.open_checkpoints(workdir) as checkpoints:
    assert checkpoints.steps() == [5]


def test_failed_save_is_raised_and_older_checkpoints_stay(prepared_data_dir, tmp_path,
                                                          monkeypatch):
  workdir = str(tmp_path / 'w')
  loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=1), workdir)
  real_save = checkpoints_lib.ocp.args.StandardSave

  class Unsaveable:  # No orbax type handler exists for this leaf.
    pass
  monkeypatch.setattr(checkpoints_lib.ocp.args, 'StandardSave',
                      lambda state: real_save({'state': state, 'bad': Unsaveable()}))
  with pytest.raises((checkpoints_lib.CheckpointWriteError, TypeError)) as raised:
    loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=2), workdir)
  assert 'Unsaveable' in str(raised.value) or 'type' in str(raised.value).lower()
  monkeypatch.undo()
  with checkpoints_lib.open_checkpoints(workdir) as checkpoints:
    assert checkpoints.steps() == [5]


def test_a_long_error_keeps_the_os_reason_where_it_stands():
  """TensorStore's messages put the path first and long sources last; the elided summary must
  still say why (a full disk here)."""
  message = ('Error writing "/w/checkpoints/10/array_metadatas/process_0" ' + 'x' * 150
             + ': File too large [OS error 27] ' + 'y' * 300 + " [source_errors_error_code='27']")
  summary = checkpoints_lib._summary(ValueError(message))
  assert summary.startswith('ValueError: Error writing "/w/checkpoints/10/')
  assert ' ... File too large ... ' in summary and summary.endswith("error_code='27']")
  assert len(summary) < 300
  assert checkpoints_lib._summary(OSError('short: File too large')) == (
      'OSError: short: File too large')


def test_best_is_the_best_validated_step_and_an_error_before_any(tmp_path):
  """Mid-epoch checkpoints (saved by a stop, before validation) have no score: --step=best
  skips them, and with nothing else kept says so instead of returning an unvalidated step."""
  state = {'w': np.zeros(3, np.float32)}
  with checkpoints_lib.open_checkpoints(tmp_path) as checkpoints:
    checkpoints.save(3, state, {'epoch': 0}, None)
    checkpoints.manager.wait_until_finished()
    with pytest.raises(checkpoints_lib.CheckpointError,
                       match=r'^--step=best: no checkpoint in .* was validated yet \(step 3 was '
                             r'saved mid-epoch\); pass --step=latest'):
      checkpoints.resolve_step('best')
    checkpoints.save(5, state, {'epoch': 1}, 0.9)
    checkpoints.save(7, state, {'epoch': 1}, None)
    checkpoints.manager.wait_until_finished()
    assert [checkpoints.resolve_step(s) for s in ('best', 'latest', '3')] == [5, 7, 3]


def test_a_lanes_best_is_the_lanes_mean_or_one_lanes_own(tmp_path):
  """A lanes run scores each checkpoint by the lanes' mean; --lane=N --step=best reads lane N's
  own val_accuracy from the checkpoint's history."""
  state = {'w': np.zeros(3, np.float32)}
  with checkpoints_lib.open_checkpoints(tmp_path) as checkpoints:
    for step, accuracies in ((5, (0.97, 0.91)), (10, (0.95, 0.99))):
      row = dict(lanes=[dict(val_accuracy=a) for a in accuracies])
      checkpoints.save(step, state, {'epoch': step // 5, 'history': [row]},
                       float(np.mean(accuracies)))
    checkpoints.manager.wait_until_finished()
    assert [checkpoints.resolve_step('best', lane) for lane in (None, 0, 1)] == [10, 5, 10]
