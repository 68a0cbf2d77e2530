"""How the process manages its memory: malloc keeps what XLA frees (keep_freed_memory), and
Python's cycle collector sits out start-up (pause_collector, resume_collector).

XLA's CPU runtime takes each execution's temporary buffers from malloc and frees them when the
execution ends. glibc gives a freed block above its mmap threshold (adaptive, at most 32 MiB)
straight back to the operating system, and trims the heap's top above its trim threshold, so
every train step maps tens of megabytes afresh and the kernel zero-fills them page by page.
Raising both thresholds keeps freed blocks in the process for the next step: far fewer
faults, less system time, a faster step (benchmarks/RESULTS.md has the counts and times). The
process's resident memory stays near the peak of one step, which each step reaches anyway.

A tuning of glibc's malloc through its documented `mallopt`, not an allocator of our own: where
the C library is another (macOS, musl), nothing changes. Imports nothing heavy (the command
line calls it before JAX allocates anything).

Start-up (importing JAX, flax and orbax, then tracing a step) creates well over a hundred
thousand objects that live as long as the process; each of the cycle collector's full passes walks them
all again, and finds no garbage in them. The collector is off until the imports are done, then
freezes what they made (gc.freeze: later passes skip it) and runs as usual, so tracing's
passes see only new objects (benchmarks/RESULTS.md has the seconds saved).
"""

import ctypes
import gc
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from (and return to) the heap; larger ones are still mapped.
# glibc before 2.35 refuses an mmap threshold above 32 MiB (its adaptive maximum): then that.
THRESHOLDS = (1 << 30, 32 << 20)
# The user's own malloc settings win.
_USER_SETTINGS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES')


def keep_freed_memory() -> int:
  """Raises glibc's mmap and trim thresholds; the mmap threshold set (bytes), 0 if none."""
  if not sys.platform.startswith('linux') or any(os.environ.get(n) for n in _USER_SETTINGS):
    return 0
  try:
    libc = ctypes.CDLL('libc.so.6')  # glibc's name; musl and others have none.
    for threshold in THRESHOLDS:
      if libc.mallopt(_M_MMAP_THRESHOLD, threshold):  # 1 on success, 0 when refused.
        libc.mallopt(_M_TRIM_THRESHOLD, min(2 * threshold, 1 << 30))  # A C int.
        return threshold
  except (OSError, AttributeError):  # No such library or function: leave malloc as it is.
    pass
  return 0


_paused = False  # Whether pause_collector turned the collector off (and resume has not).


def pause_collector() -> None:
  """Turns Python's cycle collector off for the imports (resume_collector turns it back on);
  nothing if the caller already had it off."""
  global _paused
  if gc.isenabled():
    gc.disable()
    _paused = True


def resume_collector() -> None:
  """After pause_collector: moves every object alive now out of the collector's view for good,
  and turns it back on. Otherwise nothing, so calling it again (or on an error path) is safe."""
  global _paused
  if _paused:
    _paused = False
    gc.freeze()
    gc.enable()
