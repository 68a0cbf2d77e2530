"""The seed notebook's second run: 5x5 kernels and no dropout."""

import importlib.util
import pathlib

import ml_collections


def _base_config() -> ml_collections.ConfigDict:
  # Loaded by path so this file works from any working directory, as config_flags does.
  path = pathlib.Path(__file__).with_name('base.py')
  spec = importlib.util.spec_from_file_location('flax_mnist_base_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  """Returns the base configuration with 5x5 kernels and both dropouts off."""
  config = _base_config()
  config.kernel_size = 5
  config.conv_dropout = 0.0
  config.dense_dropout = 0.0
  return config
