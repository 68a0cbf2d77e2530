"""Loads a 28x28x1, 10-class tfds dataset into memory and serves fixed-shape batches.

MNIST is 47 MB as uint8, so each split is read through tfds once and batched with NumPy. The
training order is a pure function of (seed, epoch), which makes resumed runs exact.
"""

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

from flax_mnist.errors import DataError

IMAGE_SHAPE = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: uint8 images (N, 28, 28, 1) and int32 labels (N,)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


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


def import_tfds():
  """Imports tensorflow_datasets with TensorFlow hidden from every GPU (JAX owns them)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  with _stderr_held_back():
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # TF's devices were initialised earlier (e.g. by Keras): too late.
      pass
  import tensorflow_datasets as tfds
  return tfds


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


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


def ensure_prepared(config, builder) -> None:
  """Prepares the dataset: from config.idx_dir offline, else by tfds' own download."""
  if config.idx_dir:
    from flax_mnist import offline_prepare
    offline_prepare.prepare_from_idx(builder, config.idx_dir)
    return
  if builder.is_prepared():
    return
  try:
    builder.download_and_prepare()
  except Exception as e:  # Any download failure: network, DNS, proxy, checksum.
    raise DataError(
        f'could not download {config.dataset!r} ({_first_line(e)}); to work offline, put the '
        'four IDX files in a folder and pass --config.idx_dir=FOLDER.') from None


def load_split(config, split: str) -> Split:
  """Reads one tfds split (e.g. 'train[:55000]') of config.dataset into memory."""
  tfds = import_tfds()
  builder = get_builder(config)
  ensure_prepared(config, builder)
  try:
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  except (ValueError, KeyError, AssertionError) as e:
    raise DataError(f'cannot read split {split!r} of {config.dataset!r}: '
                    f'{_first_line(e)}') from None
  return Split(images=np.asarray(arrays['image'], np.uint8),
               labels=np.asarray(arrays['label'], np.int32))


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of `epoch`: a permutation that depends only on (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Number of full batches per epoch (the last partial batch is dropped)."""
  return num_examples // batch_size


def train_batches(split: Split, batch_size: int, seed: int, epoch: int,
                  rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the (images, labels) training batches of `epoch`: rows `rows` of each global batch
  of `batch_size` (default: all; a process of a multi-process run reads only its own rows)."""
  order = epoch_order(len(split), seed, epoch)
  for step in range(steps_per_epoch(len(split), batch_size)):
    batch = order[step * batch_size:(step + 1) * batch_size]
    batch = batch if rows is None else batch[rows]
    yield split.images[batch], split.labels[batch]


def eval_batches(split: Split, batch_size: int, rows: np.ndarray | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (images, labels, mask) covering every example once; the last batch is padded.

  Only rows `rows` (sorted) of each global batch are read, as in train_batches.
  """
  for start in range(0, len(split), batch_size):
    batch = np.arange(start, start + batch_size)
    batch = batch if rows is None else batch[rows]
    pad = int((batch >= len(split)).sum())  # Padding rows come last, in order.
    batch = batch[:len(batch) - pad]
    images, labels = split.images[batch], split.labels[batch]
    mask = np.ones(len(labels), np.float32)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    yield images, labels, mask
