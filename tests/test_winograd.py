"""Winograd convolution: exact transforms, float32 error against float64, gradients, limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flax_mnist.ops import native_build, winograd, winograd_native

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _native_or_skip():
  """The C++ kernels' module; skipped only where no C++ compiler exists (a failed build of
  an existing compiler fails the tests that use it)."""
  why = native_build.unavailable()
  if why.startswith('no C++ compiler'):
    pytest.skip(why)
  assert not why, why
  return winograd_native


@pytest.fixture(params=['xla', 'native'])
def module(request):
  """winograd.py (computed by XLA) or winograd_native.py (C++ kernels): the same contract."""
  return winograd if request.param == 'xla' else _native_or_skip()


@pytest.fixture
def conv(module):
  function = (module.winograd_conv if module is winograd else module.winograd_native_conv)
  return lambda x, w: function(x, w, (1, 1), 'VALID', dimension_numbers=_DIMS)


def _reference(x, w, dy):
  """y, dx, dw of a valid cross-correlation in float64, straight from the definition."""
  x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
  r = w.shape[0]
  out_h, out_w = x.shape[1] - r + 1, x.shape[2] - r + 1
  y, dx, dw = 0, np.zeros_like(x), np.zeros_like(w)
  for i in range(r):
    for j in range(r):
      view = x[:, i:i + out_h, j:j + out_w]
      y = y + view @ w[i, j]
      dx[:, i:i + out_h, j:j + out_w] += dy @ w[i, j].T
      dw[i, j] = np.einsum('nhwc,nhwd->cd', view, dy)
  return y, dx, dw


@pytest.mark.parametrize('r', winograd.KERNEL_SIZES)
def test_transforms_compute_correlation_exactly(r):
  at, g, bt = winograd.transforms(r)
  rng = np.random.default_rng(r)
  d, kernel = rng.normal(size=winograd.TILE + r - 1), rng.normal(size=r)
  expected = [d[i:i + r] @ kernel for i in range(winograd.TILE)]
  np.testing.assert_allclose(at @ ((g @ kernel) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('r, shape, cout', [(3, (5, 26, 26, 32), 64), (5, (5, 24, 24, 32), 64),
                                            (3, (4, 28, 28, 1), 32), (5, (3, 11, 14, 3), 7)])
@pytest.mark.parametrize('compiled', [False, True])
def test_float32_within_1e5_of_scale_of_float64(conv, r, shape, cout, compiled):
  """Output, input gradient and kernel gradient; uneven sides need padded tiles."""
  x = jax.random.uniform(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (r, r, shape[-1], cout)) * 0.1
  out_shape = (shape[0], shape[1] - r + 1, shape[2] - r + 1, cout)
  dy = jax.random.normal(jax.random.key(2), out_shape)

  def forward_and_grads(x, w, dy):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(dy))
  got = (jax.jit(forward_and_grads) if compiled else forward_and_grads)(x, w, dy)
  for name, value, want in zip(('y', 'dx', 'dw'), got, _reference(x, w, dy)):
    assert value.shape == want.shape and value.dtype == jnp.float32
    error = np.abs(np.asarray(value, np.float64) - want).max() / np.abs(want).max()
    assert error <= 1e-5, (name, error)


def test_matches_lax_conv_in_a_model_sized_layer(conv):
  x = jax.random.normal(jax.random.key(0), (6, 26, 26, 32))
  w = jax.random.normal(jax.random.key(1), (3, 3, 32, 64)) * 0.1
  want = lax.conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=_DIMS)
  assert np.abs(conv(x, w) - want).max() <= 1e-5 * np.abs(want).max()


def _pooled_reference(x, w, b):
  """relu(2x2 max pool(conv(x, w) + b)) in float64, Keras' floor for odd sides."""
  r = w.shape[0]
  out_shape = (x.shape[0], x.shape[1] - r + 1, x.shape[2] - r + 1, w.shape[-1])
  y = _reference(x, w, np.zeros(out_shape))[0] + np.asarray(b, np.float64)
  n, h, width, c = y.shape
  y = y[:, :h // 2 * 2, :width // 2 * 2].reshape(n, h // 2, 2, width // 2, 2, c)
  return np.maximum(y.max((2, 4)), 0)


@pytest.mark.parametrize('r, shape, cout', [(3, (5, 26, 26, 32), 64), (3, (3, 27, 29, 4), 6),
                                            (5, (3, 24, 24, 32), 64), (5, (2, 13, 11, 3), 5)])
def test_conv_relu_max_pool_within_1e5_of_scale_of_float64(module, r, shape, cout):
  """The pool taken in the tiles, odd output sides (cropped as Keras floors them) included."""
  x = jax.random.uniform(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (r, r, shape[-1], cout)) * 0.1
  b = jax.random.normal(jax.random.key(2), (cout,)) * 0.1
  got = jax.jit(module.conv_relu_max_pool)(x, w, b)
  want = _pooled_reference(x, w, b)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert np.abs(np.asarray(got, np.float64) - want).max() <= 1e-5 * np.abs(want).max()


def _pooled_gradient_reference(x, w, b, dpooled):
  """dx, dw, db of relu(2x2 max pool(conv(x, w) + b)) in float64, TensorFlow's max pool
  gradient: all of a window's to its first maximum, none where the ReLU cuts it."""
  r = w.shape[0]
  out_shape = (x.shape[0], x.shape[1] - r + 1, x.shape[2] - r + 1, w.shape[-1])
  y = _reference(x, w, np.zeros(out_shape))[0] + np.asarray(b, np.float64)
  n, h, width, c = y.shape
  ph, pw = h // 2, width // 2
  windows = y[:, :2 * ph, :2 * pw].reshape(n, ph, 2, pw, 2, c).transpose(0, 1, 3, 5, 2, 4)
  windows = windows.reshape(n, ph, pw, c, 4)
  first = windows.argmax(-1)
  passed = np.where(windows.max(-1) > 0, np.asarray(dpooled, np.float64), 0)
  routed = (np.arange(4) == first[..., None]) * passed[..., None]
  dy = np.zeros(out_shape)
  dy[:, :2 * ph, :2 * pw] = routed.reshape(n, ph, pw, c, 2, 2).transpose(
      0, 1, 4, 2, 5, 3).reshape(n, 2 * ph, 2 * pw, c)
  _, dx, dw = _reference(x, w, dy)
  return dx, dw, dy.sum((0, 1, 2))


@pytest.mark.parametrize('r, shape, cout', [(3, (3, 14, 14, 16), 16), (3, (2, 13, 15, 4), 6),
                                            (5, (2, 13, 11, 3), 5)])
def test_conv_relu_max_pool_gradients_within_1e5_of_scale_of_float64(module, r, shape, cout):
  """The training path's gradients (the C++ kernels': one backward kernel fed the pooled
  gradient and the forward's recorded positions), odd output sides included."""
  x = jax.random.uniform(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (r, r, shape[-1], cout)) * 0.1
  b = jax.random.normal(jax.random.key(2), (cout,)) * 0.1
  pooled_shape = _pooled_reference(x, w, b).shape
  dpooled = jax.random.normal(jax.random.key(3), pooled_shape)
  _, vjp = jax.vjp(module.conv_relu_max_pool, x, w, b)
  got = jax.jit(vjp)(dpooled)
  for name, value, want in zip(('dx', 'dw', 'db'), got,
                               _pooled_gradient_reference(x, w, b, dpooled)):
    assert value.shape == want.shape and value.dtype == jnp.float32
    error = np.abs(np.asarray(value, np.float64) - want).max() / np.abs(want).max()
    assert error <= 1e-5, (name, error)


def test_conv_relu_max_pool_keeps_nan(module):
  """A NaN input reaches the pooled outputs whose window it feeds (a diverged run shows)."""
  x = jnp.ones((1, 10, 10, 2)).at[0, 0, 0, 0].set(jnp.nan)
  out = np.asarray(module.conv_relu_max_pool(x, jnp.ones((3, 3, 2, 3)), jnp.zeros(3)))
  assert np.isnan(out[0, 0, 0]).all() and not np.isnan(out[0, 1:, 1:]).any()


def test_conv_relu_max_pool_bfloat16_in_bfloat16_out(module):
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5), jnp.bfloat16)
  out = module.conv_relu_max_pool(x, w, jnp.zeros(5, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 4, 5)
  want = _pooled_reference(x.astype(jnp.float32), w.astype(jnp.float32), np.zeros(5))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=0.05 * np.abs(want).max())


def test_bfloat16_in_bfloat16_out(conv):
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5), jnp.bfloat16)
  y, vjp = jax.vjp(conv, x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  assert dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize('kernel, strides, padding', [((4, 4), (1, 1), 'VALID'),
                                                      ((3, 5), (1, 1), 'VALID'),
                                                      ((3, 3), (2, 2), 'VALID'),
                                                      ((3, 3), (1, 1), 'SAME')])
def test_rejects_what_it_cannot_do(kernel, strides, padding):
  for function in (winograd.winograd_conv, winograd_native.winograd_native_conv):
    with pytest.raises(NotImplementedError, match='conv_impl="im2col_vjp"'):
      function(jnp.zeros((1, 9, 9, 2)), jnp.zeros((*kernel, 2, 3)), strides, padding)
