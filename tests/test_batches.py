"""Fixed-shape, reproducible batches: the order is a function of (seed, epoch) alone."""

import numpy as np

from flax_mnist.data import batches


def test_epoch_order_is_a_function_of_seed_and_epoch():
  a = batches.epoch_order(1000, seed=42, epoch=3)
  np.testing.assert_array_equal(a, batches.epoch_order(1000, seed=42, epoch=3))
  assert sorted(a) == list(range(1000))
  assert not np.array_equal(a, batches.epoch_order(1000, seed=42, epoch=4))
  assert not np.array_equal(a, batches.epoch_order(1000, seed=43, epoch=3))


def _split(n):
  return batches.Split(images=np.zeros((n, 28, 28, 1), np.uint8),
                              labels=np.arange(n, dtype=np.int32))


def test_train_batches_drop_the_partial_batch():
  split = _split(1050)
  got = list(batches.train_batches(split, 100, seed=0, epoch=1))
  assert len(got) == 10 and all(b[0].shape == (100, 28, 28, 1) for b in got)
  labels = np.concatenate([b[1] for b in got])
  assert len(set(labels.tolist())) == 1000


def test_eval_batches_cover_every_example_once():
  split = _split(1050)
  got = list(batches.eval_batches(split, 200))
  assert all(b[0].shape == (200, 28, 28, 1) for b in got)
  masks = np.concatenate([b[2] for b in got])
  labels = np.concatenate([b[1] for b in got])
  assert masks.sum() == 1050
  np.testing.assert_array_equal(labels[masks == 1], np.arange(1050))
