"""Device-resident data: the split lives on the devices and an epoch is one `lax.scan`.

For accelerators, where a train step takes microseconds and a host round trip per step would
dominate. The batch order is the host path's (seed, epoch) permutation, gathered on the device,
so both paths train on the same batches and give the same numbers.
"""

import functools

import jax
import numpy as np

from flax_mnist import input_pipeline, parallel
from flax_mnist import train_step as ts


def use_device_data(config, backend: str | None = None) -> bool:
  """config.device_data, where 'auto' means on for GPU/TPU with a single process."""
  if config.device_data != 'auto':
    return config.device_data == 'on'
  return (backend or jax.default_backend()) != 'cpu' and jax.process_count() == 1


def put_split(split: input_pipeline.Split, mesh):
  """The whole split's uint8 images and labels, replicated on every device (47 MB for MNIST)."""
  return jax.device_put((split.images, split.labels), parallel.replicated(mesh))


def epoch_rows(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """(steps, batch_size) example indices: the host path's batches of this epoch."""
  steps = input_pipeline.steps_per_epoch(num_examples, batch_size)
  order = input_pipeline.epoch_order(num_examples, seed, epoch)
  return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def make_train_epoch(graphdef, tx, mesh, config):
  """jit(state, images, labels, rows) -> (state, (summed metrics, per-step metrics)): one epoch
  as a lax.scan. Per-step metrics are stacked (steps,) arrays, for logging every N steps."""
  num_micro, _ = ts.micro_batch_counts(config, mesh.size)
  rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  def epoch(state, images, labels, rows):
    def body(state, batch_rows):
      x = jax.lax.with_sharding_constraint(images[batch_rows], data)
      y = jax.lax.with_sharding_constraint(labels[batch_rows], data)
      return ts.train_step(graphdef, tx, num_micro, state, x, y)
    # Two steps per loop iteration: ~4% faster on an H100 (benchmarks/RESULTS.md); same maths.
    state, metrics = jax.lax.scan(body, state, rows, unroll=2)
    return state, (jax.tree.map(lambda m: m.sum(0), metrics), metrics)
  return jax.jit(epoch, in_shardings=(rep, rep, rep, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


@functools.lru_cache(maxsize=2)
def _device_epoch_rows(num_examples, batch_size, seed, epoch, sharding):
  return jax.device_put(epoch_rows(num_examples, batch_size, seed, epoch), sharding)


def train_epoch(train_epoch_fn, state, device_split, num_examples, config, epoch,
                step_log=None):
  """Runs epoch `epoch` on the device; returns (state, (loss, accuracy)).

  `step_log` (a metric_writers.StepLog) gets the per-step metrics, read with the sums: one
  host transfer per epoch. The next epoch's batch order is computed while this one runs.
  """
  order = functools.partial(_device_epoch_rows, num_examples, config.batch_size, config.seed,
                            sharding=device_split[0].sharding)  # Replicated, on every process.
  state, (sums, per_step) = train_epoch_fn(state, *device_split, order(epoch))
  order(epoch + 1)  # Host work (~3 ms on a fast CPU) hidden behind the device's epoch.
  sums, per_step = jax.device_get((sums, per_step))
  if step_log is not None:
    step_log.record_all(per_step)
  count = float(sums['count'])
  return state, (float(sums['loss_sum']) / count, float(sums['correct']) / count)
