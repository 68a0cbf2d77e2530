"""Prepares a tfds dataset (mnist, fashion_mnist, ...) from local IDX files, with no network.

tfds' own manual-download path checks each file's checksum against the one it registers, which a
re-compressed (but byte-identical once unzipped) file fails. Instead we keep tfds' builder, its
features, version and on-disk format, and only swap where its examples come from: the builder's
split generators read our validated IDX arrays. Examples are keyed by their index in the file,
exactly as tfds' mnist builder keys them, so the prepared splits have the same order as a
download would give. Nothing in site-packages is touched.

Without TensorFlow the dataset is written as `array_record` (which tfds reads back as numpy with
`tfds.data_source`, no TensorFlow) and each image is handed to tfds already PNG-encoded by PIL:
tfds' Image feature stores bytes as given, and encodes only numpy arrays, with
`tf.image.encode_png`. PNG is lossless, so the pixels read back are the same; the keys, and so
tfds' key-hash shuffle and the example order, are the same as in the tfrecord that the
TensorFlow path writes (tests/test_tf_free.py compares both, example by example).
"""

import io
import tempfile
from collections.abc import Iterator

import numpy as np

from flax_mnist.data import idx
from flax_mnist.errors import DataError

IdxSplits = dict[str, tuple[np.ndarray, np.ndarray]]
ARRAY_RECORD = 'array_record'
_MNIST_FAMILY = ('mnist', 'fashion_mnist', 'kmnist')  # tfds datasets of the four IDX files.


def read_splits(idx_dir: str) -> IdxSplits:
  """{'train': (images, labels), 'test': ...} from `idx_dir`, all four files validated: what the
  prepared dataset will hold, so split sizes are known before anything is written."""
  return {name: idx.read_split(idx_dir, name) for name in idx.SPLIT_FILES}


def check_files_belong(dataset: str, idx_dir: str) -> None:
  """DataError if an IDX file in `idx_dir` is, by the SHA-256 that tfds registers for its
  download, another MNIST-family dataset's: the four files look alike (digits, clothes and
  kana share one format), so without this `--config.dataset=fashion_mnist` with MNIST's files
  would prepare, and from then on read, digits under fashion_mnist's name. A file matching no
  registered checksum (re-compressed, or not gzipped) is taken as it is."""
  import hashlib

  import tensorflow_datasets as tfds  # Imported by the caller already, with TF kept off GPUs.
  owners = {}
  for name in dict.fromkeys((*_MNIST_FAMILY, dataset)):
    try:
      infos = tfds.builder_cls(name).url_infos or {}
    except Exception:  # Not a tfds dataset, or one without registered checksums.
      continue
    owners.update({info.checksum: name for info in infos.values()})
  for stem in (stem for pair in idx.SPLIT_FILES.values() for stem in pair):
    path = idx.find_idx_file(idx_dir, stem)
    owner = owners.get(hashlib.sha256(path.read_bytes()).hexdigest())
    if owner not in (None, dataset):
      raise DataError(f"{path} is one of {owner}'s IDX files (tfds registers its SHA-256 for "
                      f"{owner}), not {dataset}'s; pass --config.dataset={owner}, or the IDX "
                      f'files of {dataset} as --config.idx_dir.')


def split_sizes(splits: IdxSplits) -> dict[str, int]:
  return {name: len(labels) for name, (_, labels) in splits.items()}


def png(image: np.ndarray) -> bytes:
  """A (28, 28) or (28, 28, 1) uint8 image as PNG bytes, encoded by PIL instead of TensorFlow."""
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image.reshape(image.shape[:2])).save(buffer, format='png')
  return buffer.getvalue()


