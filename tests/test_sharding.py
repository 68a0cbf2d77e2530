"""Data parallelism: 8 CPU devices train like 1, with the batch split over a 'data' mesh axis.

That batches must split evenly over the devices is the plan's check (tests/test_plan.py)."""

import json

import numpy as np

from conftest import run_python
from flax_mnist import sharding

_TRAIN = '''
import json, jax
from conftest import small_config
from flax_mnist import loop
rows = loop.train_and_evaluate(small_config({data_dir!r}, num_epochs=3), {workdir!r})
print('ROWS', jax.device_count(), json.dumps(rows))
'''


def _rows(result):
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('ROWS')][-1]
  _, devices, rows = line.split(' ', 2)
  return int(devices), json.loads(rows)


def test_eight_devices_train_like_one(prepared_data_dir, tmp_path):
  runs = {}
  for devices in (1, 8):
    code = _TRAIN.format(data_dir=prepared_data_dir, workdir=str(tmp_path / str(devices)))
    count, rows = _rows(run_python(code, devices))
    assert count == devices
    runs[devices] = rows
  keys = ('loss', 'accuracy', 'val_loss', 'val_accuracy')
  print('8 devices vs 1:', [{k: (eight[k], one[k]) for k in keys}
                            for one, eight in zip(runs[1], runs[8])])
  for one, eight in zip(runs[1], runs[8]):
    for key in keys:
      np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=2e-4)


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
