"""Checkpoints with orbax: saved after every epoch, restored into the current config's layout.

Each checkpoint (keyed by the global train step) holds two items: `state` (params, optimizer
state, step, rng key) and `meta` (epoch, the config that made it, the epoch's metrics). Restore
builds its target from the *current* config and device mesh, never from the saved shardings, so
a checkpoint written on 8 devices (or a TPU) loads on 1 CPU and the reverse.

Faults: orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp` and renames it when
complete, so a kill leaves at most such a folder, removed on the next open. A checkpoint that
no longer reads back (truncated, partly deleted) is moved to `checkpoints_unreadable/` and
training resumes from the newest one that does. A failed write is one CheckpointWriteError.
"""

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import sys
import traceback
from collections.abc import Iterator

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from flax_mnist import schema
from flax_mnist.errors import FlaxMnistError, first_line


class CheckpointError(FlaxMnistError):
  """A checkpoint that cannot be used with the current config."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint whose files cannot be read back (truncated, partly deleted, corrupt)."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint that could not be written (disk full, no permission, not a folder)."""


def _summary(error: BaseException) -> str:
  """The error's type and first line; a long line (TensorStore's: the path first, then the
  reason, then its sources) keeps its start, the OS's reason wherever it stands, and its end."""
  line = first_line(error, limit=100_000)
  if len(line) > 240:
    middle = line[100:-130]
    reasons = [os.strerror(code) for code in sorted(errno.errorcode)
               if os.strerror(code) in middle]
    line = ' ... '.join([line[:100], *reasons[:1], line[-130:]])
  return line


class _WithoutOrbaxLogs(logging.Filter):
  """Drops orbax's own log records: it logs a failed write several times, with tracebacks of its
  threads, where the user needs the one CheckpointWriteError line this module raises. asyncio
  logs the same failure once more ('Task exception was never retrieved') when orbax's failed
  write tasks are collected, possibly after that line: those records name orbax's coroutine."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = f'{record.pathname}\n{record.getMessage()}'
    if record.exc_info and record.exc_info[2]:
      text += ''.join(traceback.format_tb(record.exc_info[2]))
    return '/orbax/' not in text.replace('\\', '/')


def _from_a_loop_orbax_closed(unraisable: 'sys.UnraisableHookArgs') -> bool:
  """True for TensorStore finishing an operation for an event loop that orbax already closed.

  orbax runs each restore in a fresh event loop (asyncio_utils.run_sync) and closes it as soon
  as the first of its gathered reads fails (a damaged checkpoint), while TensorStore still has
  the others in flight. When one of those finishes, TensorStore's own thread calls the closed
  loop's call_soon_threadsafe and Python reports the RuntimeError as unraisable ('Exception
  ignored in: None ... Event loop is closed'). orbax creates and closes that loop inside one call
  and keeps no handle, so nothing of ours can keep it open or wait for the reads; the failure
  itself is already raised (UnreadableCheckpoint). Matched exactly: no object, that message,
  and call_soon_threadsafe as the outermost frame (called from native code, not from Python)."""
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed'
          and bool(frames) and frames[0].name == 'call_soon_threadsafe')


class _WithoutOrbaxClosedLoops:
  """sys.unraisablehook that drops _from_a_loop_orbax_closed reports and passes on the rest:
  after a damaged checkpoint the user sees the one warning line, not a stray traceback."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable: 'sys.UnraisableHookArgs') -> None:
    if not _from_a_loop_orbax_closed(unraisable):
      self.previous(unraisable)


