"""Checks what a run's config points at before any work: dataset, splits, IDX files, init_from;
then prepares the dataset.

schema.validate checks the fields themselves; this checks the things they name, so a
mistyped dataset, a malformed IDX file, a split that does not exist or a .h5 of another
architecture fails in seconds with one line, before a workdir, checkpoint folder or prepared
dataset is written, whether or not the dataset was prepared before. The dataset is prepared
here too, still before the workdir: a download that fails leaves nothing behind.
"""

import pathlib
import tempfile

from flax_mnist.data import offline, prepare, split_cache, tfds_source
from flax_mnist.errors import DataError, WorkdirError, first_line
from flax_mnist.geometry import IMAGE_SHAPE

# Modes that read the dataset, and the config fields naming the splits each reads.
_SPLITS = {'train': ('train_split', 'eval_split'), 'eval': ('eval_split',),
           'report': ('eval_split',)}


def check(config, plan, mode: str, workdir: str | pathlib.Path, output: str = '') -> None:
  """Raises a FlaxMnistError (one line, naming the input and the fix) unless `mode` can run;
  prepares the dataset once every input that can be checked without it has passed."""
  # Where the mode writes: predict writes nothing, export with --output only beside it.
  writes_workdir = mode != 'predict' and not (mode == 'export' and output)
  check_folder(workdir, '--workdir', writes=writes_workdir)
  if mode == 'export' and output:
    check_folder(pathlib.Path(output).parent, '--output', writes=True, named=output)
  elif mode in ('train', 'export'):
    check_keras_files(workdir, plan.lanes if plan else 1)
  reads_data = mode in _SPLITS and not _cached(config, _SPLITS[mode])
  if reads_data:
    builder, idx_splits = check_dataset(config, _SPLITS[mode])
  if config.init_from and has_checkpoints(workdir):  # Resuming: the weights are the run's.
    from flax_mnist.reporting.console import say
    say(f'Not reading config.init_from={config.init_from}: {workdir} has checkpoints, which '
        f'--mode={mode} reads instead.')
  elif config.init_from:
    check_init_from(config, plan)
  if reads_data:
    prepare_dataset(config, builder, idx_splits, _SPLITS[mode])


def check_folder(path: str | pathlib.Path, flag: str, writes: bool = False,
                 named: str = '') -> None:
  """A folder (--workdir, --output's) that is a file, lies under one, is a link to nothing,
  cannot be reached or, where the mode writes, cannot be written fails here in one line, naming
  `flag`'s value (`named`, else the folder); later it would be a traceback from the first mkdir
  or open, after the dataset was prepared or the checkpoint restored. A URL (gs://...) fails
  too: as a path it would name a local folder 'gs:' below the current one."""
  if '://' in str(named or path):
    raise WorkdirError(f'{flag}={named or path}: a URL; flax_mnist writes to local folders only '
                       f'(mount a bucket, e.g. with gcsfuse, and pass the mounted folder).')
  path = pathlib.Path(path)
  flag_value = f'{flag}={named or path}'
  try:
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
  except OSError as e:
    raise WorkdirError(f'{flag_value}: cannot be reached ({e.strerror or type(e).__name__}); '
                       f'pass another {flag}.') from None
  if not existing.is_dir():
    what = 'a file' if existing.exists() else 'a link to nothing'  # Found as a link.
    raise WorkdirError(f'{flag_value}: {existing} is {what}, not a folder; pass another '
                       f'{flag}.')
  if writes:
    try:
      with tempfile.TemporaryFile(dir=existing):  # Unnamed, gone when closed.
        pass
    except OSError as e:
      raise WorkdirError(f'{flag_value}: {existing} cannot be written '
                         f'({e.strerror or type(e).__name__}); pass another {flag}.') from None


def check_keras_files(workdir: str | pathlib.Path, lanes: int) -> None:
  """The Keras files that training (at its end) and export write by default, WORKDIR/
  keras_cnn.h5 or each lane's in WORKDIR/models/<lane>/, must not be folders: found when the
  file is written, after every epoch, it was a traceback."""
  from flax_mnist.keras.layout import EXPORT_NAME
  from flax_mnist.reporting.summary import model_dir
  for path in (model_dir(workdir, lanes, i) / EXPORT_NAME for i in range(lanes)):
    if path.is_dir():
      raise WorkdirError(f'{path}: a folder where the run writes its Keras file; move it '
                         'away, or pass another --workdir.')


def _cached(config, split_fields: tuple[str, ...]) -> bool:
  """Whether every split is in the split cache (checked when it was stored, and its dataset
  unchanged since), with enough examples: then nothing about the dataset needs tfds."""
  found = [split_cache.recorded(config, config[field]) for field in split_fields]
  if None in found:
    return False
  for field, (examples, classes) in zip(split_fields, found):
    tfds_source.check_features(config, IMAGE_SHAPE, classes)  # As get_builder does from tfds.
    _check_size(config, field, examples)
  return True


def has_checkpoints(workdir) -> bool:
  """Whether the workdir holds a complete checkpoint (a step folder; not the temporary folder
  of a save that a kill cut short, which opening the checkpoints removes)."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_dataset(config, split_fields: tuple[str, ...]):
  """The dataset exists in tfds and is 28x28x1 with num_classes labels (read from the builder's
  info, no download); idx_dir's files are valid; the splits exist and hold enough examples.

  Split sizes come from the prepared dataset or, before a first offline run, from the IDX files
  that it will be prepared from. Returns (builder, the IDX arrays read or None) for
  prepare_dataset.
  """
  builder = tfds_source.get_builder(config)
  idx_splits = None
  if builder.is_prepared():
    splits = builder.info.splits
  elif config.idx_dir:
    offline.check_files_belong(config.dataset, config.idx_dir)
    idx_splits = offline.read_splits(config.idx_dir)
    splits = tfds_source.split_dict(builder, offline.split_sizes(idx_splits))
  else:
    return builder, None  # Split sizes are known only once tfds has downloaded the data.
  for field in split_fields:
    _check_split(config, splits, field)
  return builder, idx_splits


def prepare_dataset(config, builder, idx_splits, split_fields: tuple[str, ...]) -> None:
  """Prepares the dataset (process 0 first, into a data_dir that the processes may share); a
  dataset just downloaded has its splits checked now, its sizes being known only now."""
  from flax_mnist import distributed  # Imports JAX, which main has started already.
  checked = builder.is_prepared() or idx_splits is not None
  with distributed.main_process_first('prepare_data'):
    prepare.ensure_prepared(config, builder, idx_splits)
  if not checked:
    splits = tfds_source.get_builder(config).info.splits  # Read again: now on disk.
    for field in split_fields:
      _check_split(config, splits, field)


def _check_split(config, splits, field: str) -> None:
  split = config[field]
  try:
    examples = splits[split].num_examples
  except (ValueError, KeyError) as e:
    raise DataError(f'config.{field}={split!r}: {first_line(e)} '
                    f"(splits of {config.dataset!r}: {', '.join(splits)}).") from None
  _check_size(config, field, examples)


def _check_size(config, field: str, examples: int) -> None:
  split = config[field]
  needed = config.batch_size if field == 'train_split' else 1
  if examples < needed:
    raise DataError(f'config.{field}={split!r} holds {examples} examples, fewer than '
                    f'{needed}; widen the split' + (' or lower config.batch_size.'
                                                    if field == 'train_split' else '.'))


def check_init_from(config, plan) -> None:
  """config.init_from is a readable Keras .h5 or .keras of this config's architecture."""
  from flax_mnist import steps  # Builds the model: imported only when needed.
  steps.create(config, plan, keras_weights=config.init_from)
