"""The training loop: config -> data -> state -> steps -> metrics and checkpoints.

Every epoch ends with a validation pass, a Keras-style line, a row in metrics.jsonl and an
orbax checkpoint. Running the same command again resumes from the newest checkpoint, exactly:
data order depends only on (seed, epoch) and dropout keys only on (seed, step).
"""

import itertools
import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from flax_mnist import checkpointing, device_data, distributed, input_pipeline, interrupt
from flax_mnist import keras_export
from flax_mnist import metric_writers
from flax_mnist import model as model_lib
from flax_mnist import parallel, report, reporting
from flax_mnist import train_step as ts
from flax_mnist.errors import FlaxMnistError

EXPORT_NAME = 'keras_cnn.h5'  # The seed's file name.


def say(text: str) -> None:
  """Prints a user-facing line at once (logs go to stderr; this is the run's story); only
  process 0 of a multi-process run prints."""
  if distributed.is_main():
    print(text, flush=True)


def nnx_model(graphdef, state) -> model_lib.CNN:
  """The NNX module holding `state`'s parameters (for summaries, export and prediction)."""
  return nnx.merge(graphdef, state.params)


def _sum_metrics(total, metrics):
  return metrics if total is None else jax.tree.map(lambda a, b: a + b, total, metrics)


def _as_means(sums) -> tuple[float, float]:
  sums = jax.device_get(sums)
  count = float(sums['count'])
  return float(sums['loss_sum']) / count, float(sums['correct']) / count


def evaluate(evaluate_step, params, mesh, split, batch_size) -> tuple[float, float]:
  """(loss, accuracy) over every example of `split`, padded batches masked out."""
  total = None
  rows = parallel.process_rows(mesh, batch_size)
  for images, labels, mask in input_pipeline.eval_batches(split, batch_size, rows):
    total = _sum_metrics(total, evaluate_step(params, *parallel.put_batch(mesh, images, labels,
                                                                           mask)))
  return _as_means(total)


def train_epoch(train, state, mesh, split, config, epoch, bar, step_log=None, resume=None):
  """Runs one epoch of train steps; returns (state, (loss, accuracy)).

  One step stays in flight: after dispatching step i the host reads step i-1's metrics, so the
  device never idles and the progress bar (and `step_log`, a metric_writers.StepLog) shows real
  progress, with no per-step stall. `resume` (a checkpoint's 'partial' record) skips the batches
  an interrupted run already took. On Ctrl-C, raises interrupt.StoppedMidEpoch before a step.
  """
  first, total = (0, None) if resume is None else (resume['batches'], _stored_sums(resume))
  previous = None
  batches = input_pipeline.train_batches(split, config.batch_size, config.seed, epoch,
                                         parallel.process_rows(mesh, config.batch_size))
  for done, (images, labels) in enumerate(itertools.islice(batches, first, None),
                                          start=first + 1):
    if interrupt.requested():
      raise interrupt.StoppedMidEpoch(state, epoch, done - 1, total)
    state, metrics = train(state, *parallel.put_batch(mesh, images, labels))
    total = _sum_metrics(total, metrics)
    if previous is not None and bar.enabled:
      bar.update(done - 1, float(previous['loss_sum']) / float(previous['count']))
    if previous is not None and step_log is not None:
      step_log.record(done - 1, previous)
    previous = metrics
  if step_log is not None and previous is not None:
    step_log.record(done, previous)
  bar.update(bar.total)
  bar.close()
  return state, _as_means(total)


def _stored_sums(resume):
  # float32 values round-trip exactly through JSON, so the epoch's sums continue bit for bit.
  sums = resume['sums']
  return None if sums is None else {k: np.float32(v) for k, v in sums.items()}


def _batch_specs(mesh, size, *dtypes):
  data = parallel.batch_sharded(mesh)
  shapes = [(size, *input_pipeline.IMAGE_SHAPE)] + [(size,)] * (len(dtypes) - 1)
  return [jax.ShapeDtypeStruct(s, d, sharding=data) for s, d in zip(shapes, dtypes)]


