"""The three report figures, drawn headless with matplotlib's Agg canvas (no display, no pyplot
state): training curves, the confusion matrix, and a grid of the worst-classified digits."""

import pathlib

import numpy as np

from flax_mnist.geometry import IMAGE_SIDE

_DPI = 100


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(width, height), dpi=_DPI, layout='constrained')
  FigureCanvasAgg(figure)
  return figure


def _save(figure, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, format='png')
  return path


def curves(history: list[dict], path: pathlib.Path, mark_epoch: int | None = None,
           title: str = '') -> pathlib.Path:
  """Loss and accuracy per epoch, train vs validation (metrics.jsonl rows); `mark_epoch` draws
  a dashed line at a checkpoint's epoch."""
  from matplotlib.ticker import MaxNLocator
  epochs = [row['epoch'] for row in history]
  figure = _figure(11, 4.2)
  for axes, key, name in zip(figure.subplots(1, 2), ('loss', 'accuracy'), ('Loss', 'Accuracy')):
    axes.plot(epochs, [row[key] for row in history], 'o-', label=f'train ({key})')
    axes.plot(epochs, [row[f'val_{key}'] for row in history], 's-',
              label=f'validation (val_{key})')
    if mark_epoch is not None:
      axes.axvline(mark_epoch, color='gray', linestyle='--',
                   label=f'checkpoint (epoch {mark_epoch})')
    axes.set(xlabel='epoch', ylabel=key, title=name)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
  if title:
    figure.suptitle(title)
  return _save(figure, path)


def confusion_matrix(matrix: np.ndarray, path: pathlib.Path, title: str = '') -> pathlib.Path:
  """Counts of (true, predicted) label pairs, annotated; colour on a compressed scale so the
  off-diagonal mistakes show beside the large diagonal."""
  from matplotlib.colors import PowerNorm
  classes = len(matrix)
  figure = _figure(7.5, 6.5)
  axes = figure.subplots()
  norm = PowerNorm(0.3, vmin=0, vmax=max(matrix.max(), 1))
  image = axes.imshow(matrix, cmap='Blues', norm=norm)
  figure.colorbar(image, ax=axes, label='images')
  threshold = matrix.max() / 10
  for true in range(classes):
    for predicted in range(classes):
      count = matrix[true, predicted]
      if count:
        axes.text(predicted, true, str(count), ha='center', va='center', fontsize=8,
                  color='white' if count > threshold else 'black')
  axes.set(xticks=range(classes), yticks=range(classes), xlabel='predicted label',
           ylabel='true label', title=title or 'Confusion matrix')
  return _save(figure, path)


def errors(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
           path: pathlib.Path, title: str = '', columns: int = 6) -> pathlib.Path:
  """A grid of digits (N, 28, 28[, 1]) titled with true label, prediction, and the model's
  probability for each of the two."""
  rows = max(-(-len(images) // columns), 1)
  figure = _figure(1.6 * columns, 2.1 * rows + 0.5)
  grid = np.atleast_2d(figure.subplots(rows, columns))
  for i, axes in enumerate(grid.flat):
    axes.set_axis_off()
    if i >= len(images):
      continue
    predicted = int(probabilities[i].argmax())
    axes.imshow(images[i].reshape(IMAGE_SIDE, IMAGE_SIDE), cmap='gray_r', vmin=0, vmax=255)
    axes.set_title(f'true {labels[i]}, pred {predicted}\n'
                   f'p({predicted}) = {probabilities[i, predicted]:.2f}\n'
                   f'p({labels[i]}) = {probabilities[i, labels[i]]:.2g}', fontsize=8)
  if not len(images):
    grid.flat[0].text(0.5, 0.5, 'no misclassified images', ha='center', va='center')
  if title:
    figure.suptitle(title)
  return _save(figure, path)
