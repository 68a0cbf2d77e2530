"""Checks what a run's config points at before any work: dataset, splits, IDX files, init_from.

schema.validate checks the fields themselves; this checks the things they name, so a
mistyped dataset, a malformed IDX file or a .h5 of another architecture fails in seconds with
one line, before a workdir, checkpoint folder or prepared dataset is written.
"""

import pathlib

from flax_mnist.data import idx, tfds_source
from flax_mnist.errors import DataError, first_line

# Modes that read the dataset, and the config fields naming the splits each reads.
_SPLITS = {'train': ('train_split', 'eval_split'), 'eval': ('eval_split',),
           'report': ('eval_split',)}


def check(config, plan, mode: str, workdir: str | pathlib.Path) -> None:
  """Raises a FlaxMnistError (one line, naming the input and the fix) unless `mode` can run."""
  if mode in _SPLITS:
    check_dataset(config, _SPLITS[mode])
  if config.init_from and not _has_checkpoints(workdir):
    check_init_from(config, plan)


def _has_checkpoints(workdir) -> bool:
  directory = pathlib.Path(workdir) / 'checkpoints'
  return directory.is_dir() and any(directory.iterdir())


def check_dataset(config, split_fields: tuple[str, ...]) -> None:
  """The dataset exists in tfds and is 28x28x1 with num_classes labels (read from the builder's
  info, no download); idx_dir's files are valid; the splits exist and hold enough examples."""
  builder = tfds_source.get_builder(config)
  if not builder.is_prepared():
    if config.idx_dir:
      for split in idx.SPLIT_FILES:
        idx.read_split(config.idx_dir, split)
    return  # Split sizes are known only once the data is there.
  for field in split_fields:
    _check_split(config, builder, field)


def _check_split(config, builder, field: str) -> None:
  split = config[field]
  try:
    examples = builder.info.splits[split].num_examples
  except (ValueError, KeyError) as e:
    raise DataError(f'config.{field}={split!r}: {first_line(e)} '
                    f"(splits of {config.dataset!r}: {', '.join(builder.info.splits)}).") from None
  needed = config.batch_size if field == 'train_split' else 1
  if examples < needed:
    raise DataError(f'config.{field}={split!r} holds {examples} examples, fewer than '
                    f'{needed}; widen the split' + (' or lower config.batch_size.'
                                                    if field == 'train_split' else '.'))


def check_init_from(config, plan) -> None:
  """config.init_from is a readable Keras .h5 of this config's architecture."""
  from flax_mnist import steps  # Builds the model: imported only when needed.
  steps.create(config, plan, keras_weights=config.init_from)
