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
import logging
import os
import sys
import tempfile

import numpy as np

from flax_mnist.data import split_cache
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
  array_record reader decodes PNG with PIL (a dependency already; OpenCV is not one)."""

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


@contextlib.contextmanager
def _temporary_files_removed():
  """Points Python's temporary folder at one of ours for the body, and removes it after.

  tfds makes a temporary folder for every builder of a dataset not prepared yet
  (DatasetInfo.initialize_from_bucket, to copy metadata from GCS) and never removes it: one
  empty /tmp/tmp*tfds per first run, otherwise. Nothing else runs meanwhile: no thread of ours
  has started when builders are made.
  """
  with tempfile.TemporaryDirectory(prefix='flax_mnist_tfds_') as folder:
    saved, tempfile.tempdir = tempfile.tempdir, folder
    try:
      yield
    finally:
      tempfile.tempdir = saved


def new_builder(name: str, data_dir: str | None):
  """tfds.builder(name, data_dir), leaving no temporary folder behind."""
  tfds = import_tfds()
  with _temporary_files_removed():
    return tfds.builder(name, data_dir=data_dir)


def get_builder(config):
  """Returns the tfds builder named by config.dataset, checking it is 28x28x1 with 10 classes."""
  tfds = import_tfds()
  try:
    builder = new_builder(config.dataset, config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'config.dataset={config.dataset!r} is not a tfds dataset; use e.g. '
                    "'mnist' or 'fashion_mnist'.") from None
  features = builder.info.features
  names = set(features.keys()) if hasattr(features, 'keys') else set()
  image = features['image'] if 'image' in names else None
  label = features['label'] if 'label' in names else None
  check_features(config, tuple(image.shape) if image is not None else None,
                 getattr(label, 'num_classes', None))
  return builder


def check_features(config, image_shape, classes) -> None:
  """The dataset's images and label classes fit the model that config describes; one place for
  the message, whether they come from tfds' info or from the split cache's record of it."""
  if image_shape != IMAGE_SHAPE or classes != config.num_classes:
    raise DataError(f'config.dataset={config.dataset!r} has images of shape {image_shape} and '
                    f'{classes} label classes; this model needs 28x28x1 images and '
                    f'{config.num_classes} classes (e.g. mnist, fashion_mnist, kmnist).')


def split_dict(builder, sizes: dict[str, int]):
  """tfds' SplitDict for splits of these sizes: resolves a split like 'train[:55000]' to its
  number of examples, or raises tfds' own error, as builder.info.splits does once prepared."""
  core = import_tfds().core
  return core.SplitDict([core.SplitInfo(
      name=name, shard_lengths=[size], num_bytes=0, filename_template=core.ShardedFileTemplate(
          data_dir=builder.data_path, dataset_name=builder.name, split=name,
          filetype_suffix='tfrecord')) for name, size in sizes.items()])


def has_array_record(builder) -> bool:
  """Whether the prepared dataset has an array_record copy, which tfds reads without TF: its
  format, or one of the alternative formats that dataset_info.json lists (read from the proto:
  tfds 4.9.10's available_file_formats() forgets those of a dataset read back from disk)."""
  info = builder.info
  return 'array_record' in {info.file_format.value if info.file_format else None,
                            *info.as_proto.alternative_file_formats}


def load_split(config, split: str) -> Split:
  """Reads one tfds split (e.g. 'train[:55000]') of config.dataset into memory: from the split
  cache while the prepared dataset is unchanged (split_cache.py), else from its array_record
  copy where it has one (numpy, no TensorFlow), else from tfrecord with TensorFlow
  (prepare.ensure_prepared has made an array_record copy, or failed, where TensorFlow is
  missing), and caches it."""
  cached = split_cache.load(config, split)
  if cached is not None:
    return cached
  from flax_mnist.data import prepare
  tfds = import_tfds()
  builder = get_builder(config)
  prepare.ensure_prepared(config, builder)
  if has_array_record(builder) or not has_tensorflow():  # Without TF: one just added.
    loaded = _read_array_record(config, builder, split)
  else:
    try:
      arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    except (ValueError, KeyError, AssertionError) as e:
      raise _split_error(config, split, e) from None
    loaded = Split(images=np.asarray(arrays['image'], np.uint8),
                   labels=np.asarray(arrays['label'], np.int32))
  split_cache.store(config, split, builder.data_path, loaded)
  return loaded


def _read_array_record(config, builder, split: str) -> Split:
  """The split's examples in their stored order, as tfds' data_source decodes them (PNG by PIL):
  the same examples and order as as_dataset gives from the tfrecord of the same keys."""
  tfds = import_tfds()
  try:  # A builder of the files on disk: it knows their alternative formats (tfds.builder not).
    builder = tfds.builder_from_directory(builder.data_path)
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
