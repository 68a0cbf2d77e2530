"""Prepares a tfds dataset (mnist, fashion_mnist, ...) from local IDX files, with no network.

tfds' own manual-download path checks each file's checksum against the one it registers, which a
re-compressed (but byte-identical once unzipped) file fails. Instead we keep tfds' builder, its
features, version and on-disk format, and only swap where its examples come from: the builder's
split generators read our validated IDX arrays. Examples are keyed by their index in the file,
exactly as tfds' mnist builder keys them, so the prepared splits have the same order as a
download would give. Nothing in site-packages is touched.
"""

from collections.abc import Iterator

import numpy as np

from flax_mnist.data import idx


def _examples(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
  for index, (image, label) in enumerate(zip(images, labels)):
    yield index, {'image': image[..., None], 'label': int(label)}


def prepare_from_idx(builder, idx_dir: str) -> None:
  """Writes `builder`'s train and test splits into its data_dir from the IDX files in `idx_dir`.

  A no-op when the builder is already prepared. All four files are read and validated before
  anything is written; tfds writes into a temporary folder and renames it when complete.
  """
  if builder.is_prepared():
    return
  splits = {name: idx.read_split(idx_dir, name) for name in idx.SPLIT_FILES}

  def split_generators(dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {name: _examples(*arrays) for name, arrays in splits.items()}

  import tensorflow_datasets as tfds  # Imported by the caller already, with TF kept off GPUs.
  builder._split_generators = split_generators  # Instance-level override of tfds' hook.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
