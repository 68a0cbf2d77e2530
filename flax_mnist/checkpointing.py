"""Checkpoints with orbax: saved after every epoch, restored into the current config's layout.

Each checkpoint (keyed by the global train step) holds two items: `state` (params, optimizer
state, step, rng key) and `meta` (epoch, the config that made it, the epoch's metrics). Restore
builds its target from the *current* config and device mesh, never from the saved shardings, so
a checkpoint written on 8 devices (or a TPU) loads on 1 CPU and the reverse.
"""

import contextlib
import pathlib
from collections.abc import Iterator

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from flax_mnist.errors import FlaxMnistError

# Fields that may change between a checkpoint and the run that resumes or evaluates it: they do
# not change the model or what training computes. Every other field must match.
MAY_DIFFER = frozenset({'num_epochs', 'data_dir', 'idx_dir', 'progress_bar', 'eval_batch_size',
                        'eval_split', 'conv_impl', 'micro_batch_size', 'keep_checkpoints',
                        'init_from', 'device_data'})


class CheckpointError(FlaxMnistError):
  """A checkpoint that cannot be used with the current config."""


def config_differences(saved: dict, current: dict) -> list[str]:
  """'field: saved -> current' for every field (outside MAY_DIFFER) whose values differ."""
  names = sorted((set(saved) | set(current)) - MAY_DIFFER)
  return [f'{n}: {saved.get(n, "(absent)")!r} -> {current.get(n, "(absent)")!r}'
          for n in names if saved.get(n) != current.get(n)]


class Checkpoints:
  """The run's checkpoint folder: save per epoch, find latest/best, restore into a target."""

  def __init__(self, manager: ocp.CheckpointManager, directory: pathlib.Path):
    self.manager, self.directory = manager, directory

  def steps(self) -> list[int]:
    """Steps of every complete checkpoint, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest val_accuracy among the kept checkpoints (None when empty)."""
    scored = [(m['val_accuracy'], s) for s in self.steps()
              if (m := self.manager.metrics(s)) and 'val_accuracy' in m]
    return max(scored)[1] if scored else self.latest_step()

  def resolve_step(self, requested: str) -> int:
    """'latest', 'best' or a step number -> an existing step, or CheckpointError."""
    if not self.steps():
      raise CheckpointError(f'no checkpoint in {self.directory}; train first (--mode=train) '
                            'or pass --config.init_from=FILE.h5.')
    if requested in ('latest', ''):
      return self.latest_step()
    if requested == 'best':
      return self.best_step()
    if not requested.isdigit() or int(requested) not in self.steps():
      raise CheckpointError(f'--step={requested}: no such checkpoint in {self.directory}; '
                            f'available: {", ".join(map(str, self.steps()))}, latest, best.')
    return int(requested)

  def save(self, step: int, state, meta: dict, val_accuracy: float) -> None:
    """Starts an async save of `state` and `meta`; orbax commits it atomically when done."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics={'val_accuracy': float(val_accuracy)})

  def read_meta(self, step: int) -> dict:
    """The epoch, config and metrics stored with checkpoint `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore(self, step: int, target, config: dict):
    """Restores checkpoint `step` into `target`'s shapes and shardings; returns (state, meta).

    Fails with CheckpointError naming the differing fields when `config` is incompatible with
    the config that wrote the checkpoint.
    """
    meta = self.read_meta(step)
    differences = config_differences(meta.get('config', {}), config)
    if differences:
      raise CheckpointError(
          f'{self.directory} holds checkpoints of another config ({"; ".join(differences)}); '
          'use another --workdir, or the same config as the checkpoint.')
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored.state, meta


@contextlib.contextmanager
def open_checkpoints(workdir: str | pathlib.Path, keep: int = 3) -> Iterator[Checkpoints]:
  """Opens WORKDIR/checkpoints, keeping the newest `keep` checkpoints plus the best one.

  On every exit path it waits for pending async saves (re-raising a failed one) and closes.
  """
  directory = pathlib.Path(workdir).resolve() / 'checkpoints'
  policy = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=lambda metrics: metrics['val_accuracy'], n=1),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))
  try:
    yield Checkpoints(manager, directory)
  finally:
    try:
      manager.wait_until_finished()
    finally:
      manager.close()
