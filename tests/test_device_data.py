"""Device-resident epochs (one lax.scan each) give the host-fed path's numbers."""

import jax
import numpy as np

from conftest import assert_adam_params_close, base_config, small_config
from flax_mnist import device_data, input_pipeline, metric_writers, modes, train
from test_metric_writers import read_scalars


def test_device_epochs_equal_host_fed_epochs(prepared_data_dir, tmp_path):
  runs = {}
  for mode in ('off', 'on'):
    config = small_config(prepared_data_dir, device_data=mode, log_every_steps=3)
    rows = train.train_and_evaluate(config, str(tmp_path / mode))
    _, state, _ = modes.restore(config, str(tmp_path / mode), 'latest')
    runs[mode] = rows, jax.tree.leaves(jax.device_get(state.params)), read_scalars(
        tmp_path / mode / metric_writers.LOG_DIR)
  for host_row, device_row in zip(runs['off'][0], runs['on'][0]):
    for key in ('loss', 'accuracy', 'val_loss', 'val_accuracy'):
      np.testing.assert_allclose(device_row[key], host_row[key], rtol=1e-6)
  # The two compiled programs round differently (the conv's custom backward fuses differently
  # inside the epoch's scan).
  assert_adam_params_close(runs['on'][1], runs['off'][1], config.learning_rate)
  for tag in ('steps/loss', 'steps/accuracy'):  # TensorBoard every 3 steps, on both paths.
    host, device = runs['off'][2][tag], runs['on'][2][tag]
    assert [s for s, _ in host] == [s for s, _ in device] == [3, 6, 9]
    np.testing.assert_allclose([v for _, v in device], [v for _, v in host], rtol=1e-5)


def test_epoch_rows_are_the_host_batches():
  split = input_pipeline.Split(images=np.zeros((1050, 28, 28, 1), np.uint8),
                               labels=np.arange(1050, dtype=np.int32))
  host = [labels for _, labels in input_pipeline.train_batches(split, 100, seed=4, epoch=2)]
  np.testing.assert_array_equal(device_data.epoch_rows(1050, 100, seed=4, epoch=2), host)


def test_auto_is_on_for_accelerators_only():
  config = base_config()
  assert device_data.use_device_data(config, 'gpu') and device_data.use_device_data(config, 'tpu')
  assert not device_data.use_device_data(config, 'cpu')
  assert device_data.use_device_data(base_config(device_data='on'), 'cpu')
