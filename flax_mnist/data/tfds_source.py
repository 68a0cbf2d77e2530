"""Reads a 28x28x1 tfds dataset (mnist, fashion_mnist, kmnist) into memory through
tensorflow-datasets: its builder, its download manager and checksums, or our IDX files offline.

MNIST is 47 MB as uint8, so each split is read once, whole, into a batches.Split.

TensorFlow is optional. Where it imports, datasets are prepared as tfds' default tfrecord and
read with `builder.as_dataset`, as always. Where it does not, they are prepared as array_record
(offline.py says how, without TensorFlow), and a dataset holding array_record is read with
tfds' data_source, numpy only, with or without TensorFlow: same examples, same order. A data dir
holding tfrecord alone needs TensorFlow, or idx_dir to add an array_record copy beside it.
"""

import contextlib
import functools
import io
import logging
import os
import pathlib
import queue
import shutil
import socket
import sys
import tempfile
import threading
import urllib.parse
import urllib.request

import numpy as np

from flax_mnist.data.batches import Split
from flax_mnist.errors import DataError, first_line
from flax_mnist.geometry import IMAGE_SHAPE


@contextlib.contextmanager
def _stderr_held_back():
  """Holds back what C++ libraries write to stderr (fd 2); replays it if the body fails.

  TensorFlow prints CUDA and oneDNN notices at import, before its log settings apply, on every
  CPU-only run: noise, unless the import itself fails.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors='replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


class _TfdsNoise(logging.Filter):
  """Drops two tfds warnings that every user would see and none can act on: 'Variant folder ...
  has no dataset_info.json', logged whenever tfds looks for a dataset not prepared yet (every
  first run; is_prepared() says the same), and 'OpenCV is not installed', logged when the
  array_record reader decodes PNG with PIL (as fast for 28x28 images, and one dependency less)."""

  _PREFIXES = ('Variant folder %s has no', 'OpenCV is not installed')

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._PREFIXES)


_FILTER = _TfdsNoise()


@functools.cache
def has_tensorflow() -> bool:
  """Whether TensorFlow imports; it is imported here, once, and hidden from every GPU (JAX owns
  them), before tfds can import it lazily and start it on them.

  Without it, tfds works in its TensorFlow-free mode (it imports TensorFlow only on use), and so
  do we: array_record datasets, read as numpy.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  try:
    with _stderr_held_back():
      import tensorflow as tf
      try:
        tf.config.set_visible_devices([], 'GPU')
      except RuntimeError:  # TF's devices were initialised earlier (e.g. by Keras): too late.
        pass
  except ImportError:
    return False
  return True


def import_tfds():
  """Imports tensorflow_datasets, after TensorFlow where it is installed (see has_tensorflow)."""
  logging.getLogger('absl').addFilter(_FILTER)  # tfds logs through absl; adding twice is a no-op.
  has_tensorflow()
  import tensorflow_datasets as tfds
  return tfds


def get_builder(config):
  """Returns the tfds builder named by config.dataset, checking it is 28x28x1 with 10 classes."""
  tfds = import_tfds()
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'config.dataset={config.dataset!r} is not a tfds dataset; use e.g. '
                    "'mnist' or 'fashion_mnist'.") from None
  features = builder.info.features
  names = set(features.keys()) if hasattr(features, 'keys') else set()
  image = features['image'] if 'image' in names else None
  label = features['label'] if 'label' in names else None
  image_shape = tuple(image.shape) if image is not None else None
  classes = getattr(label, 'num_classes', None)
  if image_shape != IMAGE_SHAPE or classes != config.num_classes:
    raise DataError(f'config.dataset={config.dataset!r} has images of shape {image_shape} and '
                    f'{classes} label classes; this model needs 28x28x1 images and '
                    f'{config.num_classes} classes (e.g. mnist, fashion_mnist, kmnist).')
  return builder


def split_dict(builder, sizes: dict[str, int]):
  """tfds' SplitDict for splits of these sizes: resolves a split like 'train[:55000]' to its
  number of examples, or raises tfds' own error, as builder.info.splits does once prepared."""
  core = import_tfds().core
  return core.SplitDict([core.SplitInfo(
      name=name, shard_lengths=[size], num_bytes=0, filename_template=core.ShardedFileTemplate(
          data_dir=builder.data_path, dataset_name=builder.name, split=name,
          filetype_suffix='tfrecord')) for name, size in sizes.items()])


