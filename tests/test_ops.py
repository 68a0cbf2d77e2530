"""The model's hand-written ops (flax_mnist/ops/): the ReLU + max-pool and its TensorFlow
gradient, the per-example dropout bits, and the im2col convolutions against lax's.

Winograd's convolution has its own file, tests/test_winograd.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from flax_mnist import schema
from flax_mnist.ops import conv, dropout, once, pool, winograd


def _keys(seed, n=4):
  return jax.random.split(jax.random.key(seed), n)


def test_dropout_rate_and_scaling():
  keys = _keys(0, 200)
  out = dropout.dropout(jnp.ones((200, 1000)), 0.25, keys, layer=0)
  assert abs(float((out == 0).mean()) - 0.25) < 0.01
  np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.75], rtol=1e-6)


def test_dropout_bits_are_uniform_and_independent():
  keys = _keys(0, 64)
  bits = np.asarray(dropout.dropout_bits(keys, 0, (12, 12, 64)), np.float64) / 2 ** 32
  assert abs(bits.mean() - 0.5) < 0.003 and abs(bits.std() - 12 ** -0.5) < 0.003
  flat = bits.reshape(64, -1)
  for a, b in ((flat[:, :-1], flat[:, 1:]),  # Neighbouring elements of one example,
               (flat[:-1], flat[1:])):  # the same element of neighbouring examples.
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
  other_layer = np.asarray(dropout.dropout_bits(keys, 1, (12, 12, 64)), np.float64) / 2 ** 32
  assert abs(np.corrcoef(bits.ravel(), other_layer.ravel())[0, 1]) < 0.01
  np.testing.assert_array_equal(dropout.dropout_bits(keys[5:7], 0, (12, 12, 64)),
                                dropout.dropout_bits(keys, 0, (12, 12, 64))[5:7])


def test_max_pool_equals_reduce_window():
  x = jax.random.normal(jax.random.key(0), (3, 24, 24, 8))
  np.testing.assert_array_equal(pool.max_pool_2x2(x),
                                nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2)))


def test_max_pool_keeps_nan_and_infinities_eager_and_compiled():
  """A diverged run must show NaN: a window holding one pools to NaN, on every path."""
  x = np.array(jax.random.normal(jax.random.key(0), (2, 8, 8, 16)))
  x[0, 0, 1, 3] = x[1, 5, 4, 0] = np.nan
  x[0, 2, 2, 2], x[1, 0, 0, 0] = np.inf, -np.inf
  expected = x.reshape(2, 4, 2, 4, 2, 16).max(axis=(2, 4))  # numpy's max propagates NaN.
  assert np.isnan(expected).sum() == 2
  for fn in (pool.max_pool_2x2, jax.jit(pool.max_pool_2x2)):
    np.testing.assert_array_equal(fn(x), expected)
  relu_expected = np.where(np.isnan(expected) | (expected > 0), expected, 0)
  for fn in (pool.relu_max_pool_2x2, pool.relu_then_max_pool_2x2):
    np.testing.assert_array_equal(jax.jit(fn)(x), relu_expected)


def _first_max_gradient(x, dy):
  """numpy reference of TensorFlow's max-pool gradient after a ReLU: each window's gradient
  goes to its first maximum, if that maximum is positive."""
  dx = np.zeros_like(x)
  n, h, w, c = x.shape
  for b, i, j, k in np.ndindex(n, h // 2, w // 2, c):
    window = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k]
    if window.max() > 0:
      r, s = divmod(int(window.argmax()), 2)  # argmax: the first maximum, row-major.
      dx[b, 2 * i + r, 2 * j + s, k] = dy[b, i, j, k]
  return dx


def test_relu_max_pool_equals_relu_then_pool_with_first_max_gradient():
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 8, 6, 5)))
  x = np.round(x * 2) / 2  # Many ties, and whole windows of zeros after the ReLU.
  dy = np.asarray(jax.random.normal(jax.random.key(1), (3, 4, 3, 5)))
  for variant in (pool.relu_max_pool_2x2, pool.relu_max_pool_2x2_cpu):
    np.testing.assert_array_equal(variant(x), pool.max_pool_2x2(jax.nn.relu(x)))

    def gradient(x, dy):
      return jax.vjp(variant, x)[1](dy)[0]
    for fn in (gradient, jax.jit(gradient)):  # Eager and compiled.
      np.testing.assert_array_equal(fn(x, dy), _first_max_gradient(x, dy))


def test_cpu_pool_gradient_stores_its_pooled_size_work():
  """The CPU variant's speed rests on XLA keeping a conditional it cannot fuse through
  (once.computed_once); if a new XLA removed it, this says so (the values stay right)."""
  x, dy = jnp.ones((2, 8, 8, 4)), jnp.ones((2, 4, 4, 4))
  hlo = jax.jit(lambda x, dy: jax.vjp(pool.relu_max_pool_2x2_cpu, x)[1](dy)[0]).lower(
      x, dy).compile().as_text()
  assert 'conditional(' in hlo
  nan = jnp.full((3,), jnp.nan)  # The predicate is false for NaN: the other branch, same fn.
  np.testing.assert_array_equal(once.computed_once(lambda a: a * 2, nan), nan)
  np.testing.assert_array_equal(once.computed_once(lambda a: a * 2, jnp.arange(3.0)),
                                [0.0, 2.0, 4.0])


def test_autodiff_pool_has_the_same_values_and_tie_free_gradient():
  """The bfloat16 plan's variant (tests/test_model.py checks the model uses it)."""
  x = jax.random.normal(jax.random.key(0), (3, 8, 6, 5)).at[0, 0, 0, 0].set(jnp.nan)
  dy = jax.random.normal(jax.random.key(1), (3, 4, 3, 5))
  np.testing.assert_array_equal(pool.relu_then_max_pool_2x2(x), pool.relu_max_pool_2x2(x))
  assert np.isnan(pool.relu_then_max_pool_2x2(x)[0, 0, 0, 0])
  x = x.at[0, 0, 0, 0].set(0.5)  # No ties: both gradients go to each window's maximum.
  np.testing.assert_array_equal(jax.vjp(pool.relu_then_max_pool_2x2, x)[1](dy)[0],
                                _first_max_gradient(np.asarray(x), np.asarray(dy)))


