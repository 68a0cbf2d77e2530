"""The seed notebook's first run: 3x3 kernels, both dropouts, Adam, batch 500, 20 epochs.

Every field, its default and its meaning: flax_mnist/schema.py, or
`python -m flax_mnist.main --config configs/base.py --mode=config`.
"""

import ml_collections

from flax_mnist import schema


def get_config() -> ml_collections.ConfigDict:
  """The schema's defaults, which are the seed's first run."""
  return schema.defaults()
