"""A value computed once and stored, where XLA's CPU compiler would recompute it."""

import jax
import jax.numpy as jnp
from jax import lax


def computed_once(fn, *args):
  """fn(*args), computed once and stored, in a pass of its own rather than fused into those of
  its consumers.

  XLA's CPU compiler fuses a cheap producer into each of its consumers, computing it inside the
  consumer's loop: in the pool's backward pass, each pooled element's window position (four
  compares of the conv output) and its gradient were computed four times over in each of two
  full-size consumers; in the forward pass at k=3 the ReLU, pool and conv dropout, fused into
  the pass that wrote the flattened rows the dense layer reads, ran about five times slower
  than written in NHWC, as if that pass ran without vectors. `lax.optimization_barrier` does
  not stop that (the CPU pipeline removes barriers before fusion), but a conditional's results
  are stored. Both branches are `fn`, so its predicate changes nothing; it compares a float
  drawn from the last argument with itself, which XLA cannot fold away (it is false for NaN),
  as it would an integer's. Not for GPU, where a conditional reads its predicate back to the
  host.
  """
  leaf = jax.tree.leaves(args)[-1]
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  probe = leaf.ravel()[0].astype(jnp.float32)
  return lax.cond(probe == probe, fn, fn, *args)
