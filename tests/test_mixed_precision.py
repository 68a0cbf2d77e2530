"""config.dtype='bfloat16': bf16 computation, float32 parameters, optimizer state and loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import base_config, small_config
from flax_mnist import loop, model as model_lib, modes
from flax_mnist import plan as plan_lib
from flax_mnist import steps
from flax_mnist.data import tfds_source


def test_layers_compute_in_bfloat16_and_return_float32_logits():
  config = base_config(dtype='bfloat16')
  model = model_lib.CNN(config, plan_lib.make(config, 'cpu', 1), rngs=nnx.Rngs(params=0))
  jaxpr = str(jax.make_jaxpr(lambda x: model(x))(jnp.zeros((2, 784))))
  assert 'bf16[2,26,26,32]' in jaxpr and 'bf16[2,128]' in jaxpr
  assert model(jnp.zeros((2, 784))).dtype == jnp.float32
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}


def test_bfloat16_trains_keeps_float32_state_and_predicts_like_float32(prepared_data_dir,
                                                                       tmp_path):
  config = small_config(prepared_data_dir, dtype='bfloat16')
  plan = plan_lib.decide(config)
  rows = loop.train_and_evaluate(config, str(tmp_path), plan)
  assert rows[1]['loss'] < rows[0]['loss'] and rows[1]['val_accuracy'] > 0.7
  restored = modes.restore(config, plan, str(tmp_path), 'latest')
  graphdef, state = restored.graphdef, restored.state
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)

  float32_config = small_config(prepared_data_dir)
  float32_graphdef, _, _ = steps.create(float32_config, plan_lib.decide(float32_config))
  images = steps.to_unit_float(tfds_source.load_split(config, 'test[:1000]').images)
  mixed = jax.nn.softmax(nnx.merge(graphdef, state.params)(images))
  full = jax.nn.softmax(nnx.merge(float32_graphdef, state.params)(images))
  assert np.abs(np.asarray(mixed - full)).max() < 0.05
  assert (mixed.argmax(-1) == full.argmax(-1)).mean() >= 0.99
