"""Data parallelism over every device: one mesh axis 'data', batches split along it."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh() -> jax.sharding.Mesh:
  """A 1-d mesh over all devices (of all processes) along the data axis."""
  # Auto axes: XLA's partitioner inserts the gradient all-reduce of plain data parallelism.
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (params, optimizer state, metrics)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh, lanes: bool = False) -> NamedSharding:
  """Sharding that splits the batch axis over the data axis: the leading one, or with `lanes`
  the second, after the lane axis (lanes x batch x ...)."""
  return NamedSharding(mesh, P(None, DATA_AXIS) if lanes else P(DATA_AXIS))


def padded_size(batch_size: int, devices: int) -> int:
  """The smallest multiple of `devices` that holds `batch_size` rows: a batch that the devices
  do not divide is padded with masked rows (the seed's 500 on 8 devices: 504)."""
  return -(-batch_size // devices) * devices


def process_rows(mesh, batch_size: int) -> np.ndarray:
  """Indices of the rows of a global batch that this process's devices hold, in order.

  All of them with one process; with several, each process reads and feeds only these rows, so
  training is the same as one process with the same devices.
  """
  held = batch_sharded(mesh).addressable_devices_indices_map((batch_size,)).values()
  ranges = sorted({index[0].indices(batch_size)[:2] for index in held})
  return np.concatenate([np.arange(start, stop) for start, stop in ranges])


def put_batch(mesh, *arrays: np.ndarray, lanes: bool = False) -> tuple[jax.Array, ...]:
  """Builds global batches, split along the batch axis, from this process's rows of them
  (`process_rows`; with one process, the whole batch); with `lanes`, arrays of
  (lanes, rows, ...)."""
  sharding = batch_sharded(mesh, lanes)
  return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)
