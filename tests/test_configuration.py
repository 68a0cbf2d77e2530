"""Config validation: the shipped configs pass; every bad field fails with a one-line error."""

import pytest

from configs import base, k5_nodropout
from flax_mnist import configuration
from flax_mnist.errors import ConfigError


def test_shipped_configs_are_valid():
  configuration.validate(base.get_config())
  configuration.validate(k5_nodropout.get_config())


def test_k5_is_the_seed_second_run():
  config = k5_nodropout.get_config()
  assert (config.kernel_size, config.conv_dropout, config.dense_dropout) == (5, 0.0, 0.0)
  assert config.batch_size == 500 and config.num_epochs == 20


@pytest.mark.parametrize('field, value, message', [
    ('batch_size', 0, 'config.batch_size=0 is invalid: must be a positive integer'),
    ('num_epochs', -1, 'config.num_epochs=-1 is invalid'),
    ('kernel_size', 15, 'config.kernel_size=15 is invalid: must be between 1 and 14'),
    ('conv_dropout', 1.0, r'config.conv_dropout=1.0 is invalid: must be in \[0, 1\)'),
    ('conv_impl', 'fft',
     'config.conv_impl=.fft. is invalid: must be one of auto, im2col, im2col_vjp, winograd, '
     'xla'),
    ('learning_rate', 0.0, 'config.learning_rate=0.0 is invalid'),
])
def test_bad_values(field, value, message):
  config = base.get_config()
  config[field] = value
  with pytest.raises(ConfigError, match=message):
    configuration.validate(config)


def test_winograd_needs_a_kernel_size_it_has_a_transform_for():
  config = base.get_config()
  config.update(conv_impl='winograd', kernel_size=5)
  configuration.validate(config)
  config.kernel_size = 7
  with pytest.raises(ConfigError, match='^config.conv_impl=winograd has no transform for '
                     r'kernel_size=7 \(only 3, 5\); use conv_impl=auto or im2col_vjp.$'):
    configuration.validate(config)


def test_wrong_type():
  config = base.get_config().to_dict()
  config['batch_size'] = '500'
  import ml_collections
  with pytest.raises(ConfigError, match="config.batch_size='500' must be int"):
    configuration.validate(ml_collections.ConfigDict(config))


def test_unknown_field():
  config = base.get_config()
  config.batch_sise = 100
  with pytest.raises(ConfigError, match='unknown config field.*batch_sise'):
    configuration.validate(config)


def test_batch_not_divisible_by_devices():
  config = base.get_config()
  config.batch_size = 500
  with pytest.raises(ConfigError, match='not divisible by the 3 devices'):
    configuration.validate(config, device_count=3)
