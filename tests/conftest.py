"""Shared fixtures: the real MNIST IDX files and a tfds data dir prepared from them once."""

import pathlib

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


@pytest.fixture(scope='session')
def mnist_dir() -> pathlib.Path:
  assert (MNIST_DIR / 't10k-labels-idx1-ubyte.gz').is_file(), (
      f'real MNIST IDX files expected in {MNIST_DIR}')
  return MNIST_DIR


@pytest.fixture(scope='session')
def prepared_data_dir(mnist_dir, tmp_path_factory) -> str:
  """A tfds data dir holding mnist prepared offline from the IDX files (done once per session)."""
  from flax_mnist import input_pipeline
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = base_config(idx_dir=str(mnist_dir), data_dir=data_dir)
  input_pipeline.ensure_prepared(config, input_pipeline.get_builder(config))
  return data_dir