def test_pool_variants_are_the_plans_three_names():
  assert pool.VARIANTS == {'fused': pool.relu_max_pool_2x2,
                           'fused_cpu': pool.relu_max_pool_2x2_cpu,
                           'autodiff': pool.relu_then_max_pool_2x2}


def test_every_conv_choice_but_auto_has_a_function():
  """The config's choices (auto aside, which the plan resolves) are the kernels there are, with
  those the plan picks only to run inside another (PAIRS), which refuse to run alone."""
  assert set(conv.FUNCTIONS) == set(schema.CONV_IMPLS) - {'auto'} | set(conv.PAIRS)
  with pytest.raises(NotImplementedError, match='computed with conv2'):
    conv.FUNCTIONS['direct_native'](jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2)), (1, 1),
                                    'VALID')
  assert conv.FUNCTIONS['xla'] is lax.conv_general_dilated
  assert conv.FUNCTIONS['winograd'] is winograd.winograd_conv
  assert conv.FUNCTIONS['im2col'] is conv.im2col_conv
  assert conv.FUNCTIONS['im2col_vjp'] is conv.im2col_vjp_conv


_IM2COL_FNS = [conv.im2col_conv, conv.im2col_vjp_conv]


@pytest.mark.parametrize('fn', _IM2COL_FNS)
@pytest.mark.parametrize('k, cin, cout', [(3, 1, 32), (3, 32, 64), (5, 32, 64)])
def test_im2col_equals_lax_conv(k, cin, cout, fn):
  x = jax.random.normal(jax.random.key(0), (6, 28 - (cin > 1) * (k - 1), 28, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.1
  args = ((1, 1), 'VALID')
  dims = ('NHWC', 'HWIO', 'NHWC')
  reference = lax.conv_general_dilated(x, w, *args, dimension_numbers=dims)
  np.testing.assert_allclose(fn(x, w, *args), reference, atol=1e-5, rtol=1e-5)

  def loss(fn, x, w):
    return jnp.sum(jnp.sin(fn(x, w, *args, dimension_numbers=dims)))
  for grad in (jax.grad, lambda f, **kw: jax.jit(jax.grad(f, **kw))):  # Eager and compiled.
    grads = grad(lambda x, w: loss(fn, x, w), argnums=(0, 1))(x, w)
    expected = grad(lambda x, w: loss(lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
    for got, want in zip(grads, expected):  # Sums of thousands of terms: compare to their scale.
      assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_patches_order_matches_the_kernel_layout():
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  p = conv.patches(x, 3, 2)
  assert p.shape == (2, 5, 5, 18)
  np.testing.assert_array_equal(p[1, 2, 4].reshape(3, 2, 3), x[1, 2:5, 4:6])


def test_im2col_vjp_in_bfloat16():
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5), jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: conv.im2col_vjp_conv(x, w, (1, 1), 'VALID').sum().astype(
      jnp.float32), argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16 and dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize('fn', _IM2COL_FNS)
def test_im2col_rejects_what_it_cannot_do(fn):
  with pytest.raises(NotImplementedError, match='conv_impl="xla"'):
    fn(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 2)), (2, 2), 'VALID')
