"""The jit-compiled train and eval steps."""

import jax
import numpy as np

from conftest import base_config
from flax_mnist import parallel, train_step as ts


def _batch(n=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  return images, rng.integers(0, 10, n).astype(np.int32)


def test_loss_falls_on_a_fixed_batch():
  config = base_config(batch_size=64)
  graphdef, state, tx = ts.create(config)
  mesh = parallel.make_mesh()
  train, _ = ts.jit_steps(graphdef, tx, mesh)
  batch = parallel.put_batch(mesh, *_batch())
  losses = []
  for _ in range(15):
    state, metrics = train(state, *batch)
    losses.append(float(metrics['loss_sum']) / float(metrics['count']))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 15


def test_train_step_traces_once(monkeypatch):
  traces = []
  original = ts.train_step

  def counting(*args):
    traces.append(1)
    return original(*args)
  monkeypatch.setattr(ts, 'train_step', counting)
  config = base_config(batch_size=32)
  graphdef, state, tx = ts.create(config)
  mesh = parallel.make_mesh()
  train, _ = ts.jit_steps(graphdef, tx, mesh)
  for seed in range(4):
    state, _ = train(state, *parallel.put_batch(mesh, *_batch(32, seed)))
  assert len(traces) == 1


def test_training_is_reproducible_for_a_seed():
  config = base_config(batch_size=32)
  results = []
  for _ in range(2):
    graphdef, state, tx = ts.create(config)
    mesh = parallel.make_mesh()
    train, _ = ts.jit_steps(graphdef, tx, mesh)
    batch = parallel.put_batch(mesh, *_batch(32))
    for _ in range(2):
      state, _ = train(state, *batch)
    results.append(jax.device_get(state.params))
  leaves = [jax.tree.leaves(r) for r in results]
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(a, b)


def test_eval_step_masks_padding():
  config = base_config()
  graphdef, state, _ = ts.create(config)
  images, labels = _batch(8)
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  padded = ts.eval_step(graphdef, state.params, images, labels, mask)
  exact = ts.eval_step(graphdef, state.params, images[:5], labels[:5], np.ones(5, np.float32))
  assert float(padded['count']) == 5
  np.testing.assert_allclose(padded['loss_sum'], exact['loss_sum'], rtol=1e-5)
  assert float(padded['correct']) == float(exact['correct'])
