"""The jit-compiled train and eval steps, and the metric sums they return."""

import json

import jax
import numpy as np
import optax
import pytest

from conftest import assert_adam_params_close, base_config
from flax_mnist import plan as plan_lib
from flax_mnist import sharding, steps
from flax_mnist.data import batches, idx


def _batch(n=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  return images, rng.integers(0, 10, n).astype(np.int32)


def _digits(mnist_dir, n=64):
  images, labels = idx.read_split(mnist_dir, 'test')
  return images[:n, ..., None], labels[:n].astype(np.int32)


def _plan(config):
  """The CPU plan for this process's devices (whatever backend runs the tests: the CPU kernels
  run everywhere, and the micro-batch counts stay those of a CPU run)."""
  return plan_lib.make(config, 'cpu', jax.device_count())


def _compiled(config):
  plan = _plan(config)
  graphdef, state, tx = steps.create(config, plan)
  mesh = sharding.make_mesh()
  train = steps.jit_train_step(graphdef, tx, mesh, plan, config)
  return train, jax.device_put(state, sharding.replicated(mesh)), mesh


def test_loss_falls_on_a_fixed_batch(mnist_dir):
  train, state, mesh = _compiled(base_config(batch_size=64))
  batch = sharding.put_batch(mesh, *_digits(mnist_dir))
  losses = []
  for _ in range(15):
    state, metrics = train(state, *batch)
    losses.append(metrics.means()[0])
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 15


def test_train_step_traces_once(monkeypatch):
  traces = []
  original = steps.train_step

  def counting(*args):
    traces.append(1)
    return original(*args)
  monkeypatch.setattr(steps, 'train_step', counting)
  train, state, mesh = _compiled(base_config(batch_size=32))
  for seed in range(4):
    state, _ = train(state, *sharding.put_batch(mesh, *_batch(32, seed)))
  assert len(traces) == 1


def test_training_is_reproducible_for_a_seed():
  config = base_config(batch_size=32)
  results = []
  for _ in range(2):
    train, state, mesh = _compiled(config)
    batch = sharding.put_batch(mesh, *_batch(32))
    for _ in range(2):
      state, _ = train(state, *batch)
    results.append(jax.device_get(state.params))
  leaves = [jax.tree.leaves(r) for r in results]
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(a, b)


def test_eval_step_masks_padding():
  config = base_config()
  graphdef, state, _ = steps.create(config, _plan(config))
  images, labels = _batch(8)
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  padded = steps.eval_step(graphdef, 1, state.params, images, labels, mask)
  exact = steps.eval_step(graphdef, 1, state.params, images[:5], labels[:5],
                          np.ones(5, np.float32))
  assert float(padded.count) == 5
  np.testing.assert_allclose(padded.loss_sum, exact.loss_sum, rtol=1e-5)
  assert float(padded.correct) == float(exact.correct)


@pytest.mark.parametrize('sizes, micro_batches', [
    (dict(micro_batch_size=20, batch_size=60), 3),
    (dict(batch_size=350), 2),  # Auto: 7 train micro-batches of 50, 2 eval ones of 30.
])
def test_compiled_eval_step_sums_the_plans_micro_batches_like_one(sizes, micro_batches):
  config = base_config(eval_batch_size=60, **sizes)
  plan = _plan(config)
  assert plan.eval_micro_batches == micro_batches
  graphdef, state, _ = steps.create(config, plan)
  mesh = sharding.make_mesh()
  images, labels = _batch(60)
  mask = np.ones(60, np.float32)
  compiled = steps.jit_eval_step(graphdef, mesh, plan)(
      jax.device_put(state.params, sharding.replicated(mesh)),
      *sharding.put_batch(mesh, images, labels, mask))
  whole = steps.eval_step(graphdef, 1, state.params, images, labels, mask)
  np.testing.assert_allclose(compiled.loss_sum, whole.loss_sum, rtol=1e-5)
  assert float(compiled.correct) == float(whole.correct) and float(compiled.count) == 60


def _one_step(config, batch):
  train, state, mesh = _compiled(config)
  state, metrics = train(state, *sharding.put_batch(mesh, *batch))
  return jax.device_get(state.params), jax.device_get(metrics)


def test_micro_batches_change_speed_not_maths():
  batch = _batch(60)
  sizes = dict(batch_size=60, eval_batch_size=60)
  whole_params, whole_metrics = _one_step(base_config(**sizes, micro_batch_size=60), batch)
  for micro in (5, 20):
    params, metrics = _one_step(base_config(**sizes, micro_batch_size=micro), batch)
    np.testing.assert_allclose(metrics.loss_sum, whole_metrics.loss_sum, rtol=1e-5)
    assert metrics.correct == whole_metrics.correct
    # Gradients summed in another order: the same up to rounding, which Adam may amplify.
    assert_adam_params_close(jax.tree.leaves(params), jax.tree.leaves(whole_params), 1e-3)


def test_a_batch_padded_for_even_micro_batches_trains_like_the_whole_batch():
  """A prime batch (53) is padded on CPU to whole micro-batches (27 + 27, one masked row):
  the real rows keep their positions and dropout draws, so one step equals the unpadded one."""
  images, labels = _batch(53)
  sizes = dict(batch_size=53, eval_batch_size=53)
  config = base_config(**sizes)
  plan = _plan(config)
  assert plan.train_padding > 0 and plan.train_micro_batches > 1, plan
  padded = next(batches.eval_batches(batches.Split(images, labels), 53,
                                     padded_size=plan.train_batch))
  train, state, mesh = _compiled(config)
  state, metrics = train(state, *sharding.put_batch(mesh, *padded))
  whole_params, whole_metrics = _one_step(base_config(**sizes, micro_batch_size=53),
                                          (images, labels))
  assert float(metrics.count) == 53 == float(whole_metrics.count)
  np.testing.assert_allclose(metrics.loss_sum, whole_metrics.loss_sum, rtol=1e-5)
  assert metrics.correct == whole_metrics.correct
  assert_adam_params_close(jax.tree.leaves(jax.device_get(state.params)),
                           jax.tree.leaves(whole_params), 1e-3)
  # Adam hardly sees the gradient's scale: with SGD the step is the gradient itself, which must
  # be the mean over the 53 real rows, not the 54 padded ones.
  graphdef, fresh, _ = steps.create(config, plan)
  sgd = optax.sgd(1.0)
  fresh = fresh.replace(opt_state=sgd.init(fresh.params))
  by_micro_batches, _ = steps.train_step(graphdef, sgd, plan.train_micro_batches, fresh, *padded)
  whole, _ = steps.train_step(graphdef, sgd, 1, fresh, images, labels)
  for got, want, before in zip(*(jax.tree.leaves(s.params)
                                 for s in (by_micro_batches, whole, fresh))):
    np.testing.assert_allclose(got - before, want - before, rtol=1e-4, atol=1e-7)


def test_an_eval_batch_padded_for_even_micro_batches_counts_every_example_once():
  """Eval batch 53 is 2 x 27 on CPU, one masked row per batch besides the last batch's own."""
  from flax_mnist import loop
  config = base_config(eval_batch_size=53)
  plan = _plan(config)
  assert plan.eval_batch > 53 and plan.eval_micro_batches > 1, plan
  graphdef, state, _ = steps.create(config, plan)
  mesh = sharding.make_mesh()
  split = batches.Split(*_batch(200))
  state = jax.device_put(state, sharding.replicated(mesh))
  sums = loop.evaluate(loop.compile_eval(graphdef, state, mesh, plan), state.params, mesh, split,
                       53, plan.eval_batch)
  whole = steps.eval_step(graphdef, 1, state.params, split.images, split.labels,
                          np.ones(200, np.float32))
  assert float(sums.count) == 200
  np.testing.assert_allclose(sums.loss_sum, whole.loss_sum, rtol=1e-5)
  assert float(sums.correct) == float(whole.correct)


def test_split_micro_batches_interleaves():
  x = np.arange(12)
  chunks = np.asarray(steps.split_micro_batches(x, 3))
  np.testing.assert_array_equal(chunks, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])


def test_metric_sums_add_exactly_divide_once_and_round_trip_json():
  a = steps.MetricSums(loss_sum=np.float32(3.0), correct=np.float32(4), count=np.float32(8))
  b = steps.MetricSums(loss_sum=np.float32(1.0), correct=np.float32(2), count=np.float32(2))
  total = a + b
  assert total.means() == (0.4, 0.6)
  values = json.loads(json.dumps(total.to_json()))
  assert values == {'loss_sum': 4.0, 'correct': 6.0, 'count': 10.0}
  assert steps.MetricSums.from_json(values).means() == total.means()