def ensure_prepared(config, builder, idx_splits=None) -> None:
  """Prepares the dataset: from config.idx_dir offline (`idx_splits`: the arrays already read
  from it), else by tfds' own download; without TensorFlow, as array_record, and a dataset
  prepared as tfrecord gets an array_record copy from idx_dir. A failed preparation leaves
  data_dir as it found it."""
  tensorflow = has_tensorflow()
  if builder.is_prepared():
    if not tensorflow and not has_array_record(builder):
      _add_array_record(config, builder, idx_splits)
    return
  _clear_unfinished(builder)
  if config.idx_dir:
    from flax_mnist.data import offline
    from flax_mnist.reporting.console import say
    idx_splits = idx_splits or offline.read_splits(config.idx_dir)  # Validated before writing.
    with _writing(config, builder), _printing_held_back():
      offline.prepare_from_idx(builder, config.idx_dir, idx_splits, tensorflow=tensorflow)
    say(f'Prepared {config.dataset} from IDX files in {config.idx_dir}')
    return
  if not tensorflow:
    _check_downloadable_without_tensorflow(config, builder)
  check_reachable(config, builder)
  try:
    with _undone_if_failed(builder):
      if tensorflow:
        builder.download_and_prepare()
      else:
        from flax_mnist.data import offline
        offline.download_without_tensorflow(builder, import_tfds().download.DownloadConfig())
  except DataError:
    raise
  except Exception as e:  # Any download failure: network, DNS, proxy, checksum.
    raise DataError(f'could not download {config.dataset!r} ({_cause(e)}); '
                    f'{_OFFLINE_FIX}') from None


def has_array_record(builder) -> bool:
  """Whether the prepared dataset has an array_record copy, which tfds reads without TF."""
  return 'array_record' in {f.value for f in builder.info.available_file_formats()}


def _add_array_record(config, builder, idx_splits) -> None:
  """Without TensorFlow, a dataset prepared as tfrecord alone is read from an array_record copy
  that idx_dir's files give (offline.add_array_record); without idx_dir, one line says what to
  do, rather than tfds' 'Failed to import TensorFlow' banner and traceback."""
  if not config.idx_dir:
    raise DataError(f'{builder.data_path} holds {config.dataset!r} as tfrecord, which only '
                    'TensorFlow reads, and TensorFlow is not installed; pass '
                    '--config.idx_dir=FOLDER (the four IDX files) to add an array_record copy, '
                    'pip install tensorflow-cpu, or pass another --config.data_dir.')
  from flax_mnist.data import offline
  from flax_mnist.reporting.console import say
  with _writing(config, builder), _printing_held_back():
    offline.add_array_record(builder, config.dataset, config.idx_dir, idx_splits)
  say(f'Added array_record to {config.dataset} in {builder.data_path} from IDX files in '
      f'{config.idx_dir}')


def _check_downloadable_without_tensorflow(config, builder) -> None:
  from flax_mnist.data import offline
  if not offline.mnist_family(builder):
    raise DataError(f'downloading {config.dataset!r} needs TensorFlow, which is not installed; '
                    f'pip install tensorflow-cpu, or {_OFFLINE_FIX}')


@contextlib.contextmanager
def _writing(config, builder):
  """Writes into data_dir, undoing what a failure added; a full disk or a folder we may not
  write to is one DataError line."""
  try:
    with _undone_if_failed(builder):
      yield
  except OSError as e:
    raise DataError(f'could not write {config.dataset!r} into {builder.data_dir_root} '
                    f'({_cause(e)}); make room or pass another --config.data_dir.') from None


def _clear_unfinished(builder) -> None:
  """Removes the dataset's version folder if it is there but empty (tfds would take it for the
  prepared dataset and skip preparing); refuses one holding files, which may be someone's."""
  folder = pathlib.Path(builder.data_path)
  if not folder.is_dir():
    return
  if any(folder.iterdir()):
    raise DataError(f'{folder} holds an unfinished dataset (no dataset_info.json); delete the '
                    'folder and run again.')
  folder.rmdir()


_OFFLINE_FIX = ('to work offline, put the four IDX files in a folder and pass '
                '--config.idx_dir=FOLDER.')
_PROBE_TIMEOUT_S = 3.0
_TFDS_MIRROR = 'https://storage.googleapis.com/'  # Where tfds keeps prepared datasets.


def download_hosts(builder) -> list[tuple[str, int]]:
  """(host, port) pairs that a download of `builder` connects to first: its files' host, tfds'
  mirror, or the proxy configured for them."""
  proxies = urllib.request.getproxies()
  hosts = []
  for url in (getattr(builder, 'URL', None) or '', _TFDS_MIRROR):
    parts = urllib.parse.urlsplit(url if isinstance(url, str) else '')
    if not parts.hostname:
      continue
    proxy = proxies.get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
      parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
    host = (parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80))
    if host not in hosts:
      hosts.append(host)
  return hosts


