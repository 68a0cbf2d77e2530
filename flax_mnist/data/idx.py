"""Reads and validates the four MNIST-style IDX files (gzipped or not).

Format (big-endian): magic = 0x00 0x00 <dtype 0x08 = uint8> <ndim>, then ndim uint32 sizes,
then the data. Images are 3-d (count, rows, cols); labels are 1-d (count,).
"""

import gzip
import math
import pathlib
import zlib

import numpy as np

from flax_mnist.errors import DataError
from flax_mnist.geometry import IMAGE_SIDE

IMAGE_ROWS = IMAGE_COLS = IMAGE_SIDE
NUM_CLASSES = 10
_UBYTE = 0x08
# File stems of the four files, as distributed (and as tfds' mnist builder names them).
SPLIT_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def find_idx_file(idx_dir: str | pathlib.Path, stem: str) -> pathlib.Path:
  """Returns the path of `stem` (or `stem.gz`) in `idx_dir`, or raises DataError."""
  folder = pathlib.Path(idx_dir).expanduser()
  if not folder.is_dir():
    raise DataError(f'idx_dir {folder} is not a folder; point --config.idx_dir at the folder '
                    'holding the four MNIST IDX files.')
  for name in (stem + '.gz', stem):
    if (folder / name).is_file():
      return folder / name
  raise DataError(f'{folder} has no {stem}.gz or {stem}; idx_dir needs the four IDX files '
                  f'({", ".join(s for pair in SPLIT_FILES.values() for s in pair)}).')


def _read_bytes(path: pathlib.Path) -> bytes:
  raw = path.read_bytes()
  if raw[:2] != b'\x1f\x8b':
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: corrupt gzip data ({e}); re-download the file.') from None


def read_idx(path: str | pathlib.Path, ndim: int) -> np.ndarray:
  """Reads one IDX file holding uint8 data of `ndim` dimensions, validating its header."""
  path = pathlib.Path(path)
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DataError(f'{path}: bad magic number {data[:4].hex() or "(empty file)"}; '
                    'not an IDX file.')
  if data[2] != _UBYTE or data[3] != ndim:
    raise DataError(f'{path}: header says dtype 0x{data[2]:02x} with {data[3]} dims, expected '
                    f'unsigned bytes (0x08) with {ndim} dims; is it the right file?')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f'{path}: truncated header ({len(data)} bytes); re-download the file.')
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  expected = math.prod(shape)  # Python ints: no overflow for sizes from a corrupt header.
  if len(data) - header != expected:
    raise DataError(f'{path}: header promises {expected} bytes of data for shape {shape}, file '
                    f'has {len(data) - header}; the file is truncated or corrupt.')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_images(path: str | pathlib.Path) -> np.ndarray:
  """Reads an IDX image file into a (count, 28, 28) uint8 array."""
  images = read_idx(path, ndim=3)
  if images.shape[1:] != (IMAGE_ROWS, IMAGE_COLS):
    raise DataError(f'{path}: images are {images.shape[1]}x{images.shape[2]}, expected '
                    f'{IMAGE_ROWS}x{IMAGE_COLS}.')
  return images


def read_labels(path: str | pathlib.Path) -> np.ndarray:
  """Reads an IDX label file into a (count,) uint8 array of classes 0..9."""
  labels = read_idx(path, ndim=1)
  if labels.size and labels.max() >= NUM_CLASSES:
    bad = int(np.argmax(labels >= NUM_CLASSES))
    raise DataError(f'{path}: label {labels[bad]} at index {bad} is outside 0..'
                    f'{NUM_CLASSES - 1}.')
  return labels


def read_split(idx_dir: str | pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads ('train' or 'test') images and labels from `idx_dir`, checking their counts agree."""
  image_stem, label_stem = SPLIT_FILES[split]
  image_path = find_idx_file(idx_dir, image_stem)
  label_path = find_idx_file(idx_dir, label_stem)
  images, labels = read_images(image_path), read_labels(label_path)
  if len(images) != len(labels):
    raise DataError(f'{image_path} has {len(images)} images but {label_path} has '
                    f'{len(labels)} labels; the two files must come from the same split.')
  if not len(images):
    raise DataError(f'{image_path} holds no images.')
  return images, labels
