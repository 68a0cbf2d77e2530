"""host_memory: a freed large block is reused without page faults, in a process of its own."""

import subprocess
import sys
import textwrap

import pytest

# Mallocs, writes and frees a 64 MiB block twice, as XLA's runtime does a step's temporaries;
# prints the second round's minor page faults. (ctypes, not numpy: numpy asks for huge pages.)
_PROBE = textwrap.dedent('''
    import ctypes, resource, sys
    from flax_mnist import host_memory
    kept = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    for _ in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(64 << 20)
      ctypes.memset(block, 1, 64 << 20)
      libc.free(block)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(kept, faults[1])
''')


def _second_round_faults(mode: str) -> tuple[str, int]:
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc is on Linux')
def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
  pages = (64 << 20) // 4096
  kept, faults = _second_round_faults('keep')
  assert kept == 'True'
  assert faults < pages // 10, faults
  # Without it, glibc maps the block afresh: every page faults again.
  _, faults = _second_round_faults('default')
  assert faults > pages // 2, faults
