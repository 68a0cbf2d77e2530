"""The training state, the metric sums, and the pure, jit-compiled train and eval steps."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_mnist import model as model_lib
from flax_mnist import sharding


@flax.struct.dataclass
class MetricSums:
  """Summed loss, correct predictions and example count: added over micro-batches, steps and
  devices exactly, and divided only once, by `means`."""
  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array

  def __add__(self, other: 'MetricSums') -> 'MetricSums':
    return jax.tree.map(jnp.add, self, other)

  def means(self) -> tuple[float, float]:
    """(mean loss, accuracy), read to the host."""
    sums = jax.device_get(self)
    count = float(sums.count)
    return float(sums.loss_sum) / count, float(sums.correct) / count

  def to_json(self) -> dict:
    """Plain floats (float32 values round-trip exactly through JSON)."""
    return {k: float(v) for k, v in vars(jax.device_get(self)).items()}

  @classmethod
  def from_json(cls, values: dict) -> 'MetricSums':
    return cls(**{k: jnp.float32(values[k]) for k in ('loss_sum', 'correct', 'count')})


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


def create(config, plan, keras_weights: str = '') -> tuple[nnx.GraphDef, TrainState,
                                                          optax.GradientTransformation]:
  """Builds the model and returns (graphdef, state, optimizer).

  Weights are Keras' initializers drawn from config.seed, or read from the Keras .h5 or
  .keras file `keras_weights` when given.
  """
  params_key, dropout_root = jax.random.split(jax.random.key(config.seed))
  model = model_lib.CNN(config, plan, rngs=nnx.Rngs(params=params_key))
  if keras_weights:
    from flax_mnist.keras import weights
    weights.load_weights(model, keras_weights)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     key=jax.random.key_data(dropout_root))
  return graphdef, state, tx


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1], as the seed's input data."""
  return images.astype(jnp.float32) / 255.0


def _loss_and_logits(params, graphdef, images, labels, dropout_keys=None):
  model = nnx.merge(graphdef, params)
  logits = model(to_unit_float(images), train=dropout_keys is not None, dropout_keys=dropout_keys)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits


def _metric_sums(losses, logits, labels, mask=None) -> MetricSums:
  mask = jnp.ones_like(losses) if mask is None else mask
  return MetricSums(loss_sum=(losses * mask).sum(),
                    correct=((logits.argmax(-1) == labels) * mask).sum(), count=mask.sum())


def split_micro_batches(x: jax.Array, num: int) -> jax.Array:
  """(B, ...) -> (num, B // num, ...); micro-batch j holds examples j, j + num, j + 2 num, ...

  Interleaving keeps each device's examples on that device when the batch axis is sharded.
  """
  return jnp.moveaxis(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 1, 0)


def _sum_over_micro_batches(fn, num: int, *batch):
  """sum(fn(*micro_batch)) over `num` micro-batches, one after another (lax.scan).

  One micro-batch's activations fit in the CPU's cache where the whole batch's do not; this
  roughly doubles CPU throughput. num == 1 is the plain, unchunked computation.
  """
  if num == 1:
    return fn(*batch)
  chunks = [split_micro_batches(x, num) for x in batch]
  first = jax.eval_shape(fn, *[c[0] for c in chunks])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

  def body(total, chunk):
    return jax.tree.map(jnp.add, total, fn(*chunk)), None
  return jax.lax.scan(body, zeros, chunks)[0]


def train_step(graphdef, tx, num_micro_batches, state: TrainState, images, labels,
               mask=None):
  """One Adam step on a batch; returns the new state and the batch's summed metrics.

  Gradients are summed over micro-batches and divided by the batch size: the gradient of the
  batch's mean loss, however the batch is split. `mask` (a batch padded for the devices) is 0
  on padding rows, which then add nothing: real rows keep their positions, so their dropout
  keys, and the divisor is the number of real rows.
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
      jnp.arange(labels.shape[0]))

  def grads_and_metrics(x, y, keys, m=None):
    def loss_fn(params):
      losses, logits = _loss_and_logits(params, graphdef, x, y, keys)
      losses = losses if m is None else losses * m
      return losses.sum(), (losses, logits)
    grads, (losses, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
    return grads, _metric_sums(losses, logits, y, m)

  batch = (images, labels, example_keys) + (() if mask is None else (mask,))
  grad_sums, metrics = _sum_over_micro_batches(grads_and_metrics, num_micro_batches, *batch)
  count = labels.shape[0] if mask is None else metrics.count
  grads = jax.tree.map(lambda g: g / count, grad_sums)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(graphdef, num_micro_batches, params, images, labels, mask):
  """Summed loss and correct predictions over the unmasked examples of a padded batch."""
  def sums(x, y, m):
    losses, logits = _loss_and_logits(params, graphdef, x, y)
    return _metric_sums(losses, logits, y, m)
  return _sum_over_micro_batches(sums, num_micro_batches, images, labels, mask)


def jit_train_step(graphdef, tx, mesh, plan):
  """train_step for `mesh`: batches split over devices, state replicated (and donated). When
  the plan pads batches, it takes (state, images, labels, mask)."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  batch = (data, data, data) if plan.train_padding else (data, data)
  return jax.jit(
      lambda state, *xy: train_step(graphdef, tx, plan.train_micro_batches, state, *xy),
      in_shardings=(rep, *batch), out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(graphdef, mesh, plan):
  """eval_step for `mesh`: batches split over devices, params replicated."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
      lambda params, x, y, m: eval_step(graphdef, plan.eval_micro_batches, params, x, y, m),
      in_shardings=(rep, data, data, data), out_shardings=rep)
