"""Validates a config once, up front, against the fields and types of configs/base.py."""

import ml_collections

from flax_mnist import conv, distributed, winograd
from flax_mnist.errors import ConfigError

IMAGE_SIDE = 28

# field -> (type, check, what a valid value is). Every field the package reads is listed.
_SCHEMA = {
    'dataset': (str, bool, 'a tfds dataset name such as mnist'),
    'data_dir': (str, None, 'a folder path or empty'),
    'idx_dir': (str, None, 'a folder path or empty'),
    'train_split': (str, bool, "a tfds split such as 'train[:55000]'"),
    'eval_split': (str, bool, "a tfds split such as 'test'"),
    'kernel_size': (int, lambda v: 1 <= v <= (IMAGE_SIDE - 2) // 2 + 1,
                    'between 1 and 14 (two valid convs and a 2x2 pool must fit in 28x28)'),
    'conv1_features': (int, lambda v: v > 0, 'a positive integer'),
    'conv2_features': (int, lambda v: v > 0, 'a positive integer'),
    'dense_features': (int, lambda v: v > 0, 'a positive integer'),
    'conv_dropout': (float, lambda v: 0 <= v < 1, 'in [0, 1)'),
    'dense_dropout': (float, lambda v: 0 <= v < 1, 'in [0, 1)'),
    'num_classes': (int, lambda v: v > 1, 'an integer above 1'),
    'conv_impl': (str, lambda v: v in conv.IMPLEMENTATIONS,
                  f'one of {", ".join(conv.IMPLEMENTATIONS)}'),
    'micro_batch_size': (int, lambda v: v >= 0, '0 (auto) or a positive integer'),
    'dtype': (str, lambda v: v in ('float32', 'bfloat16'), 'float32 or bfloat16'),
    'learning_rate': (float, lambda v: v > 0, 'a positive number'),
    'adam_b1': (float, lambda v: 0 <= v < 1, 'in [0, 1)'),
    'adam_b2': (float, lambda v: 0 <= v < 1, 'in [0, 1)'),
    'adam_eps': (float, lambda v: v > 0, 'a positive number'),
    'batch_size': (int, lambda v: v > 0, 'a positive integer'),
    'eval_batch_size': (int, lambda v: v > 0, 'a positive integer'),
    'num_epochs': (int, lambda v: v > 0, 'a positive integer'),
    'seed': (int, lambda v: v >= 0, 'a non-negative integer'),
    'progress_bar': (bool, None, 'True or False'),
    'log_every_steps': (int, lambda v: v >= 0, '0 (off) or a positive number of steps'),
    'device_data': (str, lambda v: v in ('auto', 'on', 'off'), 'one of auto, on, off'),
    'distributed': (str, lambda v: v in distributed.MODES,
                    f'one of {", ".join(distributed.MODES)}'),
    'coordinator_address': (str, lambda v: not v or v.rpartition(':')[2].isdigit(),
                            "empty or HOST:PORT, e.g. '10.0.0.2:1234'"),
    'num_processes': (int, lambda v: v >= 0, '0 (detect) or a positive integer'),
    'process_id': (int, lambda v: v >= -1, '-1 (detect) or a process index from 0'),
    'keep_checkpoints': (int, lambda v: v > 0, 'a positive integer'),
    'init_from': (str, lambda v: not v or v.endswith(('.h5', '.hdf5')),
                  'empty or the path of a Keras .h5/.hdf5 file'),
}


def _check_type(name, value, kind):
  ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    ok = True
  if not ok:
    raise ConfigError(f'config.{name}={value!r} must be {kind.__name__}.')


def validate(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
  """Raises ConfigError (one line, naming the field and the fix) unless config is usable."""
  unknown = sorted(set(config.keys()) - set(_SCHEMA))
  if unknown:
    raise ConfigError(f'unknown config field(s) {", ".join(unknown)}; valid fields: '
                      f'{", ".join(sorted(_SCHEMA))}.')
  missing = sorted(set(_SCHEMA) - set(config.keys()))
  if missing:
    raise ConfigError(f'config lacks field(s) {", ".join(missing)}; start from configs/base.py.')
  for name, (kind, check, valid) in _SCHEMA.items():
    value = config[name]
    _check_type(name, value, kind)
    if check is not None and not check(value):
      raise ConfigError(f'config.{name}={value!r} is invalid: must be {valid}.')
  for name in ('batch_size', 'eval_batch_size', 'micro_batch_size'):
    if config[name] % device_count:
      raise ConfigError(f'config.{name}={config[name]} is not divisible by the {device_count} '
                        f'devices; use a multiple of {device_count}.')
  if config.num_processes and config.process_id >= config.num_processes:
    raise ConfigError(f'config.process_id={config.process_id} must be below '
                      f'config.num_processes={config.num_processes}; number processes from 0.')
  if config.conv_impl == 'winograd' and config.kernel_size not in winograd.KERNEL_SIZES:
    raise ConfigError(f'config.conv_impl=winograd has no transform for kernel_size='
                      f'{config.kernel_size} (only {", ".join(map(str, winograd.KERNEL_SIZES))})'
                      '; use conv_impl=auto or im2col_vjp.')
  micro = config.micro_batch_size
  if micro and (config.batch_size % micro or config.eval_batch_size % micro):
    raise ConfigError(f'config.micro_batch_size={micro} must divide batch_size='
                      f'{config.batch_size} and eval_batch_size={config.eval_batch_size}; '
                      'use a common divisor, or 0 for auto.')
