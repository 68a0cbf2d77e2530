"""What the user sees on the console: the run's story (`say`), a Keras-style line per epoch,
and an in-place progress bar."""

import sys
import time

from flax_mnist import distributed


def say(text: str) -> None:
  """Prints a user-facing line at once (logs go to stderr; this is the run's story); only
  process 0 of a multi-process run prints."""
  if distributed.is_main():
    print(text, flush=True)


def epoch_line(row: dict, num_epochs: int, num_samples: int, trained: int | None = None
               ) -> str:
  """One line per epoch, in the seed notebook's spirit: the epoch's seconds (training and
  validation), then, as Keras' time per step, the training's alone per sample (the row's
  samples_per_second). `trained`: the samples of the epoch's `num_samples` that this process
  trained (default all; fewer after a mid-epoch resume), which that rate counts."""
  us_per_sample = 1e6 / row['samples_per_second']
  return (f"Epoch {row['epoch']}/{num_epochs} - {samples(num_samples, trained)} - "
          f"{row['seconds']:.1f}s {us_per_sample:.0f}us/sample - loss: {row['loss']:.4f} - "
          f"accuracy: {row['accuracy']:.4f} - val_loss: {row['val_loss']:.4f} - "
          f"val_accuracy: {row['val_accuracy']:.4f}")


def samples(num_samples: int, trained: int | None = None) -> str:
  """'N samples', and after a mid-epoch resume how many of them were trained since."""
  part = '' if trained in (None, num_samples) else f' ({trained} since resuming)'
  return f'{num_samples} samples{part}'


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
