"""Keras' ReLU then MaxPool2D(2), as one op with TensorFlow's gradient, and as plain JAX.

Written by hand (not nnx.max_pool) for the CPU: reduce_window's gradient is a select-and-scatter
that cost a third of a CPU train step, and a max reduction on CPU may drop a NaN that a diverged
run must show. Which of the three variants runs is the plan's choice (flax_mnist/plan.py).
"""

import jax
import jax.numpy as jnp
from jax import lax

from flax_mnist.ops import once


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Keras' MaxPool2D(2) on NHWC with even sides: the elementwise maximum of each window's four
  strided views; NaN if a window holds one (a diverged run must show it).

  Same values as a reduce_window max pool, but its gradient is elementwise (XLA fuses it),
  where reduce_window's gradient is a select-and-scatter that costs a third of a CPU step.
  Elementwise maxima propagate NaN, which a max reduction on CPU (a library call) needed a
  separate pass over the input to do, and they fuse with the bias add and the ReLU around them
  (benchmarks/RESULTS.md: the eval step 8% faster).
  """
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
  views = [windows[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]
  return jnp.maximum(jnp.maximum(views[0], views[1]), jnp.maximum(views[2], views[3]))


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


def relu_keeping_nan(x: jax.Array) -> jax.Array:
  # A select, not jnp.maximum(x, 0): NaN stays NaN whatever a backend's max does with it.
  return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


@jax.custom_vjp
def relu_max_pool_2x2(x: jax.Array) -> jax.Array:
  """relu(max_pool_2x2(x)): equal to Keras' ReLU then MaxPool2D(2) (ReLU is monotonic), with
  the gradient of TensorFlow's max pool: all of it to the first maximum of each window.

  Pooling first makes the ReLU 4x smaller, and the backward pass keeps only each window's
  int32 position of its maximum instead of the layer's input: one select, where autodiff of a
  max compares the saved input again and counts ties with an extra reduction.
  """
  return relu_keeping_nan(max_pool_2x2(x))


def _relu_max_pool_fwd(x):
  pooled = max_pool_2x2(x)
  return relu_keeping_nan(pooled), (_first_max_position(x, pooled), jnp.zeros((0,), x.dtype))


def _relu_max_pool_bwd(residuals, dy):
  position, x_dtype = residuals
  n, h, w, c = position.shape
  shape = (1, 1, 2, 1, 2, 1)  # Window slot (row, column) -> row-major index 0..3.
  slots = (lax.broadcasted_iota(position.dtype, shape, 2) * 2
           + lax.broadcasted_iota(position.dtype, shape, 4))
  dx = jnp.where(position[:, :, None, :, None] == slots, dy[:, :, None, :, None], 0)
  return (dx.reshape(n, 2 * h, 2 * w, c).astype(x_dtype.dtype),)


relu_max_pool_2x2.defvjp(_relu_max_pool_fwd, _relu_max_pool_bwd)


def _routed(position, dy):
  """(int8 window positions, the gradient where a window passes one, else 0): what the
  backward pass reads per pooled element."""
  return position.astype(jnp.int8), jnp.where(position < 4, dy, jnp.zeros((), dy.dtype))


@jax.custom_vjp
def relu_max_pool_2x2_cpu(x: jax.Array) -> jax.Array:
  """relu_max_pool_2x2 with its backward pass's pooled-size work done once (once.computed_once):
  the same values and gradient; the base config's CPU train step about 8% faster
  (benchmarks/RESULTS.md)."""
  return relu_max_pool_2x2(x)


def _relu_max_pool_cpu_bwd(residuals, dy):
  position, x_dtype = residuals
  position, dy = once.computed_once(_routed, position, dy)
  return _relu_max_pool_bwd((position, x_dtype), dy)


relu_max_pool_2x2_cpu.defvjp(_relu_max_pool_fwd, _relu_max_pool_cpu_bwd)


def relu_then_max_pool_2x2(x: jax.Array) -> jax.Array:
  """ReLU then max_pool_2x2, differentiated by JAX: the same values as relu_max_pool_2x2.

  For bfloat16, where the hand-written gradient made a device-resident GPU epoch slower
  (benchmarks/RESULTS.md).
  """
  return max_pool_2x2(relu_keeping_nan(x))


VARIANTS = {'fused': relu_max_pool_2x2, 'fused_cpu': relu_max_pool_2x2_cpu,
            'autodiff': relu_then_max_pool_2x2}
