"""The training state, the metric sums, and the pure, jit-compiled train and eval steps."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_mnist import lanes as lanes_lib
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
    """(mean loss, accuracy), read to the host; over all lanes when the sums are per lane."""
    sums = jax.device_get(self)
    count = float(np.sum(sums.count))
    return float(np.sum(sums.loss_sum)) / count, float(np.sum(sums.correct)) / count

  def lane_means(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean loss, accuracy) of each lane, as (lanes,) arrays, from per-lane sums."""
    sums = jax.device_get(self)
    count = np.asarray(sums.count, np.float64)
    return np.asarray(sums.loss_sum) / count, np.asarray(sums.correct) / count

  def to_json(self) -> dict:
    """Plain floats, or lists of them per lane (float32 round-trips exactly through JSON)."""
    return {k: np.asarray(v).tolist() for k, v in vars(jax.device_get(self)).items()}

  @classmethod
  def from_json(cls, values: dict) -> 'MetricSums':
    return cls(**{k: jnp.asarray(values[k], jnp.float32)
                  for k in ('loss_sum', 'correct', 'count')})


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree, so jit, sharding and orbax see it.

  With several lanes, every leaf but `step` has a leading lane axis."""
  step: jax.Array  # int32 scalar: number of steps taken.
  params: Any  # nnx.State of the model's nnx.Param variables.
  opt_state: Any
  key: jax.Array  # uint32[2] raw key data; dropout keys are fold_in(key, step).


def make_optimizer(config, swept: dict | None = None) -> optax.GradientTransformation:
  """Adam with Keras' defaults (the seed's optimizer='adam'); `swept` holds a lane's traced
  values of the fields a sweep varies."""
  value = {**{k: config[k] for k in ('learning_rate', 'adam_b1', 'adam_b2', 'adam_eps')},
           **(swept or {})}
  return optax.adam(value['learning_rate'], b1=value['adam_b1'], b2=value['adam_b2'],
                    eps=value['adam_eps'])


def _create_one(config, plan, seed: int, keras_weights: str):
  params_key, dropout_root = jax.random.split(jax.random.key(seed))
  model = model_lib.CNN(config, plan, rngs=nnx.Rngs(params=params_key))
  if keras_weights:
    from flax_mnist.keras import weights
    weights.load_weights(model, keras_weights)
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params, jax.random.key_data(dropout_root)


def create(config, plan, keras_weights: str = '') -> tuple[nnx.GraphDef, TrainState,
                                                          optax.GradientTransformation]:
  """Builds the model and returns (graphdef, state, optimizer).

  Weights are Keras' initializers drawn from config.seed, or read from the Keras .h5 or
  .keras file `keras_weights` when given. With lanes (plan.lanes > 1) the state stacks each
  lane's, lane i drawn as config.seed + its replica would be alone (flax_mnist/lanes.py).
  """
  tx = make_optimizer(config)
  if plan.lanes == 1:
    graphdef, params, key = _create_one(config, plan, config.seed, keras_weights)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), key=key), tx
  made = [_create_one(config, plan, lane.seed, keras_weights)
          for lane in lanes_lib.lanes(config)]
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *[m[1] for m in made])
  return made[0][0], TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=jax.vmap(tx.init)(params),
                                key=jnp.stack([m[2] for m in made])), tx


def abstract(config, plan, sharding) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, the state's shapes and dtypes with `sharding`): a restore target built by
  tracing `create`, not running it, since a restore overwrites every value."""
  graphdefs = []

  def state():
    graphdef, fresh, _ = create(config, plan)
    graphdefs.append(graphdef)
    return fresh

  shapes = jax.eval_shape(state)
  return graphdefs[0], jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def lane_state(state: TrainState, lane: int) -> TrainState:
  """Lane `lane`'s own state, out of a state of several lanes."""
  return state.replace(params=jax.tree.map(lambda x: x[lane], state.params),
                       opt_state=jax.tree.map(lambda x: x[lane], state.opt_state),
                       key=state.key[lane])


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1], as the seed's input data."""
  return images.astype(jnp.float32) / 255.0


