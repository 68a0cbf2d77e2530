"""host_memory: a freed large block is reused without page faults, in a process of its own; the
cycle collector is off during the imports and skips what they made afterwards."""

import os
import pathlib
import platform
import resource
import subprocess
import sys
import textwrap

import pytest

from flax_mnist import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]
_BLOCK = 64 << 20

# Mallocs, writes and frees a block twice, as XLA's runtime does a step's temporaries; prints
# what keep_freed_memory returned and the second round's minor page faults. Transparent huge
# pages are turned off for the probe (in 'always' mode a block faults per 2 MiB, not per page);
# ctypes rather than numpy, which asks for huge pages itself.
_PROBE = textwrap.dedent(f'''
    import ctypes, resource, sys
    from flax_mnist import host_memory
    libc = ctypes.CDLL('libc.so.6')
    libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    kept = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    for _ in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc({_BLOCK})
      ctypes.memset(block, 1, {_BLOCK})
      libc.free(block)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(kept, faults[1])
''')
_glibc = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='a glibc tuning')


def _probe(mode: str, **env) -> tuple[str, int]:
  clean = {k: v for k, v in os.environ.items() if k not in host_memory._USER_SETTINGS}
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], cwd=REPO, env=dict(clean, **env),
                       capture_output=True, text=True, check=True, timeout=60).stdout.split()
  return out[0], int(out[1])


@_glibc
def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
  pages = _BLOCK // resource.getpagesize()
  kept, faults = _probe('keep')
  assert int(kept) in host_memory.THRESHOLDS
  if int(kept) < _BLOCK:
    pytest.skip('this glibc caps the mmap threshold below the probe block')
  assert faults < pages // 10, faults
  # Without it, glibc maps the block afresh: every page faults again.
  _, faults = _probe('default')
  assert faults > pages // 2, faults


@_glibc
def test_the_users_own_malloc_settings_are_left_alone():
  pages = _BLOCK // resource.getpagesize()
  kept, faults = _probe('keep', MALLOC_TRIM_THRESHOLD_='131072')
  assert kept == '0'
  assert faults > pages // 2, faults


def test_the_collector_pauses_for_the_imports_then_skips_what_they_made():
  probe = textwrap.dedent('''
      import gc
      from flax_mnist import host_memory
      before = gc.get_freeze_count()
      host_memory.pause_collector()
      paused = gc.isenabled()
      made = [[i] for i in range(10_000)]  # Long-lived objects, as imports make.
      host_memory.resume_collector()
      frozen = gc.get_freeze_count() - before >= len(made)
      host_memory.resume_collector()  # Again, as an error path may: nothing more.
      gc.disable()
      host_memory.pause_collector()  # The caller's own choice (off) is kept.
      host_memory.resume_collector()
      print(paused, frozen, gc.isenabled())
  ''')
  result = subprocess.run([sys.executable, '-c', probe], cwd=REPO, capture_output=True,
                          text=True, check=True)
  assert result.stdout.split() == ['False', 'True', 'False']
