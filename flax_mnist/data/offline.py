"""Prepares a tfds dataset (mnist, fashion_mnist, ...) from local IDX files, with no network.

tfds' own manual-download path checks each file's checksum against the one it registers, which a
re-compressed (but byte-identical once unzipped) file fails. Instead we keep tfds' builder, its
features, version and on-disk format, and only swap where its examples come from: the builder's
split generators read our validated IDX arrays. Examples are keyed by their index in the file,
exactly as tfds' mnist builder keys them, so the prepared splits have the same order as a
download would give. Nothing in site-packages is touched.
"""

import tempfile
from collections.abc import Iterator

import numpy as np

from flax_mnist.data import idx

IdxSplits = dict[str, tuple[np.ndarray, np.ndarray]]


def read_splits(idx_dir: str) -> IdxSplits:
  """{'train': (images, labels), 'test': ...} from `idx_dir`, all four files validated: what the
  prepared dataset will hold, so split sizes are known before anything is written."""
  return {name: idx.read_split(idx_dir, name) for name in idx.SPLIT_FILES}


def split_sizes(splits: IdxSplits) -> dict[str, int]:
  return {name: len(labels) for name, (_, labels) in splits.items()}


def _examples(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
  for index, (image, label) in enumerate(zip(images, labels)):
    yield index, {'image': image[..., None], 'label': int(label)}


def prepare_from_idx(builder, idx_dir: str, splits: IdxSplits | None = None) -> None:
  """Writes `builder`'s train and test splits into its data_dir from the IDX files in `idx_dir`
  (or from `splits`, the arrays read_splits already read from them).

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
    return {name: _examples(*arrays) for name, arrays in splits.items()}

  import tensorflow_datasets as tfds  # Imported by the caller already, with TF kept off GPUs.
  builder._split_generators = split_generators  # Instance-level override of tfds' hook.
  config = tfds.download.DownloadConfig(try_download_gcs=False,
                                        compute_stats=tfds.download.ComputeStatsMode.SKIP)
  with tempfile.TemporaryDirectory(prefix='flax_mnist_downloads_') as downloads:
    builder.download_and_prepare(download_dir=downloads, download_config=config)
