"""Image files (PNG, JPEG, ... any size or colour mode) read as the model's input, for predict."""

import glob
import pathlib

import numpy as np

from flax_mnist.errors import FlaxMnistError
from flax_mnist.geometry import IMAGE_SIDE


class ImageError(FlaxMnistError):
  """A file that cannot be read as an image."""


def expand_paths(spec: str) -> list[pathlib.Path]:
  """PATH[,PATH...] where each part may be a glob; a part matching nothing is kept (to fail)."""
  paths = []
  for part in filter(None, (p.strip() for p in spec.split(','))):
    matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
    paths += [pathlib.Path(m) for m in (matches or [part])]
  return paths


def load_image(path: pathlib.Path, invert: bool = False) -> np.ndarray:
  """Reads an image as 28x28 float32 grayscale in [0, 1] (white digit on black, as MNIST).

  `invert` is for dark-on-light drawings.
  """
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      image.load()
      gray = image.convert('L')
  except FileNotFoundError:
    raise ImageError(f'{path}: no such file.') from None
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f'{path}: not a readable image ({type(e).__name__}); pass PNG or JPEG '
                     'files.') from None
  if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
    gray = gray.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
  pixels = np.asarray(gray, np.float32) / 255.0
  return 1.0 - pixels if invert else pixels


def check_any_readable(paths: list[pathlib.Path], invert: bool = False) -> None:
  """Raises ImageError naming the first file unless at least one of `paths` is an image."""
  errors = []
  for path in paths:
    try:
      load_image(path, invert)
      return
    except ImageError as e:
      errors.append(e)
  more = f' ({len(errors) - 1} more files are not images either)' if len(errors) > 1 else ''
  raise ImageError(f'{errors[0]}{more}')
