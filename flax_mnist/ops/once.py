"""A value computed once and stored in a pass of its own, where XLA's CPU compiler would fuse it
into its consumers' passes."""

import jax
import jax.numpy as jnp
from jax import lax


def computed_once(fn, *args):
  """fn(*args), computed once and stored, in a pass of its own rather than fused into those of
  its consumers.

  XLA's CPU compiler fuses a cheap producer into each of its consumers, computing it inside the
  consumer's loop: recomputed there once per element of each consumer, or run in a loop shaped
  for the consumer's output, which can be much slower (the uses, and what each gains: plan.py
  and docs/performance.md). `lax.optimization_barrier` does not stop that (the CPU pipeline
  removes barriers before fusion), but a conditional's results are stored. Both branches are
  `fn`, so its predicate changes nothing; it compares the first element of the last argument
  (a float array) with itself, which XLA cannot fold away (it is false for NaN), as it would an
  integer's. Not for GPU, where a conditional reads its predicate back to the host.
  """
  probe = jax.tree.leaves(args)[-1].ravel()[0].astype(jnp.float32)
  return lax.cond(probe == probe, fn, fn, *args)
