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
                  rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the (images, labels) training batches of `epoch`: rows `rows` of each global batch
  of `batch_size` (default: all; a process of a multi-process run reads only its own rows)."""
  order = epoch_order(len(split), seed, epoch)
  for step in range(steps_per_epoch(len(split), batch_size)):
    batch = order[step * batch_size:(step + 1) * batch_size]
    batch = batch if rows is None else batch[rows]
    yield split.images[batch], split.labels[batch]


def eval_batches(split: Split, batch_size: int, rows: np.ndarray | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (images, labels, mask) covering every example once; the last batch is padded.

  Only rows `rows` (sorted) of each global batch are read, as in train_batches.
  """
  for start in range(0, len(split), batch_size):
    batch = np.arange(start, start + batch_size)
    batch = batch if rows is None else batch[rows]
    pad = int((batch >= len(split)).sum())  # Padding rows come last, in order.
    batch = batch[:len(batch) - pad]
    images, labels = split.images[batch], split.labels[batch]
    mask = np.ones(len(labels), np.float32)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    yield images, labels, mask
