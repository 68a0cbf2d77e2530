"""Ctrl-C (SIGINT) and preemption (SIGTERM) during training: stop between steps, save a
checkpoint, say how to resume.

Cloud spot VMs, Kubernetes, Slurm and Colab end a job with SIGTERM, then a grace period, then
SIGKILL; JAX's own preemption sync point answers only where jax.distributed runs, so a
single-host run catches the signal itself. The first signal only raises a flag (the handler
saves nothing: a save inside a signal handler could interrupt the step it must save); the
training loop looks at the flag before every step (and between epochs), so no step or
checkpoint write is cut in half. A second signal quits at once (KeyboardInterrupt), still
waiting for a checkpoint write already under way. The exit code is the shells' 128 + signal.
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from flax_mnist.errors import FlaxMnistError

EXIT_CODE = 128 + signal.SIGINT  # 130, as shells report a Ctrl-C.
EXIT_CODES = {signal.SIGINT: EXIT_CODE, signal.SIGTERM: 128 + signal.SIGTERM}  # 143 for TERM.
_NAMES = {signal.SIGINT: 'Interrupted (Ctrl-C)', signal.SIGTERM: 'Terminated (SIGTERM)'}

_requested = threading.Event()
_received: list[int] = []  # The first stop signal received, if any.


class Interrupted(FlaxMnistError):
  """Training stopped on a stop signal after saving its state."""

  @property
  def exit_code(self) -> int:
    return EXIT_CODES[_received[0] if _received else signal.SIGINT]


class StoppedMidEpoch(Exception):
  """Raised by the epoch loop on a stop signal: the state after `batches` of `epoch`'s batches.

  `sums` are the epoch's metric sums so far, so the resumed epoch reports the same numbers.
  """

  def __init__(self, state, epoch: int, batches: int, sums):
    super().__init__(f'stopped after {batches} batches of epoch {epoch}')
    self.state, self.epoch, self.batches, self.sums = state, epoch, batches, sums


def requested() -> bool:
  """True once a stop signal arrived inside `catch_stop_signals`."""
  return _requested.is_set()


def request(signum: int = signal.SIGINT) -> None:
  """Asks the training loop to stop after the current step, as if `signum` had arrived."""
  if not _requested.is_set():
    _received[:] = [signum]
    _requested.set()


def _on_signal(signum, frame):
  del frame
  if _requested.is_set():
    raise KeyboardInterrupt
  request(signum)
  print(f'{_NAMES[signum]}: stopping after the current step and saving a checkpoint '
        '(send it again to quit at once).', file=sys.stderr, flush=True)


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[None]:
  """Within the block, SIGINT and SIGTERM set `requested()` instead of ending the process.

  A no-op outside the main thread, where Python cannot install signal handlers.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _requested.clear()
  _received.clear()
  previous = {s: signal.signal(s, _on_signal) for s in _NAMES}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _requested.clear()


class LocalStop:
  """When to stop, for a single process: as soon as it was signalled."""

  def before_step(self) -> bool:
    return requested()

  def between_epochs(self) -> bool:
    return requested()


class AgreedStop:
  """When to stop, for several processes: all of them after the same step, as soon as any one
  was signalled, so that all join the same checkpoint.

  Before each step every process casts its vote (the signal it received, or 0) into a max over
  all devices, an asynchronous device computation, and reads the outcome of the previous step's
  vote, which is done by then: the answer comes one step late but costs no wait, and it is the
  same in every process. Between epochs a vote is read at once. JAX's own preemption sync point
  is not used: it sees only SIGTERM, not Ctrl-C.
  """

  def __init__(self, mesh):
    import jax
    from flax_mnist import sharding
    self._local = len(mesh.local_devices)
    self._sharding = sharding.batch_sharded(mesh)
    self._max = jax.jit(lambda votes: votes.max(), out_shardings=sharding.replicated(mesh))
    self._pending = None

  def _cast(self):
    import jax
    import numpy as np
    own = _received[0] if requested() else 0
    return self._max(jax.make_array_from_process_local_data(
        self._sharding, np.full(self._local, own, np.int32)))

  @staticmethod
  def _outcome(vote) -> bool:
    import jax
    signum = int(jax.device_get(vote))
    if signum:
      request(signum)  # A process that was not signalled stops, and exits, as the one that was.
    return bool(signum)

  def before_step(self) -> bool:
    previous, self._pending = self._pending, self._cast()
    return previous is not None and self._outcome(previous)

  def between_epochs(self) -> bool:
    self._pending = None
    return self._outcome(self._cast())


def stop_rule(mesh, processes: int):
  """LocalStop for one process, AgreedStop for several."""
  return LocalStop() if processes == 1 else AgreedStop(mesh)
