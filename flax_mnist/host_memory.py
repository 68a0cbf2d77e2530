"""Keep the memory XLA's CPU runtime frees, so that the next step reuses it.

XLA's CPU runtime takes each execution's temporary buffers from malloc and frees them when the
execution ends. glibc gives a freed block above its mmap threshold (adaptive, at most 32 MiB)
straight back to the operating system, and trims the heap's top above its trim threshold, so
every train step maps tens of megabytes afresh and the kernel zero-fills them page by page.
Raising both thresholds keeps freed blocks in the process for the next step: no faults, less
system time, a faster step (benchmarks/RESULTS.md has the counts and times). The process's
resident memory stays near the peak of one step, which each step reaches anyway.

A tuning of glibc's malloc through its documented `mallopt`, not an allocator of our own: where
the C library is another (macOS, musl), nothing changes. Imports nothing heavy (the command
line calls it before JAX allocates anything).
"""

import ctypes
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from (and return to) the heap; larger ones are still mapped.
THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
  """Raises glibc's mmap and trim thresholds to THRESHOLD; whether they were raised."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')  # glibc's name; musl and others have none.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
  except (OSError, AttributeError):  # No such library or function: leave malloc as it is.
    return False
