"""What a run of several lanes reports: per-lane rows, their summary over lanes, the console's
epoch line and final table, and WORKDIR/summary.jsonl beside each lane's own files in
WORKDIR/models/<lane>/ (metrics.jsonl, keras_cnn.h5, plots, TensorBoard)."""

import json
import pathlib

import numpy as np

from flax_mnist import lanes as lanes_lib
from flax_mnist.reporting import console, jsonl

SUMMARY_FILE = 'summary.jsonl'
STAT_KEYS = ('loss', 'accuracy', 'val_loss', 'val_accuracy')
STATS = ('mean', 'std', 'min', 'max')


def lane_dir(workdir, lane: int) -> pathlib.Path:
  """WORKDIR/models/<lane>: the lane's metrics.jsonl, keras_cnn.h5, plots and TensorBoard."""
  return pathlib.Path(workdir) / lanes_lib.MODELS_DIR / str(lane)


def model_dir(workdir, lanes: int, lane: int | None) -> pathlib.Path:
  """Where a model's files go: WORKDIR for a single model, lane_dir for one of several."""
  return pathlib.Path(workdir) if lanes == 1 else lane_dir(workdir, lane)


def epoch_row(epoch: int, train, evaluation, seconds: float, lane_samples_per_second: float
              ) -> dict:
  """An epoch's summary row with its per-lane rows under 'lanes'. `train` holds per-lane
  MetricSums, `evaluation` (per-lane MetricSums, the ensemble's MetricSums). Stds are over
  lanes with one degree of freedom (the spread of seeds), 0 for a single lane."""
  losses, accuracies = train.lane_means()
  val_losses, val_accuracies = evaluation[0].lane_means()
  ensemble_loss, ensemble_accuracy = evaluation[1].means()
  lanes = [dict(epoch=epoch, loss=float(l), accuracy=float(a), val_loss=float(vl),
                val_accuracy=float(va), seconds=seconds,
                samples_per_second=lane_samples_per_second)
           for l, a, vl, va in zip(losses, accuracies, val_losses, val_accuracies)]
  row = dict(epoch=epoch, models=len(lanes))
  for key in STAT_KEYS:
    values = np.array([lane[key] for lane in lanes])
    row.update({f'{key}_mean': float(values.mean()),
                f'{key}_std': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                f'{key}_min': float(values.min()), f'{key}_max': float(values.max())})
  row.update(ensemble_val_loss=ensemble_loss, ensemble_val_accuracy=ensemble_accuracy,
             seconds=seconds, samples_per_second=lane_samples_per_second * len(lanes),
             lanes=lanes)
  return row


def epoch_line(row: dict, num_epochs: int, num_samples: int, trained: int | None = None
               ) -> str:
  """One console line per epoch: mean +- std over lanes, and the ensemble's accuracy; after a
  mid-epoch resume, how many of the epoch's `num_samples` samples per lane were `trained`
  since (the seconds are theirs), as console.epoch_line says it."""
  stats = ' - '.join(f"{k}: {row[f'{k}_mean']:.4f} +- {row[f'{k}_std']:.4f}" for k in STAT_KEYS)
  return (f"Epoch {row['epoch']}/{num_epochs} - {row['models']} models of "
          f"{console.samples(num_samples, trained)} - {row['seconds']:.1f}s - {stats} - "
          f"ensemble val_accuracy: {row['ensemble_val_accuracy']:.4f}")


def final_table(config, history: list[dict]) -> str:
  """Per lane: its seed and swept values, final and best val_accuracy; then the ensemble."""
  last = history[-1]
  lines = [f'{"lane":>4}  {"model":<36}{"val_accuracy":>13}{"best (epoch)":>15}'
           f'{"val_loss":>10}']
  for lane in lanes_lib.lanes(config):
    rows = [h['lanes'][lane.index] for h in history]
    best = max(rows, key=lambda r: r['val_accuracy'])
    final = rows[-1]
    lines.append(f"{lane.index:>4}  {lane.label():<36}{final['val_accuracy']:>13.4f}"
                 f"{best['val_accuracy']:>9.4f} ({best['epoch']:>2}){final['val_loss']:>10.4f}")
  lines.append(f"Ensemble of {last['models']}: val_accuracy "
               f"{last['ensemble_val_accuracy']:.4f}, val_loss {last['ensemble_val_loss']:.4f} "
               f"(lanes: {last['val_accuracy_mean']:.4f} +- {last['val_accuracy_std']:.4f})")
  return '\n'.join(lines)


def summary_line(row: dict) -> str:
  return json.dumps({k: v for k, v in row.items() if k != 'lanes'}) + '\n'


def rewrite(workdir, history: list[dict], lanes: int) -> None:
  """summary.jsonl and every lane's metrics.jsonl, from a checkpoint's history."""
  workdir = pathlib.Path(workdir)
  jsonl.rewrite(workdir / SUMMARY_FILE, history, summary_line)
  for lane in range(lanes):
    if history:
      lane_dir(workdir, lane).mkdir(parents=True, exist_ok=True)
    jsonl.rewrite(lane_dir(workdir, lane) / jsonl.METRICS_FILE,
                  [row['lanes'][lane] for row in history])


def append(workdir, row: dict) -> None:
  """An epoch's summary row and each lane's row, flushed."""
  with open(pathlib.Path(workdir) / SUMMARY_FILE, 'a') as f:
    f.write(summary_line(row))
  for lane, lane_row in enumerate(row['lanes']):
    lane_dir(workdir, lane).mkdir(parents=True, exist_ok=True)
    jsonl.append(lane_dir(workdir, lane) / jsonl.METRICS_FILE, lane_row)
