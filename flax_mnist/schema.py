"""The config schema: every field declared once, with its default, check and meaning.

configs/*.py start from `defaults()`; `validate` checks a config against the schema before
anything runs; `resume_differences` compares a checkpoint's config with the current one
(fields marked `resumable` may differ); `--mode=config` prints `describe`; the README's field
table is `markdown_table()` (tests/test_schema.py keeps them equal). It imports no JAX and no
kernels, so `--help` and config errors are instant. Choices that depend on the hardware
('auto') are not decided here but in flax_mnist/plan.py.

  python -m flax_mnist.schema        # prints the README's field table
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections

from flax_mnist.errors import ConfigError
from flax_mnist.geometry import IMAGE_SIDE

CONV_IMPLS = ('auto', 'im2col', 'im2col_vjp', 'winograd', 'winograd_native', 'xla')
SWITCH = ('auto', 'on', 'off')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field. Its type is its default's; `check` (None: any value of the type) is
  described by `valid`; `resumable` fields may differ from a checkpoint's config (they change
  neither the model nor what training computes); `training_only` ones may differ where a
  checkpoint is only read (eval, export, predict, report: they shape how training went, not the
  model it left). A checkpoint written before a field existed is read as if it had the field's
  default."""
  name: str
  default: Any
  meaning: str
  check: Callable[[Any], bool] | None = None
  valid: str = ''
  resumable: bool = False
  training_only: bool = False

  @property
  def kind(self) -> type:
    return type(self.default)


def _positive(name, default, meaning, **kw):
  kind = 'integer' if isinstance(default, int) else 'finite number'
  return Field(name, default, meaning, lambda v: 0 < v < math.inf, f'a positive {kind}', **kw)


def _rate(name, default, meaning, **kw):
  return Field(name, default, meaning, lambda v: 0 <= v < 1, 'in [0, 1)', **kw)


def _choice(name, default, choices, meaning, **kw):
  return Field(name, default, meaning, lambda v: v in choices, f'one of {", ".join(choices)}',
               **kw)


# JAX (without x64) keeps a key's lower 32 bits: seed 2**32 would initialise as seed 0 does.
MAX_SEED = 2**32 - 1
_MAX_KERNEL = (IMAGE_SIDE - 2) // 2 + 1  # Two valid convs and a 2x2 pool must fit the image.

