"""Reads a 28x28x1 tfds dataset (mnist, fashion_mnist, kmnist) into memory through
tensorflow-datasets: its builder, its download manager and checksums, or our IDX files offline.

MNIST is 47 MB as uint8, so each split is read once, whole, into a batches.Split.
"""

import contextlib
import os
import sys
import tempfile

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
    from flax_mnist.data import offline
    offline.prepare_from_idx(builder, config.idx_dir)
    return
  if builder.is_prepared():
    return
  try:
    builder.download_and_prepare()
  except Exception as e:  # Any download failure: network, DNS, proxy, checksum.
    raise DataError(
        f'could not download {config.dataset!r} ({first_line(e)}); to work offline, put the '
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
                    f'{first_line(e)}') from None
  return Split(images=np.asarray(arrays['image'], np.uint8),
               labels=np.asarray(arrays['label'], np.int32))
