"""Ctrl-C (SIGINT) during training: stop between steps, save a checkpoint, say how to resume.

The first Ctrl-C only raises a flag; the training loop looks at it before every step (and
between epochs), so no step or checkpoint write is cut in half. A second Ctrl-C quits at once
(KeyboardInterrupt), still waiting for a checkpoint write already under way.
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from flax_mnist.errors import FlaxMnistError

EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C.

_requested = threading.Event()


class Interrupted(FlaxMnistError):
  """Training stopped on Ctrl-C after saving its state."""
  exit_code = EXIT_CODE


class StoppedMidEpoch(Exception):
  """Raised by the epoch loop on Ctrl-C: the state after `batches` of `epoch`'s batches.

  `sums` are the epoch's metric sums so far, so the resumed epoch reports the same numbers.
  """

  def __init__(self, state, epoch: int, batches: int, sums):
    super().__init__(f'stopped after {batches} batches of epoch {epoch}')
    self.state, self.epoch, self.batches, self.sums = state, epoch, batches, sums


def requested() -> bool:
  """True once Ctrl-C was pressed inside `catch_sigint`."""
  return _requested.is_set()


def _on_sigint(signum, frame):
  del signum, frame
  if _requested.is_set():
    raise KeyboardInterrupt
  _requested.set()
  print('Interrupted: stopping after the current step and saving a checkpoint '
        '(Ctrl-C again to quit at once).', file=sys.stderr, flush=True)


@contextlib.contextmanager
def catch_sigint() -> Iterator[None]:
  """Within the block, Ctrl-C sets `requested()` instead of raising KeyboardInterrupt.

  A no-op outside the main thread, where Python cannot install signal handlers.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _requested.clear()
  previous = signal.signal(signal.SIGINT, _on_sigint)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    _requested.clear()

