"""TensorBoard event files in WORKDIR/tensorboard: every epoch's metrics and the training loss
every config.log_every_steps steps, all keyed by the global train step.

Only process 0 writes. Events are written synchronously (tensorboardX's event writer, no
background queue) and flushed at the end of every epoch, before its checkpoint is saved, so a
checkpoint never exists without its events. The checkpoint is the truth: on start, events a
killed run wrote past the newest checkpoint are cut from the old files, and a restart marker
(TensorBoard's purge) hides them from a TensorBoard that had already loaded them.

Hand-written over tensorboardX's event writer rather than clu's metric writers: clu's
TensorBoard writer goes through TensorFlow's tf.summary (which the run path is to shed), and
neither library cuts events past a step, which exact resume needs.
"""

import os
import pathlib
import struct

import jax
import numpy as np

from flax_mnist import distributed

LOG_DIR = 'tensorboard'
EPOCH_TAGS = ('loss', 'accuracy', 'val_loss', 'val_accuracy', 'samples_per_second')
STEP_TAGS = ('loss', 'accuracy')
_EVENT_FILES = 'events.out.tfevents.*'


def epoch_tag(key: str) -> str:
  """The TensorBoard tag of a per-epoch metric (a metrics.jsonl key)."""
  return f'epoch/{key}'


def step_tag(key: str) -> str:
  """The TensorBoard tag of a per-N-steps training metric."""
  return f'steps/{key}'


class MetricWriter:
  """Scalars to WORKDIR/tensorboard, continuing after `start_step` (the restored step).

  On processes other than 0 (or with enabled=False) every method does nothing.
  """

  def __init__(self, workdir, start_step: int, log_every_steps: int,
               enabled: bool | None = None):
    self.enabled = distributed.is_main() if enabled is None else enabled
    self.log_every_steps = log_every_steps
    self.logdir = pathlib.Path(workdir) / LOG_DIR
    self.start_step = start_step
    self._events = None
    if self.enabled and self.logdir.exists():
      trim_events(self.logdir, start_step)

  def _opened(self):
    """The event file, created with its restart marker at the first write: a run stopped before
    it logs anything leaves no TensorBoard folder behind."""
    if self._events is None:
      from tensorboardX import event_file_writer
      from tensorboardX.proto import event_pb2
      self.logdir.mkdir(parents=True, exist_ok=True)
      self._events = event_file_writer.EventsWriter(
          str(self.logdir / 'events'), filename_suffix=f'.{os.getpid()}.{self.start_step}')
      self._events.write_event(event_pb2.Event(
          step=self.start_step + 1, session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))
    return self._events

  def write_scalars(self, step: int, scalars: dict) -> None:
    """Writes {tag: value} at global step `step`."""
    if not self.enabled:
      return
    from tensorboardX import summary
    from tensorboardX.proto import event_pb2, summary_pb2
    values = [summary.scalar(tag, float(value)).value[0] for tag, value in scalars.items()]
    self._opened().write_event(event_pb2.Event(step=int(step), summary=summary_pb2.Summary(
        value=values)))

  def write_epoch(self, step: int, row: dict) -> None:
    """Writes an epoch's metrics (a metrics.jsonl row) at `step` and flushes to disk."""
    self.write_scalars(step, {epoch_tag(k): row[k] for k in EPOCH_TAGS})
    self.flush()

  def step_log(self, first_step: int) -> 'StepLog':
    """A StepLog for an epoch whose first step is `first_step` + 1."""
    return StepLog(self, first_step)

  def flush(self) -> None:
    """Makes everything written so far durable."""
    if self.enabled and self._events is not None:
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    if self.enabled and self._events is not None:
      self._events.close()
      self._events = None
      self.enabled = False