def _examples(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
  """(key, example) pairs keyed by index, as tfds' mnist builder keys them."""
  for index, (image, label) in enumerate(zip(images, labels)):
    yield index, {'image': image[..., None], 'label': int(label)}


def _png_examples(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
  """_examples with each image as PNG bytes, which tfds writes without TensorFlow."""
  for key, example in _examples(images, labels):
    yield key, dict(example, image=png(example['image']))


def prepare_from_idx(builder, idx_dir: str, splits: IdxSplits | None = None,
                     tensorflow: bool = True) -> None:
  """Writes `builder`'s train and test splits into its data_dir from the IDX files in `idx_dir`
  (or from `splits`, the arrays read_splits already read from them); `tensorflow=False` writes
  array_record with PIL-encoded images (see the module docstring), else tfds' default tfrecord.

  A no-op when the builder is already prepared. All four files are read and validated before
  anything is written; tfds writes into a temporary folder and renames it when complete. The
  download manager that tfds insists on making gets a temporary folder, so data_dir is left
  with the dataset alone.
  """
  if builder.is_prepared():
    return
  splits = splits or read_splits(idx_dir)

  def split_generators(dl_manager):
    del dl_manager  # Nothing is downloaded.
    examples = _examples if tensorflow else _png_examples
    return {name: examples(*arrays) for name, arrays in splits.items()}

  import tensorflow_datasets as tfds  # Imported by the caller already, with TF kept off GPUs.
  builder._split_generators = split_generators  # Instance-level override of tfds' hook.
  config = tfds.download.DownloadConfig(try_download_gcs=False,
                                        compute_stats=tfds.download.ComputeStatsMode.SKIP)
  with tempfile.TemporaryDirectory(prefix='flax_mnist_downloads_') as downloads:
    builder.download_and_prepare(download_dir=downloads, download_config=config,
                                 file_format=None if tensorflow else ARRAY_RECORD)


def mnist_family(builder) -> bool:
  """Whether tfds generates `builder`'s examples with its MNIST code (mnist, fashion_mnist,
  kmnist, emnist): raw IDX files in, which download_without_tensorflow can read itself."""
  from tensorflow_datasets.image_classification import mnist
  return type(builder)._generate_examples is mnist.MNIST._generate_examples


def download_without_tensorflow(builder, download_config) -> None:
  """tfds' own download of an MNIST-family dataset (its URLs, checksums and DownloadManager,
  which need no TensorFlow), written as array_record.

  tfds' MNIST builder reads the downloaded files with `tf.io.gfile` and yields numpy images that
  its Image feature would encode with TensorFlow; here the same files are read by our IDX reader
  and the images PNG-encoded by PIL, keyed by index as tfds keys them.
  """

  def generate_examples(num_examples, data_path, label_path):
    del num_examples  # The files' headers give the counts (tfds has checked their checksums).
    return _png_examples(idx.read_images(data_path), idx.read_labels(label_path))

  builder._generate_examples = generate_examples  # Instance-level override of tfds' hook.
  builder.download_and_prepare(download_config=download_config, file_format=ARRAY_RECORD)


def add_array_record(builder, dataset: str, idx_dir: str, splits: IdxSplits | None = None) -> None:
  """Adds an array_record copy of the splits, written from the IDX files, to `builder`'s dataset
  prepared as tfrecord only (which only TensorFlow reads), as one of tfds' alternative file
  formats: tfds' data_source then reads it, and TensorFlow still reads the tfrecord.

  The copy is prepared in a temporary data dir, then its files are moved beside the tfrecord
  files and dataset_info.json lists the format, as `tfds convert_format` does (which itself
  needs TensorFlow to read the tfrecord). Its splits must have the sizes and shards that
  dataset_info.json records for the tfrecord (the same IDX files give the same ones), since
  both formats share those records.
  """
  import shutil

  from flax_mnist.data import tfds_source
  splits = splits or read_splits(idx_dir)
  info = builder.info
  recorded = {name: info.splits[name].num_examples for name in info.splits}
  if split_sizes(splits) != recorded:
    raise DataError(f'{builder.data_path} holds {dataset!r} with splits {recorded}, but the IDX '
                    f'files in {idx_dir} hold {split_sizes(splits)}; pass the IDX files it was '
                    'prepared from, or another --config.data_dir.')
  with tempfile.TemporaryDirectory(prefix='flax_mnist_array_record_') as folder:
    copy = tfds_source.new_builder(dataset, folder)
    prepare_from_idx(copy, idx_dir, splits, tensorflow=False)
    shards = {name: list(copy.info.splits[name].shard_lengths) for name in recorded}
    if shards != {name: list(info.splits[name].shard_lengths) for name in recorded}:
      raise DataError(f'{builder.data_path}: the array_record copy of {dataset!r} is sharded '
                      'otherwise than its tfrecord; use another --config.data_dir.')
    for path in sorted(copy.data_path.glob(f'*.{ARRAY_RECORD}-*')):
      shutil.move(path, builder.data_path / path.name)
  # As tfds' own `tfds convert_format` records a format added in place.
  from tensorflow_datasets.core import dataset_info
  proto = dataset_info.read_proto_from_builder_dir(builder.data_path)
  if ARRAY_RECORD not in proto.alternative_file_formats:
    proto.alternative_file_formats.append(ARRAY_RECORD)
    dataset_info.write_dataset_info_proto(proto, dataset_info_dir=builder.data_path)
