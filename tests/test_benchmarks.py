"""The benchmarks' own logic that needs no peer and no accelerator."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import REPO, small_config
from flax_mnist import plan as plan_lib
from flax_mnist.data import batches, tfds_source

sys.path.insert(0, str(REPO / 'benchmarks'))
import accelerator  # noqa: E402


def _rows(split: batches.Split) -> set[bytes]:
  return {image.tobytes() + bytes([label]) for image, label in zip(split.images, split.labels)}


def test_without_tensorflow_the_idx_files_give_the_same_examples(prepared_data_dir, mnist_dir,
                                                                 monkeypatch):
  """tfds stores the examples in a hash-shuffled order; the IDX files in file order."""
  config = small_config(prepared_data_dir)
  tfds_test = tfds_source.load_split(config, 'test')
  tfds_train = tfds_source.load_split(config, 'train[:1000]')
  monkeypatch.setattr(tfds_source, 'load_split', tfds_source.load_split)  # Restored after.
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'tensorflow' else real_find_spec(name, *a))
  assert 'IDX files read directly' in accelerator.read_idx_splits_if_no_tensorflow(str(mnist_dir))
  idx_test = tfds_source.load_split(config, 'test')
  idx_train = tfds_source.load_split(config, 'train[:60000]')
  assert idx_test.images.shape == (10000, 28, 28, 1) and idx_test.labels.dtype == np.int32
  assert _rows(idx_test) == _rows(tfds_test)  # The same 10,000 test examples.
  assert _rows(tfds_train) <= _rows(idx_train)  # tfds' training examples come from the file.
  assert len(tfds_source.load_split(config, 'train[:1000]')) == 1000
  with pytest.raises(SystemExit, match='only train'):
    tfds_source.load_split(config, 'train[10%:]')


def test_with_tensorflow_the_tfds_path_stays(mnist_dir):
  before = tfds_source.load_split
  assert accelerator.read_idx_splits_if_no_tensorflow(str(mnist_dir)).startswith('tfds')
  assert tfds_source.load_split is before


def test_flax_mnist_sides_run_on_a_small_split(monkeypatch):
  """The benchmarks call the package directly (engines, steps, plan): run them briefly here so a
  change of its API shows in the tests, not on the next accelerator session."""
  import peers
  rng = np.random.default_rng(0)
  split = batches.Split(rng.integers(0, 256, (1000, 28, 28, 1), dtype=np.uint8),
                        rng.integers(0, 10, 1000).astype(np.int32))
  monkeypatch.setattr(tfds_source, 'load_split', lambda config, name: split)
  assert accelerator.device_epoch_rate('float32', '3', 1, idx_dir='') > 0
  config, _ = accelerator.kernel_config_and_split('3', idx_dir='')
  run = peers.make_flax_mnist(config, split.images[:500], split.labels[:500])
  run(2)
  # A batch the plan pads (a prime: whole micro-batches on CPU) gets its masked rows.
  config.batch_size = 127
  assert plan_lib.decide(config).train_padding
  peers.make_flax_mnist(config, split.images[:127], split.labels[:127])(1)


def test_throughput_overrides_and_the_cpu_bound_neighbour():
  import throughput
  config = throughput.with_overrides(small_config('unused'), 'batch_size=125,conv2_features=128')
  assert (config.batch_size, config.conv2_features) == (125, 128)
  with throughput.cpu_bound_neighbour():
    import psutil
    busy = [p for p in psutil.Process().children() if 'while True' in ' '.join(p.cmdline())]
    assert len(busy) == 1
  assert not busy[0].is_running() or busy[0].status() == psutil.STATUS_ZOMBIE


def test_throughput_report_names_the_cpu_vector_set_and_the_installed_tensorflow(monkeypatch, tmp_path):
  import throughput
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('model name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma\n')
  assert throughput.cpu_name(cpuinfo) == 'Some CPU (AVX2)'
  cpuinfo.write_text('model name\t: Other\nflags\t\t: avx2 avx512f\n')
  assert throughput.cpu_name(cpuinfo) == 'Other (AVX-512)'
  monkeypatch.setattr(throughput, 'version', lambda p: '2.21.0' if p == 'tensorflow' else 'missing')
  assert 'tensorflow 2.21.0' in throughput.header(['--kernels', '3'])


def test_seeds_table_summarises_the_lanes_of_a_workdir(tmp_path):
  import seeds_table
  workdir = tmp_path / 'base-3'
  finals = (0.990, 0.992, 0.994)
  for lane, final in enumerate(finals):
    folder = workdir / 'models' / str(lane)
    folder.mkdir(parents=True)
    (folder / 'metrics.jsonl').write_text(''.join(
        json.dumps(dict(epoch=e, val_accuracy=v)) + '\n' for e, v in ((1, 0.995), (2, final))))
  (workdir / 'summary.jsonl').write_text(''.join(
      json.dumps(dict(epoch=e, ensemble_val_accuracy=v, seconds=60.0)) + '\n'
      for e, v in ((1, 0.996), (2, 0.993))))
  assert seeds_table.table_row(workdir) == (
      '| base-3 | 3 | 2 | 0.9920 +- 0.0020 (0.9900-0.9940) | 0.9950 +- 0.0000 | 0.9930 | 0.9960 '
      '| 2 min |')


def test_profile_step_names_each_op_by_shape_and_jax_operation():
  import jax
  import jax.numpy as jnp
  import profile_step
  compiled = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1).lower(
      jnp.ones((8, 4)), jnp.ones((4, 3))).compile()
  shapes = profile_step._op_shapes(compiled.as_text())
  assert shapes and all(v.startswith(('f32[', '(')) for v in shapes.values())
  assert any(v.startswith('f32[8,3]') and v.endswith(('dot_general', 'tanh', 'add'))
             for v in shapes.values()), shapes


def test_ab_step_pairs_each_variant_with_the_first():
  import argparse
  import ab_step
  assert ab_step.parse_variant('mb10=micro_batch_size=10,eval_batch_size=20') == (
      'mb10', 'micro_batch_size=10,eval_batch_size=20')
  assert ab_step.parse_variant('base=') == ('base', '')
  with pytest.raises(argparse.ArgumentTypeError):
    ab_step.parse_variant('=micro_batch_size=10')
  lines = ab_step.compare([('a', 'eval_batch_size=20'),
                           ('b', 'eval_batch_size=20,micro_batch_size=10')],
                          kernel=3, evaluation=True, rounds=2, steps=1)
  assert [line.split()[0] for line in lines] == ['a', 'b']
  assert lines[0].endswith('paired ratio to a: 1.000')


def test_lanes_benchmark_feeds_a_padded_batch_to_every_lane(tmp_path):
  import lanes
  config = tmp_path / 'prime_batch.py'
  config.write_text('from configs import base\n\n\ndef get_config():\n'
                    '  config = base.get_config()\n  config.batch_size = 53\n'
                    "  config.conv_impl = 'winograd'  # Its micro-batch of 50 pads 53.\n"
                    '  return config\n')
  block = lanes.time_block(str(config), 2, 0, 1)
  assert block['batch'] == 53 and block['seconds'] > 0
  assert 'batch padded to 54 (1 masked row), 2 lanes' in block['line']
