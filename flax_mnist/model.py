"""The seed notebook's Keras CNN as a Flax NNX module, layer for layer.

Keras: Reshape(28,28,1) -> Conv2D(32,k,relu) -> Conv2D(64,k,relu) -> MaxPool2D(2)
-> Dropout(.25) -> Flatten -> Dense(128,relu) -> Dropout(.5) -> Dense(10, softmax).
Here the last layer returns logits; the loss applies the softmax (numerically stable).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from flax_mnist import conv

IMAGE_SHAPE = (28, 28, 1)
_KERNEL_INIT = nnx.initializers.glorot_uniform()  # Keras' default for Conv2D and Dense.
_BIAS_INIT = nnx.initializers.zeros_init()


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Keras' MaxPool2D(2) on NHWC with even sides, as a reshape and a max; NaN if a window holds
  one (XLA's CPU max may skip NaN, and a diverged run must show it).

  Same values as a reduce_window max pool, but its gradient is elementwise (XLA fuses it),
  where reduce_window's gradient is a select-and-scatter that costs a third of a CPU step.
  """
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return jnp.where(jnp.isnan(windows).any(axis=(2, 4)), jnp.nan, windows.max(axis=(2, 4)))


def _first_max_position(x: jax.Array, pooled: jax.Array) -> jax.Array:
  """int32 (n, h/2, w/2, c): which of each 2x2 window's positions (row-major 0..3) holds its
  first maximum, or 4 where the maximum is <= 0 (the ReLU passes no gradient there)."""
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
  position = jnp.full(pooled.shape, 4, jnp.int32)
  for index in (3, 2, 1, 0):  # Last to first, so the first maximum wins.
    i, j = divmod(index, 2)
    position = jnp.where(windows[:, :, i, :, j] == pooled, jnp.int32(index), position)
  return jnp.where(pooled > 0, position, jnp.int32(4))


def _relu_keeping_nan(x: jax.Array) -> jax.Array:
  # Not jnp.maximum(x, 0): XLA's CPU max may return 0 for NaN.
  return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


@jax.custom_vjp
def relu_max_pool_2x2(x: jax.Array) -> jax.Array:
  """relu(max_pool_2x2(x)): equal to Keras' ReLU then MaxPool2D(2) (ReLU is monotonic), with
  the gradient of TensorFlow's max pool: all of it to the first maximum of each window.

  Pooling first makes the ReLU 4x smaller, and the backward pass keeps only each window's
  int32 position of its maximum instead of the layer's input: one select, where autodiff of a
  max compares the saved input again and counts ties with an extra reduction.
  """
  return _relu_keeping_nan(max_pool_2x2(x))


def _relu_max_pool_fwd(x):
  pooled = max_pool_2x2(x)
  return _relu_keeping_nan(pooled), (_first_max_position(x, pooled), jnp.zeros((0,), x.dtype))


def _relu_max_pool_bwd(residuals, dy):
  position, x_dtype = residuals
  n, h, w, c = position.shape
  slots = lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 2) * 2 + lax.broadcasted_iota(
      jnp.int32, (1, 1, 2, 1, 2, 1), 4)
  dx = jnp.where(position[:, :, None, :, None] == slots, dy[:, :, None, :, None], 0)
  return (dx.reshape(n, 2 * h, 2 * w, c).astype(x_dtype.dtype),)


relu_max_pool_2x2.defvjp(_relu_max_pool_fwd, _relu_max_pool_bwd)


def relu_then_max_pool_2x2(x: jax.Array) -> jax.Array:
  """ReLU then max_pool_2x2, differentiated by JAX: the same values as relu_max_pool_2x2.

  For bfloat16, where the hand-written gradient made a device-resident epoch 16% slower on an
  H100 (and 8% faster in float32; benchmarks/RESULTS.md, 2026-11-26).
  """
  return max_pool_2x2(_relu_keeping_nan(x))


def _mix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def dropout_bits(keys: jax.Array, layer: int, shape: tuple) -> jax.Array:
  """Uniform uint32 per (example, element): (len(keys), *shape).

  Example i's bits depend only on keys[i], `layer` and the element's index, so its mask is the
  same however the batch is split. The per-element hash (two murmur3 finalizer rounds keyed by
  the example's key) costs a few integer operations where threefry costs ~100, which made
  dropout 15% of a CPU train step.
  """
  words = jax.random.key_data(jax.vmap(lambda key: jax.random.fold_in(key, layer))(keys))
  words = words.reshape(len(keys), -1).astype(jnp.uint32)
  expand = (slice(None),) + (None,) * len(shape)
  index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)[None]
  return _mix32(_mix32(index ^ words[:, 0][expand]) + words[:, -1][expand])


