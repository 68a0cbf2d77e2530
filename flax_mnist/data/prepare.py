"""Prepares a tfds dataset in data_dir: offline from IDX files, or by tfds' own download, and
never leaves a half-made dataset behind.

Without a network, tfds' download retries for minutes and prints dozens of lines; here the
download hosts are probed first (seconds), a failure is one DataError line naming the cause
whole and the fix (idx_dir), and whatever a failed preparation added to data_dir is removed.
Offline preparation prints a line before and one after instead of tfds' progress bars and
"Downloading" lines.
"""

import contextlib
import io
import os
import pathlib
import queue
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request

from flax_mnist.data import tfds_source
from flax_mnist.errors import DataError


def ensure_prepared(config, builder, idx_splits=None) -> None:
  """Prepares the dataset: from config.idx_dir offline (`idx_splits`: the arrays already read
  from it), else by tfds' own download; without TensorFlow, as array_record, and a dataset
  prepared as tfrecord gets an array_record copy from idx_dir. A failed preparation leaves
  data_dir as it found it."""
  tensorflow = tfds_source.has_tensorflow()
  if builder.is_prepared():
    if not tensorflow and not tfds_source.has_array_record(builder):
      _add_array_record(config, builder, idx_splits)
    return
  _clear_unfinished(builder)
  if config.idx_dir:
    from flax_mnist.data import offline
    from flax_mnist.reporting.console import say
    idx_splits = idx_splits or offline.read_splits(config.idx_dir)  # Validated before writing.
    say(f'Preparing {config.dataset} from IDX files in {config.idx_dir} (once per data_dir)')
    began = time.perf_counter()
    with _writing(config, builder), _printing_held_back():
      offline.prepare_from_idx(builder, config.idx_dir, idx_splits, tensorflow=tensorflow)
    say(f'Prepared {config.dataset} in {builder.data_path} ({time.perf_counter() - began:.1f}s)')
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
        offline.download_without_tensorflow(builder, tfds_source.import_tfds().download.DownloadConfig())
  except DataError:
    raise
  except Exception as e:  # Any download failure: network, DNS, proxy, checksum.
    raise DataError(f'could not download {config.dataset!r} ({_cause(e)}); '
                    f'{_OFFLINE_FIX}') from None


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