def compile_epoch(graphdef, tx, state, mesh, config, train_split):
  """Compiles training ahead of time; returns run_epoch(state, epoch, bar, step_log).

  Host-fed: one jit step per batch. Device-resident (config.device_data): one scan per epoch.
  """
  if device_data.use_device_data(config):
    device_split = device_data.put_split(train_split, mesh)
    rows = device_data.epoch_rows(len(train_split), config.batch_size, config.seed, 1)
    epoch_fn = device_data.make_train_epoch(graphdef, tx, mesh, config).lower(
        state, *device_split, jax.ShapeDtypeStruct(rows.shape, rows.dtype)).compile()

    def run_epoch(state, epoch, bar, step_log=None, resume=None):
      if resume is not None:  # An epoch cut short by Ctrl-C on the host-fed path ends there.
        host_step = ts.jit_steps(graphdef, tx, mesh, config)[0]
        return train_epoch(host_step, state, mesh, train_split, config, epoch, bar, step_log,
                           resume)
      del bar  # Nothing to show: the epoch is a single device call.
      return device_data.train_epoch(epoch_fn, state, device_split, len(train_split), config,
                                     epoch, step_log)
  else:
    step, _ = ts.jit_steps(graphdef, tx, mesh, config)
    step = step.lower(state, *_batch_specs(mesh, config.batch_size, np.uint8,
                                           np.int32)).compile()

    def run_epoch(state, epoch, bar, step_log=None, resume=None):
      return train_epoch(step, state, mesh, train_split, config, epoch, bar, step_log, resume)
  return run_epoch


def compile_eval(graphdef, tx, state, mesh, config):
  """The eval step, compiled ahead of time for config.eval_batch_size."""
  _, evaluate_step = ts.jit_steps(graphdef, tx, mesh, config)
  return evaluate_step.lower(state.params, *_batch_specs(
      mesh, config.eval_batch_size, np.uint8, np.int32, np.float32)).compile()


def initial_state(config, mesh, checkpoints):
  """(graphdef, state, optimizer, epoch, history, partial): from the newest readable checkpoint
  when there is one, else fresh (Keras initializers, or config.init_from's weights). `partial`
  records the batches of an epoch that Ctrl-C cut short (None after a whole epoch)."""
  latest = checkpoints.latest_step()
  graphdef, state, tx = ts.create(config, keras_weights='' if latest else config.init_from)
  state = jax.device_put(state, parallel.replicated(mesh))
  if latest is None:
    if config.init_from:
      say(f'Starting from the weights in {config.init_from}')
    return graphdef, state, tx, 0, [], None
  state, meta = checkpoints.restore_newest_readable(state, config.to_dict())
  partial = meta.get('partial')
  within = f" and {partial['batches']} batches of epoch {partial['epoch']}" if partial else ''
  say(f"Resumed from epoch {meta['epoch']}, step {int(state.step)}{within} "
      f'({checkpoints.directory})')
  return graphdef, state, tx, meta['epoch'], meta['history'], partial


def _write_history(path: pathlib.Path, history: list[dict]) -> None:
  # The checkpoint is the truth: drop rows of epochs that a kill left without a checkpoint.
  if distributed.is_main():
    path.write_text(''.join(reporting.metrics_line(row) for row in history))


