"""The training state and the pure, jit-compiled train and eval steps."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_mnist import conv, keras_import, model as model_lib
from flax_mnist import parallel

# Bytes of conv2 im2col patches per micro-batch and device on CPU, per implementation: small
# enough for the cache. Measured here: im2col fastest at 10 examples for k=3 and 5 for k=5
# (benchmarks/RESULTS.md); im2col_vjp, whose backward keeps fewer temporaries, at 20 and 10.
_CPU_PATCH_BYTES = {'im2col': 7_000_000, 'im2col_vjp': 14_000_000}
# Winograd's conv2: examples per micro-batch and device on CPU (fastest measured at k=3 and
# k=5: 50, against 20, 25 and 100; benchmarks/RESULTS.md).
_CPU_WINOGRAD_EXAMPLES = 50


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
  params_key, dropout_root = jax.random.split(jax.random.key(config.seed))
  model = model_lib.CNN(config, rngs=nnx.Rngs(params=params_key))
  if keras_weights:
    keras_import.load_weights(model, keras_weights)
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


def _metric_sums(losses, logits, labels, mask=None):
  mask = jnp.ones_like(losses) if mask is None else mask
  return {'loss_sum': (losses * mask).sum(),
          'correct': ((logits.argmax(-1) == labels) * mask).sum(),
          'count': mask.sum()}


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


def train_step(graphdef, tx, num_micro_batches, state: TrainState, images, labels):
  """One Adam step on a batch; returns the new state and the batch's summed metrics.

  Gradients are summed over micro-batches and divided by the batch size: the gradient of the
  batch's mean loss, however the batch is split.
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
      jnp.arange(labels.shape[0]))

  def grads_and_metrics(x, y, keys):
    def loss_fn(params):
      losses, logits = _loss_and_logits(params, graphdef, x, y, keys)
      return losses.sum(), (losses, logits)
    grads, (losses, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
    return grads, _metric_sums(losses, logits, y)

  grad_sums, metrics = _sum_over_micro_batches(grads_and_metrics, num_micro_batches, images,
                                               labels, example_keys)
  grads = jax.tree.map(lambda g: g / labels.shape[0], grad_sums)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(graphdef, num_micro_batches, params, images, labels, mask):
  """Summed loss and correct predictions over the unmasked examples of a padded batch."""
  def sums(x, y, m):
    losses, logits = _loss_and_logits(params, graphdef, x, y)
    return _metric_sums(losses, logits, y, m)
  return _sum_over_micro_batches(sums, num_micro_batches, images, labels, mask)


def micro_batch_counts(config, device_count: int) -> tuple[int, int]:
  """How many micro-batches the (train, eval) steps split their batches into."""
  size = micro_batch_size(config, device_count)
  return max(config.batch_size // size, 1), max(config.eval_batch_size // size, 1)


def micro_batch_size(config, device_count: int, backend: str | None = None) -> int:
  """config.micro_batch_size, or for 0 (auto) on CPU, per device: with winograd,
  _CPU_WINOGRAD_EXAMPLES; with im2col, as many examples as keep conv2's patches within
  _CPU_PATCH_BYTES; elsewhere the whole batch. Always divides both batch sizes and is a
  multiple of the device count."""
  if config.micro_batch_size:
    return config.micro_batch_size
  backend = backend or jax.default_backend()
  impl = conv.resolve(config.conv_impl, backend, config.conv1_features, config.kernel_size,
                      config.dtype)
  if backend != 'cpu' or impl not in (*_CPU_PATCH_BYTES, 'winograd'):
    return config.batch_size
  if impl == 'winograd':
    per_device = _CPU_WINOGRAD_EXAMPLES
  else:
    side = 28 - 2 * (config.kernel_size - 1)
    patch_bytes = side * side * config.kernel_size ** 2 * config.conv1_features * 4
    per_device = max(_CPU_PATCH_BYTES[impl] // patch_bytes, 1)
  target = per_device * device_count
  fits = [m for m in range(device_count, target + 1, device_count)
          if config.batch_size % m == 0 and config.eval_batch_size % m == 0]
  return max(fits) if fits else config.batch_size


def jit_steps(graphdef, tx, mesh, config):
  """Returns (train_step, eval_step) compiled for `mesh`: batches split, state replicated."""
  rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  train_chunks, eval_chunks = micro_batch_counts(config, mesh.size)
  train = jax.jit(lambda state, x, y: train_step(graphdef, tx, train_chunks, state, x, y),
                  in_shardings=(rep, data, data), out_shardings=(rep, rep), donate_argnums=0)
  evaluate = jax.jit(lambda params, x, y, m: eval_step(graphdef, eval_chunks, params, x, y, m),
                     in_shardings=(rep, data, data, data), out_shardings=rep)
  return train, evaluate
