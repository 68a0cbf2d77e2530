"""The training state and the pure, jit-compiled train and eval steps."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_mnist import keras_import, model as model_lib
from flax_mnist import parallel

_DROPOUT_STREAM = 1  # Folded into the seed so dropout keys never collide with init keys.


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree, so jit, sharding and orbax see it."""
  step: jax.Array  # int32 scalar: number of steps taken.
  params: Any  # nnx.State of the model's nnx.Param variables.
  opt_state: Any
  key: jax.Array  # uint32[2] raw key data; dropout keys are fold_in(key, step).


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam with Keras' defaults (the seed's optimizer='adam')."""
  return optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps)


def create(config, keras_weights: str = '') -> tuple[nnx.GraphDef, TrainState,
                                                    optax.GradientTransformation]:
  """Builds the model and returns (graphdef, state, optimizer).

  Weights are Keras' initializers drawn from config.seed, or read from the Keras .h5 file
  `keras_weights` when given.
  """
  seed_key = jax.random.key(config.seed)
  model = model_lib.CNN(config, rngs=nnx.Rngs(params=seed_key))
  if keras_weights:
    keras_import.load_weights(model, keras_weights)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(config)
  dropout_root = jax.random.fold_in(seed_key, _DROPOUT_STREAM)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     key=jax.random.key_data(dropout_root))
  return graphdef, state, tx


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1], as the seed's input data."""
  return images.astype(jnp.float32) / 255.0


def _loss_and_logits(params, graphdef, images, labels, train, dropout_key):
  logits = nnx.merge(graphdef, params)(to_unit_float(images), train=train,
                                       dropout_key=dropout_key)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return losses, logits


def train_step(graphdef, tx, state: TrainState, images, labels):
  """One Adam step on a batch; returns the new state and the batch's summed metrics."""
  dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

  def loss_fn(params):
    losses, logits = _loss_and_logits(params, graphdef, images, labels, True, dropout_key)
    return losses.mean(), (losses, logits)

  grads, (losses, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss_sum': losses.sum(),
             'correct': (logits.argmax(-1) == labels).sum(),
             'count': jnp.asarray(labels.shape[0], jnp.int32)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(graphdef, params, images, labels, mask):
  """Summed loss and correct predictions over the unmasked examples of a padded batch."""
  losses, logits = _loss_and_logits(params, graphdef, images, labels, False, None)
  return {'loss_sum': (losses * mask).sum(),
          'correct': ((logits.argmax(-1) == labels) * mask).sum(),
          'count': mask.sum()}


def jit_steps(graphdef, tx, mesh):
  """Returns (train_step, eval_step) compiled for `mesh`: batches split, state replicated."""
  rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  train = jax.jit(lambda state, x, y: train_step(graphdef, tx, state, x, y),
                  in_shardings=(rep, data, data), out_shardings=(rep, rep), donate_argnums=0)
  evaluate = jax.jit(lambda params, x, y, m: eval_step(graphdef, params, x, y, m),
                     in_shardings=(rep, data, data, data), out_shardings=rep)
  return train, evaluate
