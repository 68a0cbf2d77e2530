"""The input's geometry, stated once: 28x28 single-channel images, as MNIST and its kin.

Every module that needs a side, a shape or a pixel count reads it here (the model, the data
checks, the Keras layout, image loading, plots, the config's kernel-size bound).
"""

IMAGE_SIDE = 28
CHANNELS = 1
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE, CHANNELS)
PIXELS = IMAGE_SIDE * IMAGE_SIDE * CHANNELS  # 784: the Keras model's flat input.


def conv_sides(kernel_size: int) -> tuple[int, int, int]:
  """Output sides of conv1, conv2 (both 'valid') and the 2x2 max-pool for `kernel_size`."""
  side1 = IMAGE_SIDE - kernel_size + 1
  side2 = side1 - kernel_size + 1
  return side1, side2, side2 // 2
