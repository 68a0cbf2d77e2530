"""What the user sees: a Keras-style line per epoch, a progress bar, and metrics.jsonl."""

import json
import pathlib
import sys
import time

METRIC_KEYS = ('epoch', 'loss', 'accuracy', 'val_loss', 'val_accuracy', 'seconds',
               'samples_per_second')


def epoch_line(row: dict, num_epochs: int, num_samples: int) -> str:
  """One line per epoch, in the seed notebook's spirit."""
  us_per_sample = 1e6 * row['seconds'] / max(num_samples, 1)
  return (f"Epoch {row['epoch']}/{num_epochs} - {num_samples} samples - "
          f"{row['seconds']:.1f}s {us_per_sample:.0f}us/sample - loss: {row['loss']:.4f} - "
          f"accuracy: {row['accuracy']:.4f} - val_loss: {row['val_loss']:.4f} - "
          f"val_accuracy: {row['val_accuracy']:.4f}")


def metrics_line(row: dict) -> str:
  """One epoch's metrics as a JSON line with the documented keys, in order."""
  return json.dumps({k: row[k] for k in METRIC_KEYS}) + '\n'


def append_metrics(path: pathlib.Path, row: dict) -> None:
  """Appends one epoch's metrics as a JSON line (flushed, so a kill loses nothing written)."""
  with open(path, 'a') as f:
    f.write(metrics_line(row))
    f.flush()


def read_metrics(path: pathlib.Path) -> list[dict]:
  """Reads metrics.jsonl back (an empty list when it does not exist)."""
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
  """A Keras-like in-place bar, drawn only when `enabled` and stdout is a terminal."""

  def __init__(self, total_steps: int, enabled: bool = True, stream=sys.stdout, width=30):
    self.total, self.width, self.stream = total_steps, width, stream
    self.enabled = enabled and stream.isatty()
    self.start = time.perf_counter()

  def update(self, done: int, loss: float | None = None) -> None:
    """Redraws the bar after `done` of total steps; `loss` is the latest known batch loss."""
    if not self.enabled:
      return
    filled = self.width * done // self.total
    arrow = '>' if done < self.total else '='
    bar = '=' * max(filled - 1, 0) + (arrow if filled else '') + '.' * (self.width - filled)
    elapsed = time.perf_counter() - self.start
    eta = elapsed / max(done, 1) * (self.total - done)
    text = f'\r{done}/{self.total} [{bar}] - ETA: {eta:.0f}s'
    if loss is not None:
      text += f' - loss: {loss:.4f}'
    self.stream.write(text)
    self.stream.flush()

  def close(self) -> None:
    """Clears the bar's line so the epoch line replaces it."""
    if self.enabled:
      self.stream.write('\r' + ' ' * (self.width + 60) + '\r')
      self.stream.flush()
