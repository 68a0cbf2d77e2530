"""One training run per workdir at a time, and readers that leave its saves alone.

Two runs training into one workdir would both write its checkpoints and append every epoch to
metrics.jsonl twice, with no error; an eval beside a training run would delete the temporary
folder of the save in progress as a leftover of a killed run. The lock is an advisory `flock`
on the workdir folder itself: no file is added, and the kernel drops it when the process ends
however it ends (no stale lock to clean up after a kill). Process 0 of a multi-process run
takes it and tells the others whether it could (they share the workdir by design). Where the
file system or platform has no flock (NFS refuses it on a folder, Windows has none) the run
goes on unlocked; on a FUSE mount (gcsfuse) it holds within one host only.
"""

import contextlib
import os
import pathlib

import jax

from flax_mnist import distributed
from flax_mnist.errors import WorkdirError

try:
  import fcntl
except ImportError:  # Windows.
  fcntl = None


def _try_lock(descriptor: int, mode: int) -> bool:
  """Whether the lock was taken (or flock is missing here); False when another holds it."""
  try:
    fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  except OSError:  # No flock on this file system: unlocked.
    pass
  return True


@contextlib.contextmanager
def held(workdir: pathlib.Path):
  """Holds the workdir's lock for the block; WorkdirError at once, in every process, if
  another run holds it."""
  descriptor = os.open(workdir, os.O_RDONLY) if fcntl and distributed.is_main() else None
  try:
    free = descriptor is None or _try_lock(descriptor, fcntl.LOCK_EX)
    if jax.process_count() > 1:  # The others wait for process 0's answer.
      from jax.experimental import multihost_utils
      free = bool(multihost_utils.broadcast_one_to_all(free))
    if not free:
      raise WorkdirError(f'--workdir={workdir} is in use by another training run; wait for it '
                         'to end, or pass another --workdir.')
    yield
  finally:
    if descriptor is not None:
      os.close(descriptor)  # Releases the lock.


def busy(workdir: pathlib.Path) -> bool:
  """Whether a training run holds the workdir now (for readers: eval, export, ...)."""
  if fcntl is None or not pathlib.Path(workdir).is_dir():
    return False
  descriptor = os.open(workdir, os.O_RDONLY)
  try:
    return not _try_lock(descriptor, fcntl.LOCK_SH)
  finally:
    os.close(descriptor)
