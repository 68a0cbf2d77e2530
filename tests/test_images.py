"""Image files read for predict: transparency and Pillow's size limits."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from flax_mnist.data import images as images_lib

SIDE = 56  # Twice MNIST's: every image goes through the resize.


def _bar(mode, ink, background):
  """A '1'-like vertical bar of colour `ink` on `background`, SIDE x SIDE in `mode`."""
  image = Image.new(mode, (SIDE, SIDE), background)
  image.paste(ink, (24, 8, 32, 48))
  return image


def _save(tmp_path, image, name):
  path = tmp_path / name
  image.save(path)
  return path


@pytest.fixture
def white_on_black(tmp_path):
  """The bar as MNIST draws it (white on black, no alpha): what transparent images must match."""
  return images_lib.load_image(_save(tmp_path, _bar('L', 255, 0), 'mnist_style.png'))


@pytest.mark.parametrize('mode, ink, clear', [
    ('RGBA', (0, 0, 0, 255), (0, 0, 0, 0)),          # Black ink on transparent black: a canvas.
    ('RGBA', (255, 255, 255, 255), (255, 255, 255, 0)),  # White ink on transparent white.
    ('LA', (0, 255), (0, 0)),
    ('LA', (255, 255), (255, 0)),
])
@pytest.mark.parametrize('invert', [False, True])
def test_transparent_images_read_their_alpha_as_ink(tmp_path, white_on_black, mode, ink, clear,
                                                    invert):
  path = _save(tmp_path, _bar(mode, ink, clear), 'drawn.png')
  pixels = images_lib.load_image(path, invert)  # `invert` does not apply: alpha says where ink is.
  assert white_on_black.max() == 1.0
  np.testing.assert_array_equal(pixels, white_on_black)


def test_a_palette_image_with_a_transparent_colour_reads_its_alpha(tmp_path, white_on_black):
  image = _bar('P', 1, 0)
  image.putpalette([0, 0, 0] * 2)  # Both colours black: only transparency tells the bar apart.
  image.info['transparency'] = 0
  pixels = images_lib.load_image(_save(tmp_path, image, 'palette.png'))
  np.testing.assert_array_equal(pixels, white_on_black)


@pytest.mark.parametrize('invert', [False, True])
def test_opaque_alpha_is_read_as_the_colours_are(tmp_path, invert):
  """Fully opaque, or opaque but for its top two rows."""
  rgb = _bar('RGB', (20, 60, 120), (250, 240, 230))
  rgba = rgb.convert('RGBA')
  la = rgb.convert('L').convert('LA')
  expected = images_lib.load_image(_save(tmp_path, rgb, 'rgb.png'), invert)
  assert np.ptp(expected) > 0.5
  corners = rgba.copy()  # Mostly opaque: transparent corners (a screenshot's) change nothing.
  corners.putalpha(255)
  alpha = corners.getchannel('A')
  alpha.paste(0, (0, 0, SIDE, 2))
  corners.putalpha(alpha)
  for name, image in [('rgba.png', rgba), ('la.png', la), ('corners.png', corners)]:
    pixels = images_lib.load_image(_save(tmp_path, image, name), invert)
    np.testing.assert_allclose(pixels, expected, atol=1 / 255)


def test_an_image_over_pillows_warning_limit_is_read_silently(tmp_path, monkeypatch,
                                                              white_on_black):
  path = _save(tmp_path, _bar('L', 255, 0), 'big.png')
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', SIDE * SIDE - 1)  # Warns; errors over twice.
  with pytest.warns(Image.DecompressionBombWarning):
    Image.open(path).close()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    pixels = images_lib.load_image(path)
  np.testing.assert_array_equal(pixels, white_on_black)


def test_an_image_over_pillows_error_limit_gets_its_error_line(tmp_path, monkeypatch):
  from flax_mnist import modes
  big = _save(tmp_path, _bar('L', 255, 0), 'big.png')
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', SIDE * SIDE // 2 - 1)
  with pytest.raises(images_lib.ImageError, match='big.png: too large to decode safely'):
    images_lib.load_image(big)
  small = _save(tmp_path, _bar('L', 255, 0).resize((28, 28)), 'small.png')
  lines, errors = [], []
  model = lambda x: np.eye(10, dtype=np.float32)[np.ones(len(x), int)] * 9
  failures = modes.classify_files([model], [big, small], report=lines.append,
                                  report_error=errors.append)
  assert failures == 1 and len(lines) == 1 and lines[0].startswith(f'{small}: 1 (0.99')
  assert errors == [f'error: {big}: too large to decode safely (over {SIDE * SIDE - 2} '
                    'pixels); pass a smaller image.']