class StepLog:
  """Writes one epoch's per-step training metrics at every log_every_steps-th global step.

  `index` counts the epoch's steps from 1; `metrics` are a step's summed metrics (loss_sum,
  correct, count), read from the device only for the steps that are logged.
  """

  def __init__(self, writer: MetricWriter, first_step: int):
    self.writer, self.first_step = writer, first_step

  def wants(self, index: int) -> bool:
    """Whether step `index` of the epoch is logged."""
    every = self.writer.log_every_steps
    return self.writer.enabled and every > 0 and (self.first_step + index) % every == 0

  def record(self, index: int, metrics) -> None:
    """Logs step `index`'s metrics if it is a logged step."""
    if self.wants(index):
      loss, accuracy = metrics.means()
      self.writer.write_scalars(self.first_step + index, {
          step_tag('loss'): loss, step_tag('accuracy'): accuracy})

  def record_all(self, per_step, start: int = 0) -> None:
    """Logs from metric sums stacked over steps start+1, start+2, ... of the epoch (a
    MetricSums of (steps,) arrays)."""
    for offset in range(len(np.asarray(per_step.count))):
      self.record(start + offset + 1, jax.tree.map(lambda v, i=offset: v[i], per_step))


class LaneWriters:
  """A MetricWriter per lane, in WORKDIR/models/<lane>/tensorboard, behind MetricWriter's
  interface: each lane gets its own row of an epoch's summary row and its own slice of
  per-lane step metrics (TensorBoard then overlays the lanes as runs)."""

  def __init__(self, lane_dirs: list, start_step: int, log_every_steps: int):
    self.writers = [MetricWriter(d, start_step, log_every_steps) for d in lane_dirs]

  def write_epoch(self, step: int, row: dict) -> None:
    for writer, lane_row in zip(self.writers, row['lanes']):
      writer.write_epoch(step, lane_row)

  def step_log(self, first_step: int) -> 'LaneStepLogs':
    return LaneStepLogs([w.step_log(first_step) for w in self.writers])

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


class LaneStepLogs:
  """StepLog's interface over per-lane metric sums ((lanes,) arrays; stacked (steps, lanes))."""

  def __init__(self, logs: list[StepLog]):
    self.logs = logs

  def record(self, index: int, metrics) -> None:
    if self.logs[0].wants(index):
      metrics = jax.device_get(metrics)
      for lane, log in enumerate(self.logs):
        log.record(index, jax.tree.map(lambda v, i=lane: v[i], metrics))

  def record_all(self, per_step, start: int = 0) -> None:
    for lane, log in enumerate(self.logs):
      log.record_all(jax.tree.map(lambda v, i=lane: v[:, i], per_step), start)


def _records(data: bytes):
  """(payload) of each complete TFRecord in `data`; stops at a torn tail."""
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack_from('<Q', data, offset)
    end = offset + 12 + length + 4
    if end > len(data):
      return
    yield data[offset + 12:offset + 12 + length]
    offset = end


def trim_events(logdir: pathlib.Path, last_step: int) -> None:
  """Cuts every event past `last_step` (and any torn record) from the event files in logdir."""
  from tensorboardX import record_writer
  from tensorboardX.proto import event_pb2
  for path in sorted(logdir.glob(_EVENT_FILES)):
    data = path.read_bytes()
    kept, total = [], 0
    for payload in _records(data):
      total += len(payload) + 16
      try:
        step = event_pb2.Event.FromString(payload).step
      except Exception:  # A damaged record: keep what came before it.
        break
      if step <= last_step:
        kept.append(payload)
    if total == len(data) and len(kept) * 16 + sum(map(len, kept)) == total:
      continue  # Nothing to cut.
    if len(kept) <= 1:  # At most the file-version header is left.
      path.unlink()
      continue
    temporary = logdir / 'trimming.tmp'  # Not an event file name, should a kill leave it.
    writer = record_writer.RecordWriter(str(temporary))
    for payload in kept:
      writer.write(payload)
    writer.close()
    os.replace(temporary, path)
