"""The C++ Winograd kernels beyond winograd.py's contract (tests/test_winograd.py runs that on
both): repeatable gradients, jax.vmap, conv1 inside the kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_winograd import _pooled_gradient_reference, _pooled_reference, _reference
from flax_mnist.ops import native_build, winograd_native


@pytest.fixture
def native():
  why = native_build.unavailable()
  if why.startswith('no C++ compiler'):
    pytest.skip(why)
  assert not why, why
  return winograd_native


def _conv(x, w):
  return winograd_native.winograd_native_conv(x, w, (1, 1), 'VALID')


def _conv_pool(x, w):
  return winograd_native.conv_relu_max_pool(x, w, jnp.full(w.shape[-1], 0.1))


def _convs(x, w):
  """conv1 (x's first channel, as data: no gradient; w's first input channel) and conv2 (w)
  in the kernels."""
  return winograd_native.convs_relu_max_pool(jax.lax.stop_gradient(x[..., :1]), w[:, :, :1],
                                             jnp.full(w.shape[2], 0.05), w,
                                             jnp.full(w.shape[-1], 0.1))


@pytest.mark.parametrize('function', [_conv, _conv_pool, _convs])
@pytest.mark.parametrize('r', [3, 5])
def test_gradients_are_repeatable_bit_for_bit(native, r, function):
  """The kernel gradient sums over images in fixed groups, whichever thread takes which: the
  same inputs give the same bits every time (resume and seeded runs rely on it), for the
  convolution and for the training path that pools in the tiles."""
  x = jax.random.normal(jax.random.key(0), (23, 14, 14, 32))
  w = jax.random.normal(jax.random.key(1), (r, r, 32, 32)) * 0.1

  @jax.jit
  def grads(x, w):
    y, vjp = jax.vjp(function, x, w)
    return vjp(jnp.cos(y))
  first = jax.device_get(grads(x, w))
  for _ in range(6):
    again = jax.device_get(grads(x, w))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert np.abs(first[1]).max() > 0


@pytest.mark.parametrize('function', [_conv, _conv_pool, _convs])
def test_vmap_runs_each_lane_with_its_own_kernel(native, function):
  """Several models a pass (config.lanes_per_pass > 1) vmap the custom calls over lanes,
  forward and backward."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (2, 3, 3, 16, 16))

  def value_and_grads(x, w):
    y, vjp = jax.vjp(function, x, w)
    return y, *vjp(jnp.cos(y))
  both = jax.jit(jax.vmap(value_and_grads))(x, w)
  for lane in range(2):
    for got, want in zip(both, value_and_grads(x[lane], w[lane])):
      np.testing.assert_array_equal(got[lane], want)


@pytest.mark.parametrize('r, shape, widths', [(3, (3, 28, 28, 1), (32, 64)),
                                             (5, (3, 28, 28, 1), (32, 64)),
                                             (3, (2, 17, 15, 1), (5, 7)),
                                             (5, (2, 16, 19, 1), (20, 3))])
def test_conv1_inside_the_kernels_within_1e5_of_scale_of_float64(native, r, shape, widths):
  """convs_relu_max_pool (the plan's direct_native conv1 with conv2 and the pool): output and
  every parameter's gradient, odd sides and channel counts the vectors do not fill included."""
  keys = jax.random.split(jax.random.key(r), 5)
  image = jax.random.uniform(keys[0], shape)
  w1 = jax.random.normal(keys[1], (r, r, 1, widths[0])) * 0.3
  b1 = jax.random.normal(keys[2], (widths[0],)) * 0.1
  w2 = jax.random.normal(keys[3], (r, r, *widths)) * 0.1
  b2 = jax.random.normal(keys[4], (widths[1],)) * 0.1
  side = (shape[0], shape[1] - r + 1, shape[2] - r + 1, widths[0])
  y1 = np.maximum(_reference(image, w1, np.zeros(side))[0] + np.asarray(b1, np.float64), 0)
  want = _pooled_reference(y1, w2, b2)
  dpooled = np.asarray(jax.random.normal(keys[0], want.shape))
  dy1, dw2, db2 = _pooled_gradient_reference(y1, w2, b2, dpooled)
  dy1 = np.where(y1 > 0, dy1, 0)
  wants = (want, _reference(image, w1, dy1)[2], dy1.sum((0, 1, 2)), dw2, db2)
  out, vjp = jax.vjp(lambda *params: winograd_native.convs_relu_max_pool(image, *params),
                     w1, b1, w2, b2)
  got = (out, *jax.jit(vjp)(jnp.asarray(dpooled, jnp.float32)))
  for name, value, want in zip(('pooled', 'dw1', 'db1', 'dw2', 'db2'), got, wants):
    assert value.shape == want.shape and value.dtype == jnp.float32, name
    error = np.abs(np.asarray(value, np.float64) - want).max() / np.abs(want).max()
    assert error <= 1e-5, (name, error)


def test_conv1_inside_the_kernels_refuses_a_gradient_by_the_image(native):
  """Training never asks for one; a user's gradient by the input (saliency, adversarial
  examples) must not silently read zeros."""
  image = jnp.ones((1, 14, 14, 1))
  params = jnp.ones((3, 3, 1, 16)), jnp.zeros(16), jnp.ones((3, 3, 16, 16)), jnp.zeros(16)
  with pytest.raises(NotImplementedError, match='no gradient for its image'):
    jax.grad(lambda x: winograd_native.convs_relu_max_pool(x, *params).sum())(image)


def test_conv1_inside_the_kernels_keeps_nan(native):
  """A NaN pixel reaches the pooled outputs whose windows it feeds (a diverged run shows)."""
  image = jnp.ones((1, 14, 14, 1)).at[0, 0, 0, 0].set(jnp.nan)
  out = np.asarray(winograd_native.convs_relu_max_pool(
      image, jnp.ones((3, 3, 1, 16)), jnp.zeros(16), jnp.ones((3, 3, 16, 16)), jnp.zeros(16)))
  assert np.isnan(out[0, 0, 0]).all() and not np.isnan(out[0, 2:, 2:]).any()