def dropout(x: jax.Array, rate: float, keys: jax.Array, layer: int) -> jax.Array:
  """Inverted dropout (as Keras) with one key per example, so each example's mask is the same
  however the batch is split into micro-batches or over devices."""
  if rate == 0:
    return x
  threshold = jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))
  keep = dropout_bits(keys, layer, x.shape[1:]) >= threshold
  return jnp.where(keep, x / (1 - rate), 0)


def _conv_function(config, in_features: int):
  return conv.conv_function(config.conv_impl, in_features, config.kernel_size, config.dtype)


class CNN(nnx.Module):
  """The seed CNN; sizes, dropout rates and conv implementation come from the config."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    k = (config.kernel_size, config.kernel_size)
    # Mixed precision (config.dtype bfloat16): layers compute in `dtype`, params stay float32.
    common = dict(kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT, rngs=rngs,
                  dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32)
    self.conv1 = nnx.Conv(1, config.conv1_features, k, padding='VALID',
                          conv_general_dilated=_conv_function(config, 1), **common)
    self.conv2 = nnx.Conv(config.conv1_features, config.conv2_features, k, padding='VALID',
                          conv_general_dilated=_conv_function(config, config.conv1_features),
                          **common)
    self.relu_pool = (relu_max_pool_2x2 if config.dtype == 'float32'
                      else relu_then_max_pool_2x2)
    self.conv_dropout = config.conv_dropout
    pooled = (IMAGE_SHAPE[0] - 2 * (config.kernel_size - 1)) // 2
    self.dense1 = nnx.Linear(pooled * pooled * config.conv2_features, config.dense_features,
                             **common)
    self.dense_dropout = config.dense_dropout
    self.dense2 = nnx.Linear(config.dense_features, config.num_classes, **common)

  def __call__(self, x: jax.Array, *, train: bool = False,
               dropout_keys: jax.Array | None = None) -> jax.Array:
    """Maps images in [0, 1], (N, 784) or (N, 28, 28, 1), to float32 logits (N, num_classes).

    Dropout is applied only when `train` is True, example i drawing from `dropout_keys[i]`.
    """
    x = x.reshape((x.shape[0], *IMAGE_SHAPE))
    x = nnx.relu(self.conv1(x))
    x = self.relu_pool(self.conv2(x))
    if train:
      x = dropout(x, self.conv_dropout, dropout_keys, layer=0)
    x = x.reshape((x.shape[0], -1))  # NHWC order, as Keras' channels_last Flatten.
    x = nnx.relu(self.dense1(x))
    if train:
      x = dropout(x, self.dense_dropout, dropout_keys, layer=1)
    return self.dense2(x).astype(jnp.float32)  # Softmax and loss in float32.


def layer_table(config) -> list[tuple[str, str, tuple, int]]:
  """(name, Keras layer type, output shape, params) per layer, as Keras' summary lists them."""
  k, c1, c2 = config.kernel_size, config.conv1_features, config.conv2_features
  side1 = IMAGE_SHAPE[0] - k + 1
  side2 = side1 - k + 1
  pooled = side2 // 2
  flat = pooled * pooled * c2
  d, n = config.dense_features, config.num_classes
  return [
      ('reshape', 'Reshape', (28, 28, 1), 0),
      ('conv2d', 'Conv2D', (side1, side1, c1), k * k * 1 * c1 + c1),
      ('conv2d_1', 'Conv2D', (side2, side2, c2), k * k * c1 * c2 + c2),
      ('max_pooling2d', 'MaxPooling2D', (pooled, pooled, c2), 0),
      ('dropout', 'Dropout', (pooled, pooled, c2), 0),
      ('flatten', 'Flatten', (flat,), 0),
      ('dense', 'Dense', (d,), flat * d + d),
      ('dropout_1', 'Dropout', (d,), 0),
      ('dense_1', 'Dense', (n,), d * n + n),
  ]


def count_params(model: CNN) -> int:
  """Total number of trainable parameters in `model`."""
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def summary(config, model: CNN) -> str:
  """A Keras-like summary table; its total is counted from the model's real parameters."""
  rows = layer_table(config)
  total = count_params(model)
  lines = ['Model: "flax_mnist_cnn"', '_' * 65,
           f'{"Layer (type)":<29}{"Output Shape":<26}{"Param #":>10}', '=' * 65]
  for name, kind, shape, params in rows:
    lines.append(f'{f"{name} ({kind})":<29}{str((None, *shape)):<26}{params:>10,}')
  lines += ['=' * 65, f'Total params: {total:,}', f'Trainable params: {total:,}',
            'Non-trainable params: 0', '_' * 65]
  return '\n'.join(lines)