def _loss_and_logits(params, graphdef, images, labels, dropout_keys=None, dropout_rates=None):
  model = nnx.merge(graphdef, params)
  logits = model(to_unit_float(images), train=dropout_keys is not None, dropout_keys=dropout_keys,
                 dropout_rates=dropout_rates)
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
               mask=None, dropout_rates=None):
  """One Adam step on a batch; returns the new state and the batch's summed metrics.

  Gradients are summed over micro-batches and divided by the batch size: the gradient of the
  batch's mean loss, however the batch is split. `mask` (a batch padded for the devices or for
  whole micro-batches: plan.batch_layout) is 0 on padding rows, which then add nothing: real
  rows keep their positions, so their dropout keys, and the divisor is the number of real rows.
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
      jnp.arange(labels.shape[0]))

  def grads_and_metrics(x, y, keys, m=None):
    def loss_fn(params):
      losses, logits = _loss_and_logits(params, graphdef, x, y, keys, dropout_rates)
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


def map_lanes(fn, xs, per_pass: int):
  """fn over the leading lane axis of the pytree `xs`: jax.vmap over `per_pass` lanes at a
  time (lax.map's batches; 1: one lane after another, each with the single model's cache
  footprint)."""
  lanes = jax.tree.leaves(xs)[0].shape[0]
  if per_pass >= lanes:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=per_pass if per_pass > 1 else None)


def lanes_train_step(graphdef, config, plan, state: TrainState, images, labels, mask=None):
  """train_step of every lane in one program: lane i takes its own state, batch
  (images[i], labels[i]) and swept hyperparameters (traced values, so a sweep compiles once);
  the step counter and the padding mask are shared."""
  swept = {k: jnp.asarray(v) for k, v in lanes_lib.swept_values(config).items()}

  def one(lane):
    values, params, opt_state, key, x, y = lane
    rates = (values.get('conv_dropout', config.conv_dropout),
             values.get('dense_dropout', config.dense_dropout))
    alone = TrainState(step=state.step, params=params, opt_state=opt_state, key=key)
    new, metrics = train_step(graphdef, make_optimizer(config, values),
                              plan.train_micro_batches, alone, x, y, mask, rates)
    return (new.params, new.opt_state), metrics
  (params, opt_state), metrics = map_lanes(
      one, (swept, state.params, state.opt_state, state.key, images, labels),
      plan.lanes_per_pass)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def lanes_eval_step(graphdef, plan, params, images, labels, mask):
  """(per-lane summed metrics, the ensemble's): the ensemble averages the lanes' class
  probabilities; its loss is the cross-entropy of that average (clipped at 1e-7, as Keras)."""
  def sums(x, y, m):
    losses, logits = map_lanes(lambda p: _loss_and_logits(p, graphdef, x, y), params,
                               plan.lanes_per_pass)
    per_lane = jax.vmap(lambda l, g: _metric_sums(l, g, y, m))(losses, logits)
    probs = jax.nn.softmax(logits).mean(0)
    picked = jnp.take_along_axis(probs, y[:, None], axis=1)[:, 0]
    ensemble = _metric_sums(-jnp.log(jnp.maximum(picked, 1e-7)), probs, y, m)
    return per_lane, ensemble
  return _sum_over_micro_batches(sums, plan.eval_micro_batches, images, labels, mask)


def step_function(graphdef, tx, config, plan):
  """f(state, images, labels[, mask]) -> (state, metrics): the plan's train step, for one
  model or for its lanes."""
  if plan.lanes == 1:
    return lambda state, *batch: train_step(graphdef, tx, plan.train_micro_batches, state,
                                            *batch)
  return lambda state, *batch: lanes_train_step(graphdef, config, plan, state, *batch)


def jit_train_step(graphdef, tx, mesh, plan, config):
  """The plan's train step for `mesh`: batches split over devices, state replicated (and
  donated). When the plan pads batches, it takes (state, images, labels, mask)."""
  rep, mask = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  data = sharding.batch_sharded(mesh, lanes=plan.lanes > 1)
  batch = (data, data, mask) if plan.train_padding else (data, data)
  return jax.jit(step_function(graphdef, tx, config, plan), in_shardings=(rep, *batch),
                 out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(graphdef, mesh, plan):
  """The plan's eval step for `mesh`: batches split over devices, params replicated."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  if plan.lanes == 1:
    step = lambda params, x, y, m: eval_step(graphdef, plan.eval_micro_batches, params, x, y, m)
  else:
    step = lambda params, x, y, m: lanes_eval_step(graphdef, plan, params, x, y, m)
  return jax.jit(step, in_shardings=(rep, data, data, data), out_shardings=rep)
