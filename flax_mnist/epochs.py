"""The two epoch engines, behind one interface: `engine.run(state, epoch, progress, resume)`
returns (state, MetricSums) for epoch `epoch`.

- HostFed: one jit step per batch, batches built on the host. One step stays in flight: after
  dispatching step i the host reads step i-1's metrics, so the device never idles and the
  progress bar and TensorBoard show real progress with no per-step stall. A stop signal stops
  it before a step (interrupt.StoppedMidEpoch); with several processes, all at the same step.
- DeviceResident: the split lives on the devices and an epoch is one `lax.scan`: for
  accelerators, where a step takes microseconds and a host round trip per step would dominate.
  Its batch order is the host path's (seed, epoch) permutation gathered on the device, so both
  engines train on the same batches and give the same numbers. A stop takes effect at the
  epoch's end.

Both compile ahead of time in `build`, including the remainder of an epoch that a resumed
checkpoint had cut short, so nothing compiles while training runs.
"""

import dataclasses
import functools
import itertools

import jax
import numpy as np

from flax_mnist import geometry, interrupt, sharding
from flax_mnist import lanes as lanes_lib
from flax_mnist import steps as steps_lib
from flax_mnist.data import batches
from flax_mnist.reporting import console


@dataclasses.dataclass(frozen=True)
class Resume:
  """Where an epoch cut short stopped: after `batches` batches, with the sums so far."""
  epoch: int
  batches: int
  sums: steps_lib.MetricSums | None

  @classmethod
  def from_meta(cls, partial: dict | None) -> 'Resume | None':
    """From a checkpoint's 'partial' record (None after a whole epoch)."""
    if not partial:
      return None
    sums = partial['sums']
    return cls(partial['epoch'], partial['batches'],
               None if sums is None else steps_lib.MetricSums.from_json(sums))

  def line(self, step: int, steps: int) -> str:
    """The console's note of where training resumes, in an epoch of `steps` batches."""
    return (f'Resumed from epoch {self.epoch - 1}, step {step}: {self.batches} of {steps} '
            f'batches into epoch {self.epoch}')


def samples_to_train(steps: int, batch_size: int, resume: Resume | None) -> int:
  """Samples this process trains in an epoch of `steps` batches: after a mid-epoch resume only
  the batches left, which is what its throughput must be measured on."""
  return (steps - (resume.batches if resume else 0)) * batch_size


@dataclasses.dataclass
class Progress:
  """What an epoch reports to while it runs (the bar, TensorBoard's per-step log) and asks
  whether to stop before a step (interrupt.LocalStop or AgreedStop)."""
  bar: console.ProgressBar
  step_log: object = None  # reporting.tensorboard.StepLog, or None.
  stop: object = dataclasses.field(default_factory=interrupt.LocalStop)


def _add(total, sums):
  return sums if total is None else total + sums


def batch_specs(mesh, size: int, *dtypes, lanes: int = 1) -> list[jax.ShapeDtypeStruct]:
  """Abstract (images, labels[, mask]) batches of `size`, split over the mesh's devices; with
  lanes, images and labels have a leading lane axis (the mask is shared)."""
  mask, data = sharding.batch_sharded(mesh), sharding.batch_sharded(mesh, lanes > 1)
  lane_axis = (lanes,) if lanes > 1 else ()
  return ([jax.ShapeDtypeStruct((*lane_axis, size, *geometry.IMAGE_SHAPE), dtypes[0],
                                sharding=data),
           jax.ShapeDtypeStruct((*lane_axis, size), dtypes[1], sharding=data)]
          + [jax.ShapeDtypeStruct((size,), d, sharding=mask) for d in dtypes[2:]])


def seeds(config, plan) -> list[int]:
  """The data-order seed of each lane (one: config.seed)."""
  return [lane.seed for lane in lanes_lib.lanes(config)] if plan.lanes > 1 else [config.seed]


class HostFed:
  """Epochs of host-built batches, one compiled train step each."""

  def __init__(self, graphdef, tx, state, mesh, plan, config, split: batches.Split):
    self.mesh, self.config, self.split, self.plan = mesh, config, split, plan
    dtypes = (np.uint8, np.int32) + ((np.float32,) if plan.train_padding else ())
    self.step = steps_lib.jit_train_step(graphdef, tx, mesh, plan, config).lower(
        state, *batch_specs(mesh, plan.train_batch, *dtypes, lanes=plan.lanes)).compile()

  def _batches(self, epoch: int):
    """This epoch's batches on the host (with lanes: each lane's, stacked), lazily."""
    config, plan = self.config, self.plan
    rows = sharding.process_rows(self.mesh, plan.train_batch)
    padded = plan.train_batch if plan.train_padding else None
    if plan.lanes == 1:
      return batches.train_batches(self.split, config.batch_size, config.seed, epoch, rows,
                                   padded)
    return batches.lanes_train_batches(self.split, config.batch_size, seeds(config, plan),
                                       epoch, rows, padded)

  def _put(self, images, labels, *mask):
    """A host batch as global arrays split over the devices."""
    if self.plan.lanes == 1:
      return sharding.put_batch(self.mesh, images, labels, *mask)
    return (sharding.put_batch(self.mesh, images, labels, lanes=True)
            + sharding.put_batch(self.mesh, *mask))

  def run(self, state, epoch: int, progress: Progress, resume: Resume | None = None):
    first, total = (0, None) if resume is None else (resume.batches, resume.sums)
    previous, done = None, first
    bar, log = progress.bar, progress.step_log
    for done, batch in enumerate(itertools.islice(self._batches(epoch), first, None),
                                 start=first + 1):
      if progress.stop.before_step():
        raise interrupt.StoppedMidEpoch(state, epoch, done - 1, total)
      state, metrics = self.step(state, *self._put(*batch))
      total = _add(total, metrics)
      if previous is not None:
        bar.update(done - 1, previous.means()[0] if bar.enabled else None)
        if log is not None:
          log.record(done - 1, previous)
      previous = metrics
    if log is not None and previous is not None:
      log.record(done, previous)
    bar.update(bar.total)
    bar.close()
    return state, total


