"""One training run per workdir at a time.

Two runs training into one workdir would both write its checkpoints and append every epoch to
metrics.jsonl twice, with no error. The lock is an advisory `flock` on the workdir folder
itself: no file is added, and the kernel drops it when the process ends however it ends (no
stale lock to clean up after a kill). Only process 0 of a multi-process run takes it (the
others share the workdir by design); where the file system or platform has no flock (some
network file systems, Windows) the run goes on unlocked.
"""

import contextlib
import os
import pathlib

from flax_mnist import distributed
from flax_mnist.errors import WorkdirError


@contextlib.contextmanager
def held(workdir: pathlib.Path):
  """Holds the workdir's lock for the block; WorkdirError at once if another run holds it."""
  try:
    import fcntl
  except ImportError:  # Windows.
    fcntl = None
  if fcntl is None or not distributed.is_main():
    yield
    return
  descriptor = os.open(workdir, os.O_RDONLY)
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirError(f'--workdir={workdir} is in use by another training run; wait for it '
                         'to end, or pass another --workdir.') from None
    except OSError:  # No flock here: unlocked.
      pass
    yield
  finally:
    os.close(descriptor)  # Releases the lock.