def _warn(text: str) -> None:
  print(f'warning: {text}', file=sys.stderr, flush=True)


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

  def best_step(self, lane: int | None = None) -> int | None:
    """The step with the highest val_accuracy among the kept checkpoints (of a lanes run: the
    lanes' mean, or lane `lane`'s own, read from the checkpoint's history); None when none was
    validated (empty, or only a mid-epoch checkpoint, which is saved before any validation)."""
    validated = [(m['val_accuracy'], s) for s in self.steps()
                 if (m := self.manager.metrics(s)) and 'val_accuracy' in m]
    if lane is not None:
      validated = [(self.read_meta(s)['history'][-1]['lanes'][lane]['val_accuracy'], s)
                   for _, s in validated]
    return max(validated)[1] if validated else None

  def resolve_step(self, requested: str, lane: int | None = None) -> int:
    """'latest', 'best' (lane `lane`'s best, of a lanes run) or a step number -> an existing
    step, or CheckpointError."""
    if not self.steps():
      raise CheckpointError(f'no checkpoint in {self.directory}; train first (--mode=train) '
                            'or pass --config.init_from=FILE.h5.')
    if requested in ('latest', ''):
      return self.latest_step()
    if requested == 'best':
      if (best := self.best_step(lane)) is None:
        raise CheckpointError(f'--step=best: no checkpoint in {self.directory} was validated '
                              f'yet (step {self.latest_step()} was saved mid-epoch); pass '
                              '--step=latest, or train on past the end of an epoch.')
      return best
    if not requested.isdigit() or int(requested) not in self.steps():
      raise CheckpointError(f'--step={requested}: no such checkpoint in {self.directory}; '
                            f'available: {", ".join(map(str, self.steps()))}, latest, best.')
    return int(requested)

  def save(self, step: int, state, meta: dict, val_accuracy: float | None) -> None:
    """Starts an async save of `state` and `meta`; orbax commits it atomically when done.

    `val_accuracy` None (a mid-epoch checkpoint) keeps it out of the best-checkpoint choice. A
    failure of this save or of the previous one raises CheckpointWriteError.
    """
    metrics = None if val_accuracy is None else {'val_accuracy': float(val_accuracy)}
    with self.write_errors():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics)

  @contextlib.contextmanager
  def write_errors(self) -> Iterator[None]:
    """Turns a failed checkpoint write (I/O errors surface as OSError or, from TensorStore,
    ValueError) into one CheckpointWriteError naming the folder and what is still intact."""
    try:
      yield
    except (OSError, ValueError) as e:
      with contextlib.suppress(Exception):  # Best effort: the folder itself may be the fault.
        self.manager.reload()
      kept = self.latest_step()
      raise CheckpointWriteError(
          f'could not write a checkpoint to {self.directory} ({_summary(e)}); '
          + (f'checkpoint step {kept} is intact' if kept else 'no earlier checkpoint exists')
          + '. Free disk space or fix the folder, then run the same command again.') from e

  def read_meta(self, step: int) -> dict:
    """The epoch, config and metrics stored with checkpoint `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore(self, step: int, target, config: dict, training: bool = True):
    """Restores checkpoint `step` into `target`'s shapes and shardings; returns (state, meta).

    Fails with CheckpointError naming the differing fields when `config` is incompatible with
    the config that wrote the checkpoint (for `training`, to go on training it; else to read it).
    """
    try:
      meta = self.read_meta(step)
    except Exception as e:  # Whatever orbax, JSON or TensorStore raise on damaged files.
      raise self._unreadable(step, e) from e
    differences = schema.resume_differences(meta.get('config', {}), config, training)
    if differences:
      raise CheckpointError(
          f'{self.directory} holds checkpoints of another config ({"; ".join(differences)}); '
          'use another --workdir, or the same config as the checkpoint.')
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise self._unreadable(step, e) from e
    return restored.state, meta

  def _unreadable(self, step: int, error: Exception) -> UnreadableCheckpoint:
    others = ', '.join(str(s) for s in self.steps() if s != step) or 'none'
    return UnreadableCheckpoint(
        f'checkpoint step {step} in {self.directory} cannot be read ({_summary(error)}); it is '
        f'damaged. Other checkpoints: {others} (pass --step=N).')

  def restore_newest_readable(self, target, config: dict):
    """Restores the newest checkpoint that reads back; returns (state, meta).

    Newer unreadable ones are moved to checkpoints_unreadable/ with a warning, so training
    goes on from the newest good one. When none reads back, nothing is moved: the error is
    raised (a systematic cause, such as a changed model, is likelier than all being damaged).
    """
    bad = []
    for step in reversed(self.steps()):
      try:
        restored = self.restore(step, target, config)
      except UnreadableCheckpoint as e:
        bad.append((step, e))
        continue
      for bad_step, error in bad:
        moved = self._set_aside(bad_step)
        _warn(f'checkpoint step {bad_step} cannot be read ({_summary(error.__cause__)}); '
              f'moved it to {moved} and resuming from step {step}.')
      self.manager.reload()
      return restored
    raise bad[0][1]

  def _set_aside(self, step: int) -> pathlib.Path:
    target = self.directory.parent / 'checkpoints_unreadable' / str(step)
    suffix = 0
    while target.exists():
      suffix += 1
      target = target.with_name(f'{step}.{suffix}')
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(self.directory / str(step), target)
    return target


def _remove_incomplete(directory: pathlib.Path) -> None:
  """Deletes the temporary folders of saves that a kill cut short (never complete checkpoints).

  Not orbax's cleanup_tmp_directories: that runs in a background future, unseen, while this
  finishes before the folder is used and tells the user what was removed."""
  if not directory.is_dir() or jax.process_index():
    return
  for path in sorted(directory.glob(f'*{ocp.utils.TMP_DIR_SUFFIX}*')):
    shutil.rmtree(path)
    _warn(f'removed {path.name}, a checkpoint whose writing was cut short (no loss: the last '
          'complete checkpoint is used).')


def _make_folder(directory: pathlib.Path) -> None:
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CheckpointWriteError(f'cannot use {directory} as the checkpoint folder '
                               f'({e.strerror or type(e).__name__}); remove what is in the way or '
                               'pass another --workdir.') from None


def _val_accuracy(metrics: dict) -> float:
  return metrics['val_accuracy']


@contextlib.contextmanager
def open_checkpoints(workdir: str | pathlib.Path, keep: int = 3,
                     clean: bool = True) -> Iterator[Checkpoints]:
  """Opens WORKDIR/checkpoints, keeping the newest `keep` checkpoints plus the best one;
  `clean` removes the temporary folders of saves cut short (not beside a running training).

  On every exit path it waits for pending async saves (re-raising a failed one) and closes.
  """
  directory = pathlib.Path(workdir).resolve() / 'checkpoints'
  for logger in map(logging.getLogger, ('absl', 'asyncio')):
    if not any(isinstance(f, _WithoutOrbaxLogs) for f in logger.filters):
      logger.addFilter(_WithoutOrbaxLogs())
  if not isinstance(sys.unraisablehook, _WithoutOrbaxClosedLoops):
    sys.unraisablehook = _WithoutOrbaxClosedLoops(sys.unraisablehook)
  _make_folder(directory)
  if clean:
    _remove_incomplete(directory)  # Here, not in orbax's background thread: before use.
  policy = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=_val_accuracy, n=1,
                     keep_checkpoints_without_metrics=False),
  ])
  # best_fn makes orbax write each checkpoint's metrics to disk (with a preservation_policy
  # alone it keeps them in memory only, so a resumed run forgot which checkpoint was best).
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=True,
                                         best_fn=_val_accuracy)
  manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))
  checkpoints = Checkpoints(manager, directory)
  try:
    yield checkpoints
  finally:
    try:
      with checkpoints.write_errors():
        manager.wait_until_finished()
    finally:
      manager.close()
