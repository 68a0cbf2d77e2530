"""Image files (PNG, JPEG, ... any size or colour mode) read as the model's input, for predict."""

import glob
import pathlib
import warnings

import numpy as np

from flax_mnist.errors import FlaxMnistError
from flax_mnist.geometry import IMAGE_SIDE


# What a folder passed to predict stands for. Named, not Pillow's registered extensions, which
# include formats it only identifies (.h5, .grib): a workdir's keras_cnn.h5 is no image.
FOLDER_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.pgm',
                   '.ppm', '.pbm', '.pnm')


class ImageError(FlaxMnistError):
  """A file that cannot be read as an image."""


def expand_paths(spec: str) -> list[pathlib.Path]:
  """PATH[,PATH...] where each part is a file, a folder or a glob of files; a part matching
  nothing is kept (to fail as a missing file). A folder named as a part stands for the image
  files directly in it; folders that a glob matches are left out (`digits/*` means its files)."""
  paths = []
  for part in filter(None, (p.strip() for p in spec.split(','))):
    if not glob.has_magic(part):
      path = pathlib.Path(part)
      paths += _image_files(path) if path.is_dir() else [path]
      continue
    matches = [pathlib.Path(m) for m in sorted(glob.glob(part))]
    paths += [m for m in matches if not m.is_dir()] if matches else [pathlib.Path(part)]
  return paths


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The files in `folder` with an image suffix (FOLDER_SUFFIXES), by name; none is an error."""
  try:
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file())
  except OSError as e:
    raise ImageError(f'{folder}: the folder cannot be listed ({type(e).__name__}); pass image '
                     'files, or a folder you can read.') from None
  if not files:
    raise ImageError(f'{folder}: a folder without image files ({", ".join(FOLDER_SUFFIXES)}); '
                     'pass image files, or the folder that holds them.')
  return files


def load_image(path: pathlib.Path, invert: bool = False) -> np.ndarray:
  """Reads an image as 28x28 float32 grayscale in [0, 1] (white digit on black, as MNIST).

  `invert` is for dark-on-light drawings. An image mostly transparent is read by its alpha
  (see _ink), so `invert` does not apply to it. Pillow's warnings (a
  DecompressionBombWarning for images over Image.MAX_IMAGE_PIXELS, EXIF complaints) are not the
  user's concern: the image is read.
  """
  from PIL import Image, UnidentifiedImageError
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      with Image.open(path) as image:
        image.load()
        gray, invert = _ink(image, invert)
  except FileNotFoundError:
    raise ImageError(f'{path}: no such file.') from None
  except Image.DecompressionBombError:
    raise ImageError(f'{path}: too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS} '
                     'pixels); pass a smaller image.') from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise ImageError(f'{path}: not a readable image ({type(e).__name__}); pass PNG or JPEG '
                     'files.') from None
  if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
    gray = gray.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
  pixels = np.asarray(gray, np.float32) / 255.0
  return 1.0 - pixels if invert else pixels


def _ink(image, invert: bool):
  """(grayscale 'L' image, whether to invert it). Drawing apps and HTML canvases export strokes
  on a transparent background whose colour is arbitrary (often black, as the ink): where most
  of an image is transparent, its alpha is the ink, white on black whatever the colours, so
  `invert` is not applied. An image mostly opaque (a scan or screenshot with transparent
  corners, say) is read by its brightness, as a fully opaque one."""
  if image.has_transparency_data:
    alpha = image.convert('RGBA').getchannel('A')
    if np.asarray(alpha, np.float32).mean() < 127.5:
      return alpha, False
  return image.convert('L'), invert


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