def epoch_rows(num_examples: int, batch_size: int, seed: int, epoch: int,
               padding: int = 0) -> np.ndarray:
  """(steps, batch_size + padding) example indices: the host path's batches of this epoch,
  each followed by `padding` rows of example 0 (masked out by the step)."""
  steps = batches.steps_per_epoch(num_examples, batch_size)
  order = batches.epoch_order(num_examples, seed, epoch)
  rows = order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)
  return np.pad(rows, ((0, 0), (0, padding))) if padding else rows


def lanes_epoch_rows(num_examples: int, batch_size: int, seeds: list[int], epoch: int,
                     padding: int = 0) -> np.ndarray:
  """epoch_rows of one seed, or (steps, lanes, batch_size + padding) of several."""
  if len(seeds) == 1:
    return epoch_rows(num_examples, batch_size, seeds[0], epoch, padding)
  return np.stack([epoch_rows(num_examples, batch_size, s, epoch, padding) for s in seeds], 1)


def _scan_epoch(graphdef, tx, mesh, plan, config):
  """jit(state, images, labels, rows) -> (state, (sums, per-step sums)): the steps of `rows`
  as one lax.scan; per-step sums are stacked (steps,) arrays, for logging every N steps."""
  rep, mask_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  data = sharding.batch_sharded(mesh, plan.lanes > 1)
  real = plan.train_batch - plan.train_padding
  mask = (np.arange(plan.train_batch) < real).astype(np.float32) if plan.train_padding else None
  step = steps_lib.step_function(graphdef, tx, config, plan)

  def epoch(state, images, labels, rows):
    def body(state, batch_rows):
      x = jax.lax.with_sharding_constraint(images[batch_rows], data)
      y = jax.lax.with_sharding_constraint(labels[batch_rows], data)
      m = () if mask is None else (jax.lax.with_sharding_constraint(mask, mask_sharding),)
      return step(state, x, y, *m)
    # Two steps per loop iteration: faster on GPU (benchmarks/RESULTS.md); same maths.
    state, per_step = jax.lax.scan(body, state, rows, unroll=2)
    return state, (jax.tree.map(lambda m: m.sum(0), per_step), per_step)
  return jax.jit(epoch, in_shardings=(rep, rep, rep, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


class DeviceResident:
  """Epochs as one device call each, over the split held (replicated) on every device."""

  def __init__(self, graphdef, tx, state, mesh, plan, config, split: batches.Split,
               resume: Resume | None = None):
    self.config, self.num_examples, self.padding = config, len(split), plan.train_padding
    self.split = jax.device_put((split.images, split.labels), sharding.replicated(mesh))
    self.seeds = seeds(config, plan)
    scan = _scan_epoch(graphdef, tx, mesh, plan, config)
    steps = batches.steps_per_epoch(len(split), config.batch_size)
    lengths = {steps} | ({steps - resume.batches} if resume else set())
    lane_axis = (plan.lanes,) if plan.lanes > 1 else ()
    self.compiled = {n: scan.lower(state, *self.split, jax.ShapeDtypeStruct(
        (n, *lane_axis, plan.train_batch), np.int32)).compile() for n in lengths if n > 0}

  @functools.lru_cache(maxsize=2)
  def _rows(self, epoch: int, first: int = 0) -> jax.Array:
    rows = lanes_epoch_rows(self.num_examples, self.config.batch_size, self.seeds, epoch,
                            self.padding)
    return jax.device_put(rows[first:], self.split[0].sharding)  # Replicated, every process.

  def run(self, state, epoch: int, progress: Progress, resume: Resume | None = None):
    first, total = (0, None) if resume is None else (resume.batches, resume.sums)
    rows = self._rows(epoch, first)
    if len(rows):
      state, (sums, per_step) = self.compiled[len(rows)](state, *self.split, rows)
      self._rows(epoch + 1)  # Host work hidden behind the device's epoch.
      per_step = jax.device_get(per_step)
      if progress.step_log is not None:
        progress.step_log.record_all(per_step, start=first)
      total = _add(total, sums)
    progress.bar.close()  # Nothing to draw: the epoch is a single device call.
    return state, total


def build(graphdef, tx, state, mesh, plan, config, split, resume: Resume | None = None):
  """The plan's engine for `split`, compiled for `state`'s layout."""
  if plan.device_data:
    return DeviceResident(graphdef, tx, state, mesh, plan, config, split, resume)
  return HostFed(graphdef, tx, state, mesh, plan, config, split)
