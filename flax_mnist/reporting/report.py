"""The end-of-training report in WORKDIR/plots: curves.png, confusion_matrix.png, errors.png.

Predictions on the eval split are computed by every process (the model is sharded like in
training); only process 0 draws and writes.
"""

import pathlib

import jax
import numpy as np
from flax import nnx

from flax_mnist import distributed, sharding
from flax_mnist import steps as steps_lib
from flax_mnist.data import batches
from flax_mnist.reporting import plots
from flax_mnist.reporting.console import say

PLOTS_DIR = 'plots'
NUM_ERRORS = 36  # Digits in errors.png (a 6x6 grid).


def probabilities(graphdef, params, mesh, split: batches.Split,
                  batch_size: int) -> np.ndarray:
  """Softmax outputs (N, classes) of the model on every example of `split`, in batches of
  `batch_size` but never more than the split holds: a split far smaller than eval_batch_size
  is not padded up to it (an eval_batch_size of 100,000 made the report allocate 50 GB)."""
  batch_size = max(min(batch_size, len(split)), 1)

  @jax.jit
  def predict(params, images):
    model = nnx.merge(graphdef, params)
    return jax.lax.with_sharding_constraint(jax.nn.softmax(model(steps_lib.to_unit_float(images))),
                                            sharding.replicated(mesh))
  chunks = []
  padded = sharding.padded_size(batch_size, mesh.size)
  rows = sharding.process_rows(mesh, padded)  # Each process feeds its rows of a batch.
  for images, _, mask in batches.eval_batches(split, batch_size, padded_size=padded):
    (images,) = sharding.put_batch(mesh, images[rows])
    chunks.append(np.asarray(jax.device_get(predict(params, images)))[mask > 0])
  return np.concatenate(chunks)


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
  """(classes, classes) int array: [true, predicted] -> number of examples."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predicted), 1)
  return matrix


def worst_errors(labels: np.ndarray, probs: np.ndarray, count: int = NUM_ERRORS) -> np.ndarray:
  """Indices of up to `count` misclassified examples, lowest probability on the true label
  first."""
  wrong = np.flatnonzero(probs.argmax(-1) != labels)
  return wrong[np.argsort(probs[wrong, labels[wrong]], kind='stable')][:count]


def write_report(graphdef, params, mesh, config, split: batches.Split,
                 history: list[dict], workdir,
                 mark_epoch: int | None = None) -> list[pathlib.Path]:
  """Writes the three plots to WORKDIR/plots (process 0); returns their paths."""
  probs = probabilities(graphdef, params, mesh, split, config.eval_batch_size)
  if not distributed.is_main():
    return []
  folder = pathlib.Path(workdir) / PLOTS_DIR
  predicted = probs.argmax(-1)
  accuracy = float((predicted == split.labels).mean())
  name = f'{config.dataset} {config.eval_split}, {len(split)} images'
  paths = []
  if history:
    paths.append(plots.curves(history, folder / 'curves.png', mark_epoch,
                              f'{config.dataset}: training curves'))
  else:
    say('No metrics history (no epoch in metrics.jsonl): curves.png not written.')
  matrix = confusion_counts(split.labels, predicted, config.num_classes)
  paths.append(plots.confusion_matrix(matrix, folder / 'confusion_matrix.png',
                                      f'Confusion matrix: {name}, accuracy {accuracy:.4f}'))
  worst = worst_errors(split.labels, probs)
  wrong = int((predicted != split.labels).sum())
  paths.append(plots.errors(split.images[worst], split.labels[worst], probs[worst],
                            folder / 'errors.png',
                            f'The {len(worst)} worst-classified of {wrong} errors ({name})'))
  say(f'Wrote {", ".join(p.name for p in paths)} to {folder}')
  return paths
