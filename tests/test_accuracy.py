"""One epoch of the base config on the full 55,000 real training images reaches the seed's."""

from conftest import base_config
from flax_mnist import loop


def test_one_epoch_reaches_seed_accuracy(tmp_path, prepared_data_dir):
  config = base_config(data_dir=prepared_data_dir, num_epochs=1, progress_bar=False)
  rows = loop.train_and_evaluate(config, str(tmp_path))
  assert rows[0]['val_accuracy'] >= 0.97, rows  # The seed's first epoch: 0.9728.
