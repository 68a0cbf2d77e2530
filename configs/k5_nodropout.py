"""The seed notebook's second run: 5x5 kernels and no dropout."""

import ml_collections

from flax_mnist import schema


def get_config() -> ml_collections.ConfigDict:
  """The base configuration with 5x5 kernels and both dropouts off."""
  config = schema.defaults()
  config.kernel_size = 5
  config.conv_dropout = 0.0
  config.dense_dropout = 0.0
  return config
