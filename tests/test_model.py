"""The Flax CNN: Keras' parameter counts, shapes, initializers, dropout in training, and that
the plan's kernels and pool change how it computes, not what."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import base_config
from flax_mnist import model as model_lib
from flax_mnist import plan as plan_lib
from flax_mnist.ops import native_build, pool


def _model(**overrides):
  """The base config with `overrides` and its CNN, planned for the CPU."""
  config = base_config(**overrides)
  plan = plan_lib.make(config, 'cpu', 1)
  return config, model_lib.CNN(config, plan, rngs=nnx.Rngs(params=0))


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


@pytest.mark.parametrize('conv1', ['direct_native', 'im2col_vjp'])
@pytest.mark.parametrize('kernel_size', [3, 5])
def test_training_in_the_cpp_kernels_trains_the_same_model(conv1, kernel_size):
  """The plan's C++ path (conv1 a direct convolution inside the kernels, conv2's bias, ReLU and
  pool in its tiles, their gradients from the pooled gradient), and the same with conv1 left
  to XLA, give the loss and every gradient of the path that runs conv1 and pools after
  conv2's output, dropout included, within 1e-5 of each one's largest; inference as well."""
  if native_build.unavailable():
    pytest.skip(native_build.unavailable())
  config = base_config(kernel_size=kernel_size)
  x = jax.random.uniform(jax.random.key(1), (6, 784))
  native = plan_lib.make(config, 'cpu', 1, 1, '')
  assert native.conv1 == 'direct_native' and native.pool_in_tiles_training
  plans = {'fused': dataclasses.replace(native, conv1=conv1),
           'apart': dataclasses.replace(native, conv1='im2col_vjp', pool_in_tiles=False,
                                        pool_in_tiles_training=False)}
  results, logits = {}, {}
  for name, plan in plans.items():
    graphdef, params = nnx.split(model_lib.CNN(config, plan, rngs=nnx.Rngs(params=0)))

    def loss(params):
      model = nnx.merge(graphdef, params)
      return (model(x, train=True, dropout_keys=_keys(2, 6)) ** 2).sum()
    results[name] = jax.jit(jax.value_and_grad(loss))(params)
    logits[name] = nnx.merge(graphdef, params)(x)
  np.testing.assert_allclose(logits['fused'], logits['apart'], rtol=0,
                             atol=1e-5 * float(np.abs(logits['apart']).max()))
  np.testing.assert_allclose(results['fused'][0], results['apart'][0], rtol=1e-5)
  grads = {key: dict(jax.tree_util.tree_leaves_with_path(results[key][1])) for key in results}
  for path, want in grads['apart'].items():
    assert np.abs(want).max() > 0, path
    np.testing.assert_allclose(grads['fused'][path], want, rtol=0,
                               atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize('traced_rate', [False, True])
def test_the_pooled_output_stored_changes_where_it_is_computed_not_what(traced_rate):
  """pooled_stored puts conv2's ReLU, pool and dropout in a conditional of their own
  (ops/once.py), in training only, which XLA keeps (its probe is a float, which XLA cannot
  fold), and leaves inference as it was. With the config's fixed conv dropout rate the loss and
  every gradient are the same bit for bit; with a traced rate (a sweep's) the loss and the dense
  layers' gradients are, and the conv layers' gradients differ in rounding only, within 1e-5 of
  each one's largest."""
  config = base_config()
  x = jax.random.uniform(jax.random.key(1), (4, 784))
  rate = (jnp.float32(0.3),) if traced_rate else ()
  results, conds, inference = {}, {}, {}
  for stored in (True, False):
    plan = dataclasses.replace(plan_lib.make(config, 'cpu', 1), pooled_stored=stored)
    assert plan.conv2 == 'winograd'
    graphdef, params = nnx.split(model_lib.CNN(config, plan, rngs=nnx.Rngs(params=0)))

    def loss(params, *rate):
      model = nnx.merge(graphdef, params)
      rates = (rate[0], 0.5) if rate else None
      return (model(x, train=True, dropout_keys=_keys(2), dropout_rates=rates) ** 2).sum()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, *rate).compile()
    conds[stored] = compiled.as_text().count(' conditional(')
    inference[stored] = str(jax.make_jaxpr(nnx.merge(graphdef, params))(x))
    results[stored] = compiled(params, *rate)
  assert conds[True] > conds[False] and inference[True] == inference[False]
  assert results[True][0] == results[False][0]
  grads = {stored: dict(jax.tree_util.tree_leaves_with_path(results[stored][1]))
           for stored in results}
  assert grads[True].keys() == grads[False].keys()
  for path, want in grads[False].items():
    conv = traced_rate and 'conv' in jax.tree_util.keystr(path)
    np.testing.assert_allclose(grads[True][path], want, rtol=0,
                               atol=1e-5 * float(np.abs(want).max()) if conv else 0)


def test_no_dropout_config_is_deterministic_in_training():
  _, model = _model(conv_dropout=0.0, dense_dropout=0.0)
  x = jax.random.uniform(jax.random.key(1), (4, 784))
  np.testing.assert_allclose(model(x, train=True, dropout_keys=_keys(5)), model(x), atol=1e-6)


def test_bfloat16_model_pools_with_autodiff():
  """The plan's pool variant is the one the model runs (its values: tests/test_ops.py)."""
  config = base_config(dtype='bfloat16')
  plan = plan_lib.make(config, 'cpu', 1)
  assert plan.pool == 'autodiff'
  model = model_lib.CNN(config, plan, rngs=nnx.Rngs(0))
  assert model.relu_pool is pool.relu_then_max_pool_2x2
  _, float32_model = _model()
  assert float32_model.relu_pool is pool.relu_max_pool_2x2_cpu  # The CPU plan's.


def test_inference_pooling_in_tiles_gives_the_training_forward():
  """The plan's inference path (conv2, ReLU and pool in Winograd tiles) computes what the
  training path does, dropout aside."""
  config, model = _model(conv_dropout=0.0, dense_dropout=0.0)
  assert model.pool_in_tiles
  x = jax.random.uniform(jax.random.key(1), (4, 784))
  keys = jax.random.split(jax.random.key(2), 4)
  np.testing.assert_allclose(model(x), model(x, train=True, dropout_keys=keys), atol=1e-5)


def test_conv_impls_give_the_same_model():
  x = jax.random.uniform(jax.random.key(1), (3, 784))
  _, xla = _model(conv_impl='xla')
  for impl in ('im2col', 'im2col_vjp', 'winograd'):
    np.testing.assert_allclose(_model(conv_impl=impl)[1](x), xla(x), atol=1e-5)


def test_each_backends_plan_gives_the_same_model():
  """The GPU and TPU plans' kernels (im2col, XLA's) run on the CPU too, with the same result
  as the CPU plan's (im2col_vjp, Winograd): the plan changes speed, not the model."""
  config = base_config()
  x = jax.random.uniform(jax.random.key(1), (3, 784))
  outputs = {}
  for backend in ('cpu', 'gpu', 'tpu'):
    plan = plan_lib.make(config, backend, 1)
    outputs[backend] = model_lib.CNN(config, plan, rngs=nnx.Rngs(params=0))(x)
  for backend in ('gpu', 'tpu'):
    np.testing.assert_allclose(outputs[backend], outputs['cpu'], atol=1e-5)