FIELDS = (
    # Data.
    Field('dataset', 'mnist', 'tfds dataset of 28x28x1 images with `num_classes` labels '
          '(`mnist`, `fashion_mnist`, `kmnist`)', bool, 'a tfds dataset name such as mnist'),
    Field('data_dir', '', "tfds data dir (`''`: tfds' default, `~/tensorflow_datasets`)",
          resumable=True),
    Field('idx_dir', '', 'folder of the four IDX files: prepares the dataset offline',
          resumable=True),
    Field('train_split', 'train[:55000]', 'split to train on (the seed trains on 55,000 '
          'images)', bool, "a tfds split such as 'train[:55000]'", training_only=True),
    Field('eval_split', 'test', 'split validated on after every epoch (every example once: '
          'padding rows are masked)', bool, "a tfds split such as 'test'", resumable=True),
    # Model: the seed's Keras Sequential, layer for layer.
    Field('kernel_size', 3, 'conv kernel size (the seed\'s second run: 5)',
          lambda v: 1 <= v <= _MAX_KERNEL, f'between 1 and {_MAX_KERNEL} (two valid convs and '
          f'a 2x2 pool must fit in {IMAGE_SIDE}x{IMAGE_SIDE})'),
    _positive('conv1_features', 32, 'filters of the first convolution'),
    _positive('conv2_features', 64, 'filters of the second convolution'),
    _positive('dense_features', 128, 'units of the hidden dense layer'),
    _rate('conv_dropout', 0.25, 'dropout after the pool (0 disables)', training_only=True),
    _rate('dense_dropout', 0.5, 'dropout after the hidden dense layer (0 disables)',
          training_only=True),
    Field('num_classes', 10, 'output classes', lambda v: v > 1, 'an integer above 1'),
    # How it is computed: speed only, never the maths (beyond float rounding).
    _choice('conv_impl', 'auto', CONV_IMPLS, 'convolution kernels: `winograd` (computed by '
            'XLA), `winograd_native` (the same in C++, built on first use; one CPU device), '
            '`im2col`, `im2col_vjp`, `xla`; `auto` picks per layer and backend (printed in the '
            'plan)', resumable=True),
    Field('micro_batch_size', 0, 'examples per micro-batch, gradients summed over them '
          '(0: auto, printed in the plan)', lambda v: v >= 0, '0 (auto) or a positive integer',
          resumable=True),
    _choice('device_data', 'auto', SWITCH, 'keep the training split on the devices, one '
            '`lax.scan` per epoch (auto: on for GPU/TPU with one process)', resumable=True),
    _choice('dtype', 'float32', DTYPES, '`bfloat16`: mixed precision (layers in bf16; '
            'params, optimizer, softmax and loss float32)', training_only=True),
    # Optimizer: Keras' Adam defaults.
    _positive('learning_rate', 1e-3, 'Adam learning rate', training_only=True),
    _rate('adam_b1', 0.9, "Adam's beta_1", training_only=True),
    _rate('adam_b2', 0.999, "Adam's beta_2", training_only=True),
    _positive('adam_eps', 1e-7, "Adam's epsilon (Keras' default, not optax's 1e-8)",
              training_only=True),
    # Training.
    _positive('batch_size', 500, 'global training batch (split over devices)',
              training_only=True),
    _positive('eval_batch_size', 1000, 'global evaluation batch', resumable=True),
    _positive('num_epochs', 20, 'epochs to train (raise it to train a finished run on)',
              resumable=True),
    Field('seed', 42, 'initialisation, data order (a function of seed and epoch) and dropout',
          lambda v: 0 <= v <= MAX_SEED, f'an integer from 0 to {MAX_SEED}', training_only=True),
    # Many models in one program (flax_mnist/lanes.py).
    _positive('num_models', 1, 'models trained together in one program; lane i is the model '
              'that `seed + i` trains alone (outputs in `WORKDIR/models/<lane>/`)'),
    Field('sweep', '', "lanes of other hyperparameters, a grid times `num_models`: e.g. "
          "`'learning_rate=1e-3,3e-3; dense_dropout=0.25,0.5'` (learning_rate, adam_b1, "
          'adam_b2, adam_eps, conv_dropout, dense_dropout)'),
    Field('lanes_per_pass', 0, 'lanes computed at once by `jax.vmap` (0: auto, printed in the '
          'plan: 1 on CPU, where caches favour one lane at a time; all elsewhere)',
          lambda v: v >= 0, '0 (auto) or a positive integer', resumable=True),
    Field('progress_bar', True, 'draw the in-epoch bar (only on a terminal)', resumable=True),
    Field('log_every_steps', 10, 'TensorBoard gets the loss and accuracy of every N-th step '
          '(0: per-epoch metrics only)', lambda v: v >= 0,
          '0 (off) or a positive number of steps', resumable=True),
    # Several processes (multi-host).
    _choice('distributed', 'auto', SWITCH, '`on`: call `jax.distributed.initialize`; `auto`: '
            'when `coordinator_address` is set or the environment announces a multi-process '
            'job', resumable=True),
    Field('coordinator_address', '', "`HOST:PORT` of process 0 (`''`: JAX finds it)",
          lambda v: not v or v.rpartition(':')[2].isdigit(),
          "empty or HOST:PORT, e.g. '10.0.0.2:1234'", resumable=True),
    Field('num_processes', 0, 'number of processes (0: JAX detects it)', lambda v: v >= 0,
          '0 (detect) or a positive integer', resumable=True),
    Field('process_id', -1, "this process's index from 0 (-1: JAX detects it)",
          lambda v: v >= -1, '-1 (detect) or a process index from 0', resumable=True),
    # Checkpoints and starting weights.
    _positive('keep_checkpoints', 3, 'newest checkpoints kept (plus the best by val_accuracy)',
              resumable=True),
    Field('init_from', '', 'a Keras `.h5` or `.keras` of the same architecture to start from '
          '(weights only)', lambda v: not v or v.endswith(('.h5', '.hdf5', '.keras')),
          'empty or the path of a Keras .h5/.hdf5/.keras file', resumable=True),
)
BY_NAME = {f.name: f for f in FIELDS}


