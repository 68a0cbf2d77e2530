"""The seed notebook's Keras CNN as a Flax NNX module, layer for layer, and its summary.

Keras: Reshape(28,28,1) -> Conv2D(32,k,relu) -> Conv2D(64,k,relu) -> MaxPool2D(2)
-> Dropout(.25) -> Flatten -> Dense(128,relu) -> Dropout(.5) -> Dense(10, softmax).
Here the last layer returns logits; the loss applies the softmax (numerically stable). How each
layer is computed (conv kernels, pool variant) comes from the run plan; what it computes does
not depend on it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from flax_mnist import geometry
from flax_mnist.ops import conv, dropout, once, pool

_KERNEL_INIT = nnx.initializers.glorot_uniform()  # Keras' default for Conv2D and Dense.
_BIAS_INIT = nnx.initializers.zeros_init()


class CNN(nnx.Module):
  """The seed CNN; sizes and dropout rates come from the config, kernels from the plan."""

  def __init__(self, config, plan, *, rngs: nnx.Rngs):
    k = (config.kernel_size, config.kernel_size)
    # Mixed precision (config.dtype bfloat16): layers compute in `dtype`, params stay float32.
    common = dict(kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT, rngs=rngs,
                  dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32)
    self.conv1 = nnx.Conv(geometry.CHANNELS, config.conv1_features, k, padding='VALID',
                          conv_general_dilated=conv.FUNCTIONS[plan.conv1], **common)
    self.conv2 = nnx.Conv(config.conv1_features, config.conv2_features, k, padding='VALID',
                          conv_general_dilated=conv.FUNCTIONS[plan.conv2], **common)
    self.relu_pool = pool.VARIANTS[plan.pool]
    self.pool_in_tiles = plan.pool_in_tiles
    self.pool_in_tiles_training = plan.pool_in_tiles_training
    self.conv_relu_max_pool = conv.POOLED.get(plan.conv2)
    # conv1, conv2, their ReLUs and the pool in one op (the C++ kernels' 'direct_native').
    self.convs_relu_max_pool = conv.PAIRS.get(plan.conv1)
    self.conv_dropout = config.conv_dropout
    self.pooled_stored = plan.pooled_stored
    pooled = geometry.conv_sides(config.kernel_size)[2]
    self.dense1 = nnx.Linear(pooled * pooled * config.conv2_features, config.dense_features,
                             **common)
    self.dense_dropout = config.dense_dropout
    self.dense2 = nnx.Linear(config.dense_features, config.num_classes, **common)

  def __call__(self, x: jax.Array, *, train: bool = False,
               dropout_keys: jax.Array | None = None, dropout_rates=None) -> jax.Array:
    """Maps images in [0, 1], (N, 784) or (N, 28, 28, 1), to float32 logits (N, num_classes).

    Dropout is applied only when `train` is True, example i drawing from `dropout_keys[i]`;
    `dropout_rates` (conv, dense), possibly traced, replace the config's for a lane of a sweep.
    """
    conv_rate, dense_rate = dropout_rates or (self.conv_dropout, self.dense_dropout)
    x = x.reshape((x.shape[0], *geometry.IMAGE_SHAPE))
    if self.convs_relu_max_pool:
      x = self.convs_relu_max_pool(x, self.conv1.kernel[...], self.conv1.bias[...],
                                   self.conv2.kernel[...], self.conv2.bias[...])
      if train:
        x = dropout.dropout(x, conv_rate, dropout_keys, layer=0)
      return self._dense_layers(x, train, dense_rate, dropout_keys)
    x = nnx.relu(self.conv1(x))
    if self.pool_in_tiles_training if train else self.pool_in_tiles:
      x = self.conv_relu_max_pool(x, self.conv2.kernel[...], self.conv2.bias[...],
                                  self.conv2.precision)
      if train:
        x = dropout.dropout(x, conv_rate, dropout_keys, layer=0)
    elif train:
      def pool_and_dropout(keys, x):
        return dropout.dropout(self.relu_pool(x), conv_rate, keys, layer=0)
      x = self.conv2(x)
      # The plan's pooled_stored: in a pass of its own, not in the flatten's (ops/once.py;
      # x, a float array, last: the conditional's probe).
      x = (once.computed_once(pool_and_dropout, dropout_keys, x) if self.pooled_stored
           else pool_and_dropout(dropout_keys, x))
    else:
      x = self.relu_pool(self.conv2(x))
    return self._dense_layers(x, train, dense_rate, dropout_keys)

  def _dense_layers(self, x, train, dense_rate, dropout_keys):
    """The pooled features (N, h, w, c) to logits."""
    x = x.reshape((x.shape[0], -1))  # NHWC order, as Keras' channels_last Flatten.
    x = nnx.relu(self.dense1(x))
    if train:
      x = dropout.dropout(x, dense_rate, dropout_keys, layer=1)
    return self.dense2(x).astype(jnp.float32)  # Softmax and loss in float32.


def layer_table(config) -> list[tuple[str, str, tuple, int]]:
  """(name, Keras layer type, output shape, params) per layer, as Keras' summary lists them."""
  k, c1, c2 = config.kernel_size, config.conv1_features, config.conv2_features
  side1, side2, pooled = geometry.conv_sides(k)
  flat = pooled * pooled * c2
  d, n = config.dense_features, config.num_classes
  return [
      ('reshape', 'Reshape', geometry.IMAGE_SHAPE, 0),
      ('conv2d', 'Conv2D', (side1, side1, c1), k * k * geometry.CHANNELS * c1 + c1),
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
