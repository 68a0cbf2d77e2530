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


def batch_sharded(mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def put_batch(mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Places host batches on the devices, split along the batch axis."""
  sharding = batch_sharded(mesh)
  return tuple(jax.device_put(a, sharding) for a in arrays)
