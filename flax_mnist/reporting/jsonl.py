"""WORKDIR/metrics.jsonl: one JSON object per epoch, with the documented keys in order."""

import json
import pathlib

METRICS_FILE = 'metrics.jsonl'
METRIC_KEYS = ('epoch', 'loss', 'accuracy', 'val_loss', 'val_accuracy', 'seconds',
               'samples_per_second')


def line(row: dict) -> str:
  """One epoch's metrics as a JSON line."""
  return json.dumps({k: row[k] for k in METRIC_KEYS}) + '\n'


def append(path: pathlib.Path, row: dict) -> None:
  """Appends one epoch's metrics (flushed, so a kill loses nothing written)."""
  with open(path, 'a') as f:
    f.write(line(row))
    f.flush()


def rewrite(path: pathlib.Path, history: list[dict], render=line) -> None:
  """Writes `history` (a checkpoint's) as the whole file, a `render`ed line per row: the
  checkpoint is the truth, so rows of epochs that a kill left without a checkpoint are dropped.
  No history, no file: a run stopped before its first epoch leaves none behind."""
  if history:
    path.write_text(''.join(map(render, history)))
  else:
    path.unlink(missing_ok=True)


def read(path: pathlib.Path) -> list[dict]:
  """The rows of a metrics.jsonl (an empty list when it does not exist)."""
  if not path.exists():
    return []
  return [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