def train_and_evaluate(config, workdir: str) -> list[dict]:
  """Trains (or resumes) config's model, validating after every epoch; returns the metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh()
  with (checkpointing.open_checkpoints(workdir, config.keep_checkpoints) as checkpoints,
        interrupt.catch_sigint()):
    graphdef, state, tx, epoch, history, partial = initial_state(config, mesh, checkpoints)
    _write_history(workdir / 'metrics.jsonl', history)
    if epoch >= config.num_epochs:
      say(f'Already finished: epoch {epoch}/{config.num_epochs} in {workdir}; nothing to do '
          '(raise --config.num_epochs to train on).')
      return history
    history = _train_epochs(config, workdir, mesh, checkpoints, graphdef, state, tx, epoch,
                            history, partial)
  return history


class TrainingDiverged(FlaxMnistError):
  """The loss became NaN or infinite."""


def _check_finite(row: dict, checkpoints) -> None:
  if all(math.isfinite(row[k]) for k in ('loss', 'val_loss')):
    return
  kept = checkpoints.latest_step()
  raise TrainingDiverged(
      f"training diverged in epoch {row['epoch']} (loss {row['loss']}, val_loss "
      f"{row['val_loss']}); nothing was saved for it, "
      + (f'the newest checkpoint (step {kept}) is intact' if kept else 'no checkpoint exists yet')
      + '. Lower --config.learning_rate.')


def _stop(checkpoints, config, state, history, stop=None):
  """On Ctrl-C: saves the state of an epoch cut short (`stop`), then raises Interrupted."""
  step = int(state.step)
  if stop is not None and step and step not in checkpoints.steps():
    sums = None if stop.sums is None else {k: float(v) for k, v in
                                           jax.device_get(stop.sums).items()}
    partial = dict(epoch=stop.epoch, batches=stop.batches, sums=sums)
    checkpoints.save(step, state, dict(epoch=stop.epoch - 1, config=config.to_dict(),
                                       history=history, partial=partial), None)
  if not step:
    raise interrupt.Interrupted('interrupted before the first step; nothing to save. Run the '
                                'same command again to start.')
  where = f' (epoch {stop.epoch}, batch {stop.batches})' if stop and stop.batches else ''
  raise interrupt.Interrupted(
      f'interrupted at step {step}{where}; its checkpoint is in {checkpoints.directory}. Run '
      'the same command again to resume exactly where it stopped.')


def _train_epochs(config, workdir, mesh, checkpoints, graphdef, state, tx, epoch, history,
                  partial=None):
  with distributed.main_process_first('load_data'):  # Process 0 prepares a shared data_dir.
    train_split = input_pipeline.load_split(config, config.train_split)
    eval_split = input_pipeline.load_split(config, config.eval_split)
  if not history:
    say(model_lib.summary(config, nnx_model(graphdef, state)))
  start = time.perf_counter()
  evaluate_step = compile_eval(graphdef, tx, state, mesh, config)
  run_epoch = compile_epoch(graphdef, tx, state, mesh, config, train_split)
  seconds = time.perf_counter() - start
  steps = input_pipeline.steps_per_epoch(len(train_split), config.batch_size)
  num_samples = steps * config.batch_size
  say(f'Compiled in {seconds:.1f}s on {jax.device_count()} {jax.default_backend()} device(s). '
      f'Train on {num_samples} samples, validate on {len(eval_split)} samples')
  writer = metric_writers.MetricWriter(workdir, int(state.step), config.log_every_steps)
  for epoch in range(epoch + 1, config.num_epochs + 1):
    if interrupt.requested():  # Between epochs: the last one's checkpoint is saved.
      _stop(checkpoints, config, state, history)
    start = time.perf_counter()
    bar = reporting.ProgressBar(steps, enabled=config.progress_bar and distributed.is_main())
    try:
      first_step = int(state.step) - (partial['batches'] if partial else 0)
      state, (loss, accuracy) = run_epoch(state, epoch, bar, writer.step_log(first_step),
                                          partial)
    except interrupt.StoppedMidEpoch as stop:
      writer.flush()  # The steps logged so far, up to the checkpoint that _stop saves.
      _stop(checkpoints, config, stop.state, history, stop)
    partial = None
    train_seconds = time.perf_counter() - start
    val_loss, val_accuracy = evaluate(evaluate_step, state.params, mesh, eval_split,
                                      config.eval_batch_size)
    row = dict(epoch=epoch, loss=loss, accuracy=accuracy, val_loss=val_loss,
               val_accuracy=val_accuracy, seconds=time.perf_counter() - start,
               samples_per_second=num_samples / train_seconds)
    _check_finite(row, checkpoints)
    history = history + [row]
    writer.write_epoch(int(state.step), row)  # Flushed before the checkpoint that keeps it.
    checkpoints.save(int(state.step), state, dict(epoch=epoch, config=config.to_dict(),
                                                  history=history), val_accuracy)
    say(reporting.epoch_line(row, config.num_epochs, num_samples))
    if distributed.is_main():
      reporting.append_metrics(workdir / 'metrics.jsonl', row)
  writer.close()
  if distributed.is_main():
    path = keras_export.export_h5(nnx_model(graphdef, state), config, workdir / EXPORT_NAME)
    say(f'Saved the Keras model to {path}')
  report.write_report(graphdef, state.params, mesh, config, eval_split, history, workdir,
                      say=say)
  return history
