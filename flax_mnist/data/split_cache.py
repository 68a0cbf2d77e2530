"""Decoded splits kept in the user's cache, so that a resume, eval or report reads its split as
one file, without importing tensorflow-datasets (or TensorFlow) or decoding 60,000 PNGs.

tfds stays the source: a split enters the cache only as tfds read it, and an entry is used
only while the prepared dataset it came from is unchanged: the entry lists the dataset folder's
files with their sizes and modification times, checked before every use; any difference, a
newer tensorflow-datasets, or a damaged entry, and the split is read through tfds again.

The folder is FLAX_MNIST_SPLIT_CACHE when set (`off` turns the cache off), else
$XDG_CACHE_HOME/flax_mnist/splits (~/.cache/flax_mnist/splits). It keeps the newest
`_KEEP` entries (about 47 MB for all of MNIST) and drops those whose dataset is gone.
Hand-written: tfds caches nothing decoded across processes, and grain reads records, not
decoded arrays.
"""

import contextlib
import hashlib
import importlib.metadata
import json
import os
import pathlib
import tempfile
import time
import zipfile

import numpy as np

from flax_mnist.data.batches import Split
from flax_mnist.geometry import IMAGE_SHAPE

_KEEP = 8
_OFF = ('off', '0', 'false', 'no')


def folder() -> pathlib.Path | None:
  """The cache folder, or None when the cache is off."""
  chosen = os.environ.get('FLAX_MNIST_SPLIT_CACHE', '').strip()
  if chosen.lower() in _OFF:
    return None
  if chosen:
    return pathlib.Path(chosen).expanduser()
  return pathlib.Path(os.environ.get('XDG_CACHE_HOME') or '~/.cache').expanduser() / (
      'flax_mnist/splits')


def _data_dir(config) -> str | None:
  """The tfds data dir as an absolute local path (tfds' default where config leaves it
  empty); None for remote ones (gs://...), which are not cached."""
  data_dir = config.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  if '://' in data_dir:
    return None
  return str(pathlib.Path(data_dir).expanduser().resolve())


def _entry(config, split: str) -> pathlib.Path | None:
  root, data_dir = folder(), _data_dir(config)
  if root is None or data_dir is None:
    return None
  identity = json.dumps([config.dataset, data_dir, split,
                         importlib.metadata.version('tensorflow-datasets')])
  return root / f'{hashlib.sha256(identity.encode()).hexdigest()[:24]}.npz'


def _files(data_path: pathlib.Path) -> list[list]:
  """[relative name, size, mtime_ns] of every file under the prepared dataset's folder."""
  found = []
  for path in sorted(data_path.rglob('*')):
    if path.is_file():
      stat = path.stat()
      found.append([str(path.relative_to(data_path)), stat.st_size, stat.st_mtime_ns])
  return found


def _manifest(entry: zipfile.ZipFile) -> dict:
  with entry.open('manifest.json') as f:
    return json.loads(f.read())


def _recorded(entry: pathlib.Path | None) -> tuple[int, int] | None:
  """(examples, label classes) of `entry` while its dataset is unchanged; None otherwise."""
  if entry is None:
    return None
  try:
    with zipfile.ZipFile(entry) as z:
      manifest = _manifest(z)
    if _files(pathlib.Path(manifest['data_path'])) != manifest['files']:
      return None
    return int(manifest['examples']), int(manifest['classes'])
  except Exception:  # Missing, damaged, or written by another version of this module.
    return None


def recorded(config, split: str) -> tuple[int, int] | None:
  """(examples, label classes) of a cached, current split, the classes as tfds' info gave them
  when it was stored (so a cached run still checks them against the model's); None when it is
  not cached."""
  return _recorded(_entry(config, split))


def size(config, split: str) -> int | None:
  """The number of examples of a cached, current split; None when it is not cached."""
  found = recorded(config, split)
  return found and found[0]


def load(config, split: str) -> Split | None:
  """The cached split, or None when it is not cached or no longer current."""
  entry = _entry(config, split)
  recorded = _recorded(entry)
  if recorded is None:
    return None
  examples = recorded[0]
  try:
    with np.load(entry, allow_pickle=False) as arrays:
      images, labels = arrays['images'], arrays['labels']
  except Exception:
    return None
  if (images.shape != (examples, *IMAGE_SHAPE) or images.dtype != np.uint8
      or labels.shape != (examples,) or labels.dtype != np.int32):
    return None
  with contextlib.suppress(OSError):
    os.utime(entry)  # Newest use: kept longest.
  return Split(images=images, labels=labels)


def store(config, split: str, data_path, loaded: Split) -> None:
  """Adds a split just read through tfds from the prepared dataset in `data_path`, whose label
  classes tfds_source.get_builder has found equal to config.num_classes. Best effort: a cache
  that cannot be written (read-only home, full disk) changes nothing."""
  entry = _entry(config, split)
  if entry is None:
    return
  data_path = pathlib.Path(os.fspath(data_path)).resolve()
  manifest = dict(data_path=str(data_path), split=split, dataset=config.dataset,
                  examples=len(loaded), classes=config.num_classes, files=_files(data_path))
  try:
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=entry.parent, suffix='.tmp', delete=False) as f:
      temporary = pathlib.Path(f.name)
      with zipfile.ZipFile(f, 'w') as z:  # np.savez's layout, plus the manifest.
        z.writestr('manifest.json', json.dumps(manifest))
        for name, array in (('images', loaded.images), ('labels', loaded.labels)):
          with z.open(f'{name}.npy', 'w', force_zip64=True) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(temporary, entry)
  except OSError:
    with contextlib.suppress(OSError, UnboundLocalError):
      temporary.unlink()
    return
  _prune(entry.parent)


def _modified(path: pathlib.Path) -> float:
  try:
    return path.stat().st_mtime
  except OSError:  # Removed meanwhile by another process.
    return 0.0


def _prune(root: pathlib.Path) -> None:
  """Keeps the newest _KEEP entries whose dataset folder still exists; drops the temporary
  files of writes that died an hour ago or more."""
  for leftover in root.glob('*.tmp'):
    if _modified(leftover) < time.time() - 3600:
      with contextlib.suppress(OSError):
        leftover.unlink()
  entries = sorted(root.glob('*.npz'), key=_modified, reverse=True)
  for rank, entry in enumerate(entries):
    with contextlib.suppress(Exception):
      if rank >= _KEEP:
        entry.unlink()
        continue
      with zipfile.ZipFile(entry) as z:
        if not pathlib.Path(_manifest(z)['data_path']).is_dir():
          entry.unlink()