def defaults() -> ml_collections.ConfigDict:
  """A config holding every field at its default: the seed notebook's first run."""
  return ml_collections.ConfigDict({f.name: f.default for f in FIELDS})


def _check_type(field: Field, value) -> None:
  kind = field.kind
  ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    ok = True
  if not ok:
    raise ConfigError(f'config.{field.name}={value!r} must be {kind.__name__}.')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line, naming the field and the fix) unless every field is known,
  present, of its type and valid. Checks that need the device count (micro-batch divisibility,
  kernels) are the plan's."""
  unknown = sorted(set(config.keys()) - set(BY_NAME))
  if unknown:
    raise ConfigError(f'unknown config field(s) {", ".join(unknown)}; valid fields: '
                      f'{", ".join(sorted(BY_NAME))}.')
  missing = sorted(set(BY_NAME) - set(config.keys()))
  if missing:
    raise ConfigError(f'config lacks field(s) {", ".join(missing)}; start from '
                      'flax_mnist.schema.defaults() as configs/base.py does.')
  for field in FIELDS:
    value = config[field.name]
    _check_type(field, value)
    if field.check is not None and not field.check(value):
      raise ConfigError(f'config.{field.name}={value!r} is invalid: must be {field.valid}.')
  from flax_mnist import lanes  # Imports no JAX.
  lanes.check(config)
  if config.seed + config.num_models - 1 > MAX_SEED:  # Lane i draws from seed + i.
    raise ConfigError(f'config.seed={config.seed} with num_models={config.num_models} gives '
                      f'lane seeds above {MAX_SEED}; lower config.seed.')
  if config.num_processes and config.process_id >= config.num_processes:
    raise ConfigError(f'config.process_id={config.process_id} must be below '
                      f'config.num_processes={config.num_processes}; number processes from 0.')


def resume_differences(saved: dict, current: dict, training: bool = True) -> list[str]:
  """'field: saved -> current' for every field that must match (not resumable, nor
  training_only where the checkpoint is only read) whose values differ; a field the saved
  config lacks (older than the field) counts as its default."""
  saved = {**{f.name: f.default for f in FIELDS}, **saved}
  free = {f.name for f in FIELDS if f.resumable or (f.training_only and not training)}
  names = sorted((set(saved) | set(current)) - free)
  return [f'{n}: {saved.get(n, "(absent)")!r} -> {current.get(n, "(absent)")!r}'
          for n in names if _meaning(n, saved.get(n)) != _meaning(n, current.get(n))]


def _meaning(name: str, value):
  """A field's value as it is understood: a sweep's grid, however spaced or its numbers
  written ('1e-3' or '0.001')."""
  if name == 'sweep' and isinstance(value, str):
    from flax_mnist import lanes  # lanes imports this module lazily; no cycle at import.
    return lanes.parse_sweep(value)
  return value


def as_trained(config: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
  """`config` with its training_only fields as the checkpoint's `saved` config has them (a
  field it lacks: its default), but `dtype`, which says how the model is read: what a file that
  records how the model was trained (an export's optimizer and dropout) must say, when the
  command line that reads the checkpoint gives other values."""
  trained = config.copy_and_resolve_references()
  with trained.unlocked():
    for field in FIELDS:
      if field.training_only and field.name != 'dtype':
        trained[field.name] = saved.get(field.name, field.default)
  return trained


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field with its value and meaning, one per line (--mode=config)."""
  width = max(map(len, BY_NAME))
  return '\n'.join(f'{f.name:<{width}} = {config[f.name]!r:<16} # {f.meaning.replace("`", "")}'
                   for f in FIELDS)


def markdown_table() -> str:
  """The README's table of fields: name, default, meaning."""
  rows = ['| field | default | meaning |', '| --- | --- | --- |']
  rows += [f'| `{f.name}` | `{f.default!r}` | {f.meaning} |' for f in FIELDS]
  return '\n'.join(rows)


if __name__ == '__main__':
  print(markdown_table())
