"""config.dtype='bfloat16': bf16 computation, float32 parameters, optimizer state and loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import base_config, small_config
from flax_mnist import input_pipeline, model as model_lib, modes, train
from flax_mnist import train_step as ts


def test_layers_compute_in_bfloat16_and_return_float32_logits():
  model = model_lib.CNN(base_config(dtype='bfloat16'), rngs=nnx.Rngs(params=0))
  jaxpr = str(jax.make_jaxpr(lambda x: model(x))(jnp.zeros((2, 784))))
  assert 'bf16[2,26,26,32]' in jaxpr and 'bf16[2,128]' in jaxpr
  assert model(jnp.zeros((2, 784))).dtype == jnp.float32
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}


def test_bfloat16_trains_keeps_float32_state_and_predicts_like_float32(prepared_data_dir,
                                                                       tmp_path):
  config = small_config(prepared_data_dir, dtype='bfloat16')
  rows = train.train_and_evaluate(config, str(tmp_path))
  assert rows[1]['loss'] < rows[0]['loss'] and rows[1]['val_accuracy'] > 0.7
  graphdef, state, _ = modes.restore(config, str(tmp_path), 'latest')
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)

  float32_graphdef, _, _ = ts.create(small_config(prepared_data_dir))
  images = ts.to_unit_float(input_pipeline.load_split(config, 'test[:1000]').images)
  mixed = jax.nn.softmax(nnx.merge(graphdef, state.params)(images))
  full = jax.nn.softmax(nnx.merge(float32_graphdef, state.params)(images))
  assert np.abs(np.asarray(mixed - full)).max() < 0.05
  assert (mixed.argmax(-1) == full.argmax(-1)).mean() >= 0.99
