"""A split in memory and its fixed-shape batches.

The training order is a pure function of (seed, epoch), which makes resumed runs exact; every
process of a multi-process run reads only its own rows of each global batch.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: uint8 images (N, 28, 28, 1) and int32 labels (N,)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of `epoch`: a permutation that depends only on (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Number of full batches per epoch (the last partial batch is dropped)."""
  return num_examples // batch_size


def train_batches(split: Split, batch_size: int, seed: int, epoch: int,
                  rows: np.ndarray | None = None, padded_size: int | None = None) -> Iterator:
  """Yields the (images, labels) training batches of `epoch`: rows `rows` of each global batch
  of `batch_size` (default: all; a process of a multi-process run reads only its own rows).

  With `padded_size` (when the plan pads the batch for the devices or its micro-batches), each
  global batch is padded at its end to that many rows, and (images, labels, mask) are yielded:
  mask 0 marks the padding, which the step leaves out of everything it computes.
  """
  order = epoch_order(len(split), seed, epoch)
  for step in range(steps_per_epoch(len(split), batch_size)):
    batch = order[step * batch_size:(step + 1) * batch_size]
    if padded_size is None:
      batch = batch if rows is None else batch[rows]
      yield split.images[batch], split.labels[batch]
    else:
      yield _gather(split, _pad(batch, padded_size), rows)


def lanes_train_batches(split: Split, batch_size: int, seeds: list[int], epoch: int,
                        rows: np.ndarray | None = None, padded_size: int | None = None
                        ) -> Iterator:
  """train_batches of each seed (one per lane) stacked: (lanes, rows, ...) images and labels,
  then, when padded, the mask that all lanes share."""
  for group in zip(*(train_batches(split, batch_size, s, epoch, rows, padded_size)
                     for s in seeds)):
    yield (np.stack([g[0] for g in group]), np.stack([g[1] for g in group]), *group[0][2:])


def eval_batches(split: Split, batch_size: int, rows: np.ndarray | None = None,
                 padded_size: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (images, labels, mask) covering every example once, `batch_size` at a time; each
  batch is padded at its end (the last one with the examples it lacks) to `padded_size` rows
  (default batch_size), mask 0 on the padding. Only rows `rows` of each are read, as in
  train_batches."""
  for start in range(0, len(split), batch_size):
    batch = np.arange(start, min(start + batch_size, len(split)))
    yield _gather(split, _pad(batch, padded_size or batch_size), rows)


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
  """Example indices padded with -1 (no example) up to `size`."""
  return np.concatenate([batch, np.full(size - len(batch), -1, batch.dtype)])


def _gather(split: Split, batch: np.ndarray, rows: np.ndarray | None):
  """(images, labels, mask) of the examples `batch[rows]`; index -1 gives zeros, mask 0."""
  batch = batch if rows is None else batch[rows]
  valid = batch >= 0
  safe = np.where(valid, batch, 0)
  images, labels = split.images[safe], split.labels[safe]
  images[~valid], labels[~valid] = 0, 0
  return images, labels, valid.astype(np.float32)
