"""The jit-compiled train and eval steps."""

import jax
import numpy as np

from conftest import assert_adam_params_close, base_config
from flax_mnist import idx, parallel, train_step as ts


def _batch(n=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  return images, rng.integers(0, 10, n).astype(np.int32)


def _digits(mnist_dir, n=64):
  images, labels = idx.read_split(mnist_dir, 'test')
  return images[:n, ..., None], labels[:n].astype(np.int32)


def _compiled(config):
  graphdef, state, tx = ts.create(config)
  mesh = parallel.make_mesh()
  train, _ = ts.jit_steps(graphdef, tx, mesh, config)
  return train, jax.device_put(state, parallel.replicated(mesh)), mesh


def test_loss_falls_on_a_fixed_batch(mnist_dir):
  train, state, mesh = _compiled(base_config(batch_size=64))
  batch = parallel.put_batch(mesh, *_digits(mnist_dir))
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
  train, state, mesh = _compiled(base_config(batch_size=32))
  for seed in range(4):
    state, _ = train(state, *parallel.put_batch(mesh, *_batch(32, seed)))
  assert len(traces) == 1


def test_training_is_reproducible_for_a_seed():
  config = base_config(batch_size=32)
  results = []
  for _ in range(2):
    train, state, mesh = _compiled(config)
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
  padded = ts.eval_step(graphdef, 1, state.params, images, labels, mask)
  exact = ts.eval_step(graphdef, 1, state.params, images[:5], labels[:5], np.ones(5, np.float32))
  assert float(padded['count']) == 5
  np.testing.assert_allclose(padded['loss_sum'], exact['loss_sum'], rtol=1e-5)
  assert float(padded['correct']) == float(exact['correct'])


def _one_step(config, batch):
  train, state, mesh = _compiled(config)
  state, metrics = train(state, *parallel.put_batch(mesh, *batch))
  return jax.device_get(state.params), jax.device_get(metrics)


def test_micro_batches_change_speed_not_maths():
  batch = _batch(60)
  whole_params, whole_metrics = _one_step(base_config(batch_size=60, micro_batch_size=60), batch)
  for micro in (5, 20):
    params, metrics = _one_step(base_config(batch_size=60, micro_batch_size=micro), batch)
    np.testing.assert_allclose(metrics['loss_sum'], whole_metrics['loss_sum'], rtol=1e-5)
    assert metrics['correct'] == whole_metrics['correct']
    # Gradients summed in another order: the same up to rounding, which Adam may amplify.
    assert_adam_params_close(jax.tree.leaves(params), jax.tree.leaves(whole_params), 1e-3)


def test_split_micro_batches_interleaves():
  x = np.arange(12)
  chunks = np.asarray(ts.split_micro_batches(x, 3))
  np.testing.assert_array_equal(chunks, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])


def test_auto_micro_batch_size():
  config = base_config()
  assert ts.micro_batch_size(config, 1, 'cpu') == 50  # auto: winograd conv2 on CPU.
  assert ts.micro_batch_size(base_config(kernel_size=5), 1, 'cpu') == 50
  assert ts.micro_batch_size(config, 4, 'cpu') == 100  # 200 -> 100: 200 does not divide 500.
  impl = base_config(conv_impl='im2col_vjp')
  assert ts.micro_batch_size(impl, 1, 'cpu') == 20
  assert ts.micro_batch_size(base_config(conv_impl='im2col_vjp', kernel_size=5), 1, 'cpu') == 10
  assert ts.micro_batch_size(impl, 4, 'cpu') == 20  # 84 -> 20: 40, 60, 80 do not divide 500.
  # bfloat16 and kernel sizes without a Winograd transform: im2col_vjp's sizes.
  assert ts.micro_batch_size(base_config(dtype='bfloat16'), 1, 'cpu') == 20
  assert ts.micro_batch_size(base_config(kernel_size=4), 1, 'cpu') == 10
  assert ts.micro_batch_size(base_config(conv_impl='im2col'), 1, 'cpu') == 10
  assert ts.micro_batch_size(base_config(conv_impl='im2col', kernel_size=5), 1, 'cpu') == 5
  assert ts.micro_batch_size(config, 1, 'gpu') == 500
  assert ts.micro_batch_size(base_config(conv_impl='xla'), 1, 'cpu') == 500
  assert ts.micro_batch_size(base_config(micro_batch_size=50), 1, 'cpu') == 50
