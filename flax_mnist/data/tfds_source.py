"""Reads a 28x28x1 tfds dataset (mnist, fashion_mnist, kmnist) into memory through
tensorflow-datasets: its builder, its download manager and checksums, or our IDX files offline.

MNIST is 47 MB as uint8, so each split is read once, whole, into a batches.Split.
"""

import contextlib
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


class _NoVariantFolderWarning(logging.Filter):
  """Drops tfds' 'Variant folder ... has no dataset_info.json': tfds logs it whenever it looks
  for a dataset not prepared yet, which is every first run; is_prepared() says the same."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Variant folder %s has no')


_FILTER = _NoVariantFolderWarning()


def import_tfds():
  """Imports tensorflow_datasets with TensorFlow hidden from every GPU (JAX owns them)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  logging.getLogger('absl').addFilter(_FILTER)  # tfds logs through absl; adding twice is a no-op.
  with _stderr_held_back():
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # TF's devices were initialised earlier (e.g. by Keras): too late.
      pass
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
  from it), else by tfds' own download. A failed preparation leaves data_dir as it found it."""
  if builder.is_prepared():
    return
  _clear_unfinished(builder)
  if config.idx_dir:
    from flax_mnist.data import offline
    from flax_mnist.reporting.console import say
    idx_splits = idx_splits or offline.read_splits(config.idx_dir)  # Validated before writing.
    try:
      with _undone_if_failed(builder), _printing_held_back():
        offline.prepare_from_idx(builder, config.idx_dir, idx_splits)
    except OSError as e:  # A full disk or a folder we may not write to.
      raise DataError(f'could not write {config.dataset!r} into {builder.data_dir_root} '
                      f'({_cause(e)}); make room or pass another --config.data_dir.') from None
    say(f'Prepared {config.dataset} from IDX files in {config.idx_dir}')
    return
  check_reachable(config, builder)
  try:
    with _undone_if_failed(builder):
      builder.download_and_prepare()
  except Exception as e:  # Any download failure: network, DNS, proxy, checksum.
    raise DataError(f'could not download {config.dataset!r} ({_cause(e)}); '
                    f'{_OFFLINE_FIX}') from None


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
  """Reads one tfds split (e.g. 'train[:55000]') of config.dataset into memory."""
  tfds = import_tfds()
  builder = get_builder(config)
  ensure_prepared(config, builder)
  try:
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  except (ValueError, KeyError, AssertionError) as e:
    raise DataError(f'cannot read split {split!r} of {config.dataset!r}: '
                    f'{first_line(e)}') from None
  return Split(images=np.asarray(arrays['image'], np.uint8),
               labels=np.asarray(arrays['label'], np.int32))
