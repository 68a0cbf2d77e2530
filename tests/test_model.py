"""The Flax CNN: Keras' parameter counts, shapes, dropout behaviour, conv implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from conftest import base_config
from flax_mnist import conv, model as model_lib


def _model(**overrides):
  config = base_config(**overrides)
  return config, model_lib.CNN(config, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize('kernel_size, keras_params', [(3, 1_199_882), (5, 872_714)])
def test_parameter_counts_equal_keras(kernel_size, keras_params):
  config, model = _model(kernel_size=kernel_size)
  assert model_lib.count_params(model) == keras_params
  assert sum(row[3] for row in model_lib.layer_table(config)) == keras_params
  assert f'Total params: {keras_params:,}' in model_lib.summary(config, model)


@pytest.mark.parametrize('shape', [(7, 784), (7, 28, 28, 1)])
def test_logits_shape(shape):
  _, model = _model()
  assert model(jnp.zeros(shape)).shape == (7, 10)


def test_keras_initializers():
  _, model = _model()
  assert not np.any(model.conv2.bias[...]) and not np.any(model.dense1.bias[...])
  limit = np.sqrt(6 / (3 * 3 * 32 + 3 * 3 * 64))  # glorot_uniform for a 3x3x32->64 kernel.
  kernel = np.asarray(model.conv2.kernel[...])
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit


def _keys(seed, n=4):
  return jax.random.split(jax.random.key(seed), n)


def test_dropout_only_in_training():
  _, model = _model()
  x = jax.random.uniform(jax.random.key(1), (4, 784))
  np.testing.assert_array_equal(model(x), model(x))
  train_a = model(x, train=True, dropout_keys=_keys(2))
  np.testing.assert_array_equal(train_a, model(x, train=True, dropout_keys=_keys(2)))
  assert not np.allclose(train_a, model(x, train=True, dropout_keys=_keys(3)))
  assert not np.allclose(train_a, model(x))


def test_dropout_mask_is_per_example():
  _, model = _model()
  x = jax.random.uniform(jax.random.key(1), (4, 784))
  keys = _keys(2)
  whole = model(x, train=True, dropout_keys=keys)
  halves = [model(x[i:i + 2], train=True, dropout_keys=keys[i:i + 2]) for i in (0, 2)]
  np.testing.assert_allclose(whole, np.concatenate(halves), atol=1e-6)


def test_dropout_rate_and_scaling():
  keys = _keys(0, 200)
  out = model_lib.dropout(jnp.ones((200, 1000)), 0.25, keys, layer=0)
  assert abs(float((out == 0).mean()) - 0.25) < 0.01
  np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.75], rtol=1e-6)


def test_dropout_bits_are_uniform_and_independent():
  keys = _keys(0, 64)
  bits = np.asarray(model_lib.dropout_bits(keys, 0, (12, 12, 64)), np.float64) / 2 ** 32
  assert abs(bits.mean() - 0.5) < 0.003 and abs(bits.std() - 12 ** -0.5) < 0.003
  flat = bits.reshape(64, -1)
  for a, b in ((flat[:, :-1], flat[:, 1:]),  # Neighbouring elements of one example,
               (flat[:-1], flat[1:])):  # the same element of neighbouring examples.
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
  other_layer = np.asarray(model_lib.dropout_bits(keys, 1, (12, 12, 64)), np.float64) / 2 ** 32
  assert abs(np.corrcoef(bits.ravel(), other_layer.ravel())[0, 1]) < 0.01
  np.testing.assert_array_equal(model_lib.dropout_bits(keys[5:7], 0, (12, 12, 64)),
                                model_lib.dropout_bits(keys, 0, (12, 12, 64))[5:7])


def test_no_dropout_config_is_deterministic_in_training():
  _, model = _model(conv_dropout=0.0, dense_dropout=0.0)
  x = jax.random.uniform(jax.random.key(1), (4, 784))
  np.testing.assert_allclose(model(x, train=True, dropout_keys=_keys(5)), model(x), atol=1e-6)


def test_max_pool_equals_reduce_window():
  x = jax.random.normal(jax.random.key(0), (3, 24, 24, 8))
  np.testing.assert_array_equal(model_lib.max_pool_2x2(x),
                                nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2)))


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
  np.testing.assert_array_equal(model_lib.relu_max_pool_2x2(x),
                                model_lib.max_pool_2x2(jax.nn.relu(x)))
  def gradient(x, dy):
    return jax.vjp(model_lib.relu_max_pool_2x2, x)[1](dy)[0]
  for fn in (gradient, jax.jit(gradient)):  # Eager and compiled.
    np.testing.assert_array_equal(fn(x, dy), _first_max_gradient(x, dy))


def test_bfloat16_model_pools_with_autodiff_with_same_values_and_tie_free_gradient():
  config = base_config(dtype='bfloat16')
  assert model_lib.CNN(config, rngs=nnx.Rngs(0)).relu_pool is model_lib.relu_then_max_pool_2x2
  x = jax.random.normal(jax.random.key(0), (3, 8, 6, 5)).at[0, 0, 0, 0].set(jnp.nan)
  dy = jax.random.normal(jax.random.key(1), (3, 4, 3, 5))
  np.testing.assert_array_equal(model_lib.relu_then_max_pool_2x2(x),
                                model_lib.relu_max_pool_2x2(x))
  assert np.isnan(model_lib.relu_then_max_pool_2x2(x)[0, 0, 0, 0])
  x = x.at[0, 0, 0, 0].set(0.5)  # No ties: both gradients go to each window's maximum.
  np.testing.assert_array_equal(jax.vjp(model_lib.relu_then_max_pool_2x2, x)[1](dy)[0],
                                _first_max_gradient(np.asarray(x), np.asarray(dy)))


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


def test_conv_impls_give_the_same_model():
  x = jax.random.uniform(jax.random.key(1), (3, 784))
  _, xla = _model(conv_impl='xla')
  for impl in ('im2col', 'im2col_vjp', 'winograd'):
    np.testing.assert_allclose(_model(conv_impl=impl)[1](x), xla(x), atol=1e-5)


def test_auto_resolves_per_backend():
  assert conv.resolve('auto', 'cpu') == 'im2col_vjp'
  # CPU: Winograd for float32 layers with several input channels and a 3x3 or 5x5 kernel.
  assert conv.resolve('auto', 'cpu', in_features=32, kernel_size=3) == 'winograd'
  assert conv.resolve('auto', 'cpu', in_features=32, kernel_size=5) == 'winograd'
  assert conv.resolve('auto', 'cpu', in_features=1, kernel_size=3) == 'im2col_vjp'
  assert conv.resolve('auto', 'cpu', in_features=32, kernel_size=4) == 'im2col_vjp'
  assert conv.resolve('auto', 'cpu', 32, 3, dtype='bfloat16') == 'im2col_vjp'
  assert conv.resolve('auto', 'gpu', in_features=32, kernel_size=3) == 'xla'
  assert conv.resolve('auto', 'gpu') == 'xla' and conv.resolve('auto', 'tpu') == 'xla'
  # A 1-channel first layer: im2col's 9-channel matmul beats cuDNN on GPU (not known for TPU).
  assert conv.resolve('auto', 'gpu', in_features=1) == 'im2col'
  assert conv.resolve('auto', 'gpu', in_features=32) == 'xla'
  assert conv.resolve('auto', 'tpu', in_features=1) == 'xla'
  assert conv.resolve('xla', 'cpu') == 'xla'


@pytest.mark.parametrize('fn', _IM2COL_FNS)
def test_im2col_rejects_what_it_cannot_do(fn):
  with pytest.raises(NotImplementedError, match='conv_impl="xla"'):
    fn(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 2)), (2, 2), 'VALID')
