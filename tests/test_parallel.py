"""Data parallelism: 8 CPU devices train like 1, with the batch split over a 'data' mesh axis."""

import json

import numpy as np
import pytest

from conftest import run_python
from flax_mnist import configuration, parallel
from flax_mnist.errors import ConfigError

_TRAIN = '''
import json, jax
from conftest import small_config
from flax_mnist import train
rows = train.train_and_evaluate(small_config({data_dir!r}, num_epochs=3), {workdir!r})
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
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size >= 1


def test_batch_must_split_evenly_over_devices():
  from configs import base
  with pytest.raises(ConfigError, match='config.batch_size=500 is not divisible by the 8 devices'):
    configuration.validate(base.get_config(), device_count=8)
