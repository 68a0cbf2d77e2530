"""Shared fixtures: the real MNIST IDX files and a tfds data dir prepared from them once."""

import gzip
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The project's real MNIST files live beside the checkout (shared/data/mnist).
MNIST_DIR = REPO.parent / 'shared' / 'data' / 'mnist'


def base_config(**overrides):
  """configs/base.py with `overrides` applied."""
  from configs import base
  config = base.get_config()
  config.update(overrides)
  return config


def assert_adam_params_close(params, expected, learning_rate):
  """Params of two runs whose gradients differ only in rounding (another summation order).

  Adam's update is ~lr * sign(gradient) where a gradient is near zero, so a rounding-sized
  change can move a rare weight by up to 2 * lr over a few steps (Winograd's conv2 rounds
  differently in each compiled program: seen up to 0.16% of a layer's weights); 99% must agree
  within 1e-5. A real difference in the computation moves most weights.
  """
  for got, want in zip(params, expected):
    difference = np.abs(np.asarray(got) - np.asarray(want))
    assert difference.max() <= 2 * learning_rate
    assert (difference > 1e-5).mean() < 1e-2, (difference > 1e-5).sum()


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Tests compile as users' runs do, through JAX's persistent compilation cache, kept in this
  session's temp folder instead of ~/.cache: the command lines that tests start inherit the
  variable, and this process turns the cache on as main does (a program that an earlier test
  compiled, with its own jit objects, then loads in a blink)."""
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jax_cache'))
  from flax_mnist import main
  main.enable_compilation_cache()


@pytest.fixture(scope='session', autouse=True)
def session_split_cache(tmp_path_factory):
  """The split cache, as users have it, in this session's temp folder (a split read once is
  read again without tfds, as by users; tests of the tfds paths turn it off: split_cache_off)."""
  os.environ['FLAX_MNIST_SPLIT_CACHE'] = str(tmp_path_factory.mktemp('split_cache'))


@pytest.fixture(scope='session', autouse=True)
def session_native_kernels(tmp_path_factory):
  """The C++ Winograd kernels built once, before any test, into this session's temp folder
  (not ~/.cache), for this process and the command lines tests start (which inherit it)."""
  os.environ['FLAX_MNIST_CACHE'] = str(tmp_path_factory.mktemp('flax_mnist_cache'))
  from flax_mnist.ops import native_build
  native_build.unavailable()


@pytest.fixture(name='split_cache_off')
def fixture_split_cache_off(monkeypatch):
  """Splits read through tfds, every time."""
  monkeypatch.setenv('FLAX_MNIST_SPLIT_CACHE', 'off')


@pytest.fixture(scope='session')
def mnist_dir() -> pathlib.Path:
  assert (MNIST_DIR / 't10k-labels-idx1-ubyte.gz').is_file(), (
      f'real MNIST IDX files expected in {MNIST_DIR}')
  return MNIST_DIR


@pytest.fixture(scope='session')
def prepared_data_dir(mnist_dir, tmp_path_factory) -> str:
  """A tfds data dir holding mnist prepared offline from the IDX files (done once per session)."""
  from flax_mnist.data import prepare, tfds_source
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = base_config(idx_dir=str(mnist_dir), data_dir=data_dir)
  prepare.ensure_prepared(config, tfds_source.get_builder(config))
  return data_dir


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(name='tiny_idx_dir')
def fixture_tiny_idx_dir(tmp_path, mnist_dir):
  """Four IDX files of 300 + 100 real digits: preparations that take a second."""
  from flax_mnist.data import idx
  folder = tmp_path / 'tiny_idx'
  folder.mkdir()
  images, labels = idx.read_split(mnist_dir, 'test')
  for split, rows in (('train', slice(0, 300)), ('test', slice(300, 400))):
    image_stem, label_stem = idx.SPLIT_FILES[split]
    _write_idx(folder / f'{image_stem}.gz', images[rows])
    _write_idx(folder / f'{label_stem}.gz', labels[rows])
  return folder


def cpu_plan(config):
  """The run plan of `config` on one CPU device (what the tests' processes run on)."""
  from flax_mnist import plan
  return plan.make(config, 'cpu', 1)


def small_config(data_dir: str, **overrides):
  """A seconds-long run on real data: 1000 training images, 600 test images, batch 200."""
  settings = dict(data_dir=data_dir, train_split='train[:1000]', eval_split='test[:600]',
                  batch_size=200, eval_batch_size=200, num_epochs=2, progress_bar=False)
  settings.update(overrides)
  return base_config(**settings)


def run_python(code: str, devices: int = 1, timeout: int = 600):
  """Runs `code` in a fresh interpreter with `devices` CPU devices; returns the process."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{REPO / "tests"}',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope='session')
def trained_workdir(prepared_data_dir, tmp_path_factory):
  """A workdir holding a finished 2-epoch small run: checkpoints, metrics.jsonl, keras_cnn.h5."""
  from flax_mnist import loop
  workdir = tmp_path_factory.mktemp('trained')
  loop.train_and_evaluate(small_config(prepared_data_dir), str(workdir))
  return workdir
