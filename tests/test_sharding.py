"""Data parallelism: 8 CPU devices train like 1, with the batch split over a 'data' mesh axis,
also when 8 does not divide the batch (padded with masked rows; sizes: tests/test_plan.py)."""

import json

import numpy as np

from conftest import run_python
from flax_mnist import sharding

_TRAIN = '''
import json, jax
import numpy as np
from conftest import small_config
from flax_mnist import loop, modes, plan, sharding
from flax_mnist.data import tfds_source
from flax_mnist.reporting import report
# conv_impl named: one device would otherwise take the C++ kernels, eight XLA's Winograd,
# and this compares the sharding alone.
config = small_config({data_dir!r}, num_epochs=3, conv_impl='winograd', **{overrides!r})
rows = loop.train_and_evaluate(config, {workdir!r})
print('ROWS', jax.device_count(), json.dumps(rows))
if {predict!r}:
  restored = modes.restore(config, plan.decide(config), {workdir!r}, 'latest')
  test = tfds_source.load_split(config, 'test')
  probs = report.probabilities(restored.graphdef, restored.state.params, sharding.make_mesh(),
                               test, config.eval_batch_size)
  np.save({workdir!r} + '/digits.npy', probs.argmax(-1))
'''


def _rows(result):
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('ROWS')][-1]
  _, devices, rows = line.split(' ', 2)
  return int(devices), json.loads(rows)


def _assert_same_metrics(runs, what):
  """The 8-device run trains like the 1-device run: the first epoch equal up to rounding, later
  epochs within what that rounding grows to.

  8 devices sum the gradient in another order; each Adam step carries the last ulp difference
  into the next, so it grows over the epochs (on some CPUs faster than others, since the vector
  width changes the order of sums too) and can flip the prediction of a sample on the edge.
  Later epochs therefore allow the losses 0.2% and the accuracies 3 of the 600-1000 samples.
  """
  keys = ('loss', 'accuracy', 'val_loss', 'val_accuracy')
  print(f'{what}:', [{k: (eight[k], one[k]) for k in keys}
                     for one, eight in zip(runs[1], runs[8])])
  assert len(runs[1]) == len(runs[8]) == 3
  for epoch, (one, eight) in enumerate(zip(runs[1], runs[8])):
    for key in keys:
      if epoch == 0:
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=2e-4)
      elif key.endswith('accuracy'):
        np.testing.assert_allclose(eight[key], one[key], rtol=0, atol=3 / 600)
      else:
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-3)


def test_eight_devices_train_like_one(prepared_data_dir, tmp_path):
  runs = {}
  for devices in (1, 8):
    code = _TRAIN.format(data_dir=prepared_data_dir, workdir=str(tmp_path / str(devices)),
                         overrides={}, predict=False)
    count, rows = _rows(run_python(code, devices))
    assert count == devices
    runs[devices] = rows
  _assert_same_metrics(runs, '8 devices vs 1')


def test_the_seeds_batch_of_500_on_8_devices_trains_like_1_device(prepared_data_dir, tmp_path):
  """500 is no multiple of 8: each batch gets 4 masked rows, which change nothing computed."""
  runs, digits = {}, {}
  overrides = dict(train_split='train[:1500]', batch_size=500, eval_batch_size=500)
  for devices in (1, 8):
    workdir = tmp_path / str(devices)
    code = _TRAIN.format(data_dir=prepared_data_dir, workdir=str(workdir), overrides=overrides,
                         predict=True)
    count, runs[devices] = _rows(run_python(code, devices))
    assert count == devices
    digits[devices] = np.load(workdir / 'digits.npy')
  _assert_same_metrics(runs, 'batch 500, 8 devices vs 1')
  assert len(digits[1]) == 10000 and (digits[8] == digits[1]).mean() >= 0.999


def test_mesh_spans_every_device():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == (sharding.DATA_AXIS,) and mesh.size >= 1


def test_one_process_feeds_every_row_of_a_batch():
  mesh = sharding.make_mesh()
  np.testing.assert_array_equal(sharding.process_rows(mesh, 8 * mesh.size),
                                np.arange(8 * mesh.size))
  images = np.arange(8 * mesh.size * 3).reshape(8 * mesh.size, 3)
  (batch,) = sharding.put_batch(mesh, images)
  assert batch.sharding == sharding.batch_sharded(mesh)
  np.testing.assert_array_equal(batch, images)