def check_reachable(config, builder) -> None:
  """Raises DataError within _PROBE_TIMEOUT_S unless one of download_hosts takes a connection.

  Without a network, tfds' download retries for minutes and prints dozens of lines before
  failing; a TCP connection answers in seconds. Each probe runs in a daemon thread, so a name
  lookup that hangs (socket timeouts do not cover it) cannot hold the program up.
  """
  hosts = download_hosts(builder)
  answers = queue.Queue()

  def probe(host: tuple[str, int]) -> None:
    try:
      socket.create_connection(host, timeout=_PROBE_TIMEOUT_S).close()
      answers.put((host, None))
    except OSError as e:
      answers.put((host, e))

  for host in hosts:
    threading.Thread(target=probe, args=(host,), daemon=True).start()
  failures = []
  try:
    for _ in hosts:
      host, error = answers.get(timeout=_PROBE_TIMEOUT_S + 1)
      if error is None:
        return
      failures.append(f'{host[0]}:{host[1]}: {_cause(error)}')
  except queue.Empty:
    failures.append('timed out')
  raise DataError(f'cannot download {config.dataset!r}: no connection to '
                  f'{"; ".join(failures)}; {_OFFLINE_FIX}')


def _cause(error: BaseException) -> str:
  """The innermost cause of a download error, whole, on one line: requests wraps the OS's
  reason in several layers of repr()s whose first 300 characters end mid-bracket."""
  seen = {id(error)}
  while True:
    inner = getattr(error, 'reason', None)
    inner = inner if isinstance(inner, BaseException) else error.__cause__ or error.__context__
    if inner is None or id(inner) in seen:
      break
    seen.add(id(inner))
    error = inner
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


@contextlib.contextmanager
def _printing_held_back():
  """Holds back what tfds prints to stdout and stderr while it prepares a dataset offline: its
  'Downloading and preparing dataset' lines (nothing is downloaded) and progress bars."""
  held = io.StringIO()
  with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
    yield


@contextlib.contextmanager
def _undone_if_failed(builder):
  """Removes what a failed preparation added to data_dir: the dataset's half-made folder, tfds'
  'incomplete.*' folders and the '*.tmp.*' folders of a failed download.

  Only entries that appeared during the body are removed, in the folders tfds writes to; the
  data dir itself goes too if the body created it.
  """
  root = pathlib.Path(builder.data_dir_root)
  relative = pathlib.Path(builder.data_path).relative_to(root)
  folders = [root, root / 'downloads', root / 'downloads' / 'extracted']
  folders += [root.joinpath(*relative.parts[:n]) for n in range(1, len(relative.parts) + 1)]
  before = {folder: set(os.listdir(folder)) for folder in folders if folder.is_dir()}
  try:
    yield
  except BaseException:
    if root not in before:
      shutil.rmtree(root, ignore_errors=True)
    for folder, names in before.items():
      for name in set(os.listdir(folder)) - names if folder.is_dir() else ():
        path = folder / name
        if path.is_dir() and not path.is_symlink():
          shutil.rmtree(path, ignore_errors=True)
        else:
          path.unlink(missing_ok=True)
    raise


def load_split(config, split: str) -> Split:
  """Reads one tfds split (e.g. 'train[:55000]') of config.dataset into memory: from its
  array_record copy where it has one (numpy, no TensorFlow), else from tfrecord with TensorFlow
  (ensure_prepared has made an array_record copy, or failed, where TensorFlow is missing)."""
  tfds = import_tfds()
  builder = get_builder(config)
  ensure_prepared(config, builder)
  if has_array_record(builder):
    return _read_array_record(config, builder, split)
  try:
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  except (ValueError, KeyError, AssertionError) as e:
    raise _split_error(config, split, e) from None
  return Split(images=np.asarray(arrays['image'], np.uint8),
               labels=np.asarray(arrays['label'], np.int32))


def _read_array_record(config, builder, split: str) -> Split:
  """The split's examples in their stored order, as tfds' data_source decodes them (PNG by PIL):
  the same examples and order as as_dataset gives from the tfrecord of the same keys."""
  try:
    source = builder.as_data_source(split=split, file_format='array_record')
  except (ValueError, KeyError, AssertionError) as e:
    raise _split_error(config, split, e) from None
  examples = source.__getitems__(range(len(source)))  # One batched read of the records.
  images = np.empty((len(examples), *IMAGE_SHAPE), np.uint8)
  for row, example in enumerate(examples):
    images[row] = example['image']
  return Split(images=images,
               labels=np.fromiter((e['label'] for e in examples), np.int32, len(examples)))


def _split_error(config, split: str, error: BaseException) -> DataError:
  return DataError(f'cannot read split {split!r} of {config.dataset!r}: {first_line(error)}')
