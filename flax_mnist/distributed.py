"""Multi-process runs (multi-host, or several processes on one host): start-up and roles.

Every process runs the same program on its own devices; together they form one global device
mesh. `initialize` must run before any other JAX computation. Afterwards each process feeds only
the rows of every global batch that its devices hold (sharding.process_rows), every process takes
part in orbax saves and restores, and only the main process (0) prints and writes files.
"""

import contextlib
import os
from collections.abc import Iterator, Mapping

import jax

from flax_mnist.errors import FlaxMnistError, first_line

# Variables through which launchers announce a multi-process job: jax's own coordinator
# variable, and process lists of GKE TPU slices, Slurm and Open MPI (more than one process).
_COORDINATOR_VARIABLE = 'JAX_COORDINATOR_ADDRESS'
_PROCESS_LISTS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')
_PROCESS_COUNTS = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


class DistributedError(FlaxMnistError):
  """jax.distributed could not start."""


def _announced_by_environment(environ: Mapping[str, str]) -> bool:
  if environ.get(_COORDINATOR_VARIABLE):
    return True
  if any(len(environ.get(name, '').split(',')) > 1 for name in _PROCESS_LISTS):
    return True
  return any(environ.get(name, '1').isdigit() and int(environ.get(name, '1')) > 1
             for name in _PROCESS_COUNTS)


def wanted(config, environ: Mapping[str, str] | None = None) -> bool:
  """Whether this run is multi-process: config.distributed 'on', or 'auto' with a coordinator
  in the config or a multi-process job announced by the environment."""
  if config.distributed != 'auto':
    return config.distributed == 'on'
  return bool(config.coordinator_address) or _announced_by_environment(
      os.environ if environ is None else environ)


def initialize(config) -> bool:
  """Calls jax.distributed.initialize when `wanted`; returns whether it did.

  Unset fields (coordinator_address '', num_processes 0, process_id -1) are left to JAX, which
  finds them on Cloud TPU pods, Slurm, Open MPI and Kubernetes, or in JAX_COORDINATOR_ADDRESS.
  """
  if not wanted(config):
    return False
  try:
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=None if config.process_id < 0 else config.process_id)
  except (RuntimeError, ValueError, TypeError) as e:
    raise DistributedError(
        f'jax.distributed.initialize failed ({first_line(e)}); '
        'set --config.coordinator_address=HOST:PORT, --config.num_processes and '
        '--config.process_id, or --config.distributed=off for one process.') from None
  return True


def is_main() -> bool:
  """True in the process that prints, writes metrics and exports (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
  """Runs the body in process 0 first, then in the others: e.g. preparing a dataset that the
  processes share, which the others then find ready."""
  if not is_main():
    barrier(name)
  yield
  if is_main():
    barrier(name)
