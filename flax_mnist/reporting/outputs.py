"""What a training run writes, for one model or for several lanes, behind one interface.

The training loop (flax_mnist/loop.py) asks `for_plan` once and then never branches on the
number of lanes: one model writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard and a Keras-style
epoch line; several lanes write WORKDIR/summary.jsonl, each lane's files in
WORKDIR/models/<lane>/, a mean +- std epoch line and a per-lane table at the end.
"""

import pathlib

from flax_mnist import distributed
from flax_mnist import lanes as lanes_lib
from flax_mnist import steps as steps_lib
from flax_mnist.reporting import console, jsonl, summary, tensorboard
from flax_mnist.reporting.console import say


class ModelOutputs:
  """One model's metrics.jsonl, TensorBoard log and console lines, all in WORKDIR."""

  trained = ''  # What the start line says is trained ('Train on N samples').

  def __init__(self, config, workdir: pathlib.Path):
    self.config, self.workdir = config, workdir

  def introduce(self) -> None:
    """Anything to print after the model summary of a fresh run (nothing for one model)."""

  def rewrite(self, history: list[dict]) -> None:
    """The metrics file as the checkpoint's history has it (rows of a lost run dropped)."""
    jsonl.rewrite(self.workdir / jsonl.METRICS_FILE, history)

  def writer(self, start_step: int) -> tensorboard.MetricWriter:
    return tensorboard.MetricWriter(self.workdir, start_step, self.config.log_every_steps)

  def row(self, epoch, sums, evaluation, seconds, train_seconds, trained) -> dict:
    """The epoch's metrics.jsonl row. All timings are this process's part of the epoch (after a
    mid-epoch resume, the batches left): `seconds` its training and validation, and
    samples_per_second the `trained` samples over `train_seconds`, its training alone."""
    (loss, accuracy), (val_loss, val_accuracy) = sums.means(), evaluation.means()
    return dict(epoch=epoch, loss=loss, accuracy=accuracy, val_loss=val_loss,
                val_accuracy=val_accuracy, seconds=seconds,
                samples_per_second=trained / train_seconds)

  def show(self, row: dict, num_samples: int, trained: int | None = None) -> None:
    """The epoch's console line, and its row appended to the metrics file; `trained` as in
    console.epoch_line."""
    say(console.epoch_line(row, self.config.num_epochs, num_samples, trained))
    if distributed.is_main():
      jsonl.append(self.workdir / jsonl.METRICS_FILE, row)

  def models(self, state, history: list[dict]):
    """(state, history, folder) of each model whose .h5 and report the run ends with."""
    yield state, history, self.workdir

  def close(self, history: list[dict]) -> None:
    """What the run prints last (nothing for one model: the report has said it all)."""


class LaneOutputs(ModelOutputs):
  """Several lanes: WORKDIR/summary.jsonl and each lane's own files in WORKDIR/models/<lane>/."""

  def __init__(self, config, workdir: pathlib.Path, lanes: int):
    super().__init__(config, workdir)
    self.lanes = lanes
    self.trained = f'{lanes} models, each '

  def introduce(self) -> None:
    say(f'{self.lanes} lanes of this model: '
        + '; '.join(f'{lane.index}: {lane.label()}' for lane in lanes_lib.lanes(self.config)))

  def rewrite(self, history: list[dict]) -> None:
    summary.rewrite(self.workdir, history, self.lanes)

  def writer(self, start_step: int) -> tensorboard.LaneWriters:
    return tensorboard.LaneWriters([summary.lane_dir(self.workdir, i) for i in range(self.lanes)],
                                   start_step, self.config.log_every_steps)

  def row(self, epoch, sums, evaluation, seconds, train_seconds, trained) -> dict:
    """The summary row over lanes, holding each lane's own row under 'lanes'; timings as in
    ModelOutputs.row."""
    return summary.epoch_row(epoch, sums, evaluation, seconds, trained / train_seconds)

  def show(self, row: dict, num_samples: int, trained: int | None = None) -> None:
    say(summary.epoch_line(row, self.config.num_epochs, num_samples, trained))
    if distributed.is_main():
      summary.append(self.workdir, row)

  def models(self, state, history: list[dict]):
    for lane in range(self.lanes):
      yield (steps_lib.lane_state(state, lane), [row['lanes'][lane] for row in history],
             summary.lane_dir(self.workdir, lane))

  def close(self, history: list[dict]) -> None:
    say(summary.final_table(self.config, history))


def for_plan(config, plan, workdir: pathlib.Path) -> ModelOutputs:
  """The outputs of `plan`'s run: one model's, or its lanes'."""
  if plan.lanes > 1:
    return LaneOutputs(config, workdir, plan.lanes)
  return ModelOutputs(config, workdir)
