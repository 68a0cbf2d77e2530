"""The training loop: config -> data -> state -> steps -> metrics and checkpoints.

Every epoch ends with a validation pass, a Keras-style line, a row in metrics.jsonl and an
orbax checkpoint. Running the same command again resumes from the newest checkpoint, exactly:
data order depends only on (seed, epoch) and dropout keys only on (seed, step).
"""

import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from flax_mnist import checkpointing, device_data, input_pipeline, keras_export
from flax_mnist import model as model_lib
from flax_mnist import parallel, reporting
from flax_mnist import train_step as ts
from flax_mnist.errors import FlaxMnistError

EXPORT_NAME = 'keras_cnn.h5'  # The seed's file name.


def say(text: str) -> None:
  """Prints a user-facing line at once (logs go to stderr; this is the run's story)."""
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
  for images, labels, mask in input_pipeline.eval_batches(split, batch_size):
    total = _sum_metrics(total, evaluate_step(params, *parallel.put_batch(mesh, images, labels,
                                                                           mask)))
  return _as_means(total)


def train_epoch(train, state, mesh, split, config, epoch, bar):
  """Runs one epoch of train steps; returns (state, (loss, accuracy)).

  One step stays in flight: after dispatching step i the host reads step i-1's metrics, so the
  device never idles and the progress bar shows real progress, with no per-step stall.
  """
  total, previous = None, None
  batches = input_pipeline.train_batches(split, config.batch_size, config.seed, epoch)
  for done, (images, labels) in enumerate(batches, start=1):
    state, metrics = train(state, *parallel.put_batch(mesh, images, labels))
    total = _sum_metrics(total, metrics)
    if previous is not None and bar.enabled:
      bar.update(done - 1, float(previous['loss_sum']) / float(previous['count']))
    previous = metrics
  bar.update(bar.total)
  bar.close()
  return state, _as_means(total)


def _batch_specs(mesh, size, *dtypes):
  data = parallel.batch_sharded(mesh)
  shapes = [(size, *input_pipeline.IMAGE_SHAPE)] + [(size,)] * (len(dtypes) - 1)
  return [jax.ShapeDtypeStruct(s, d, sharding=data) for s, d in zip(shapes, dtypes)]


def compile_epoch(graphdef, tx, state, mesh, config, train_split):
  """Compiles training ahead of time; returns run_epoch(state, epoch, bar).

  Host-fed: one jit step per batch. Device-resident (config.device_data): one scan per epoch.
  """
  if device_data.use_device_data(config):
    device_split = device_data.put_split(train_split, mesh)
    rows = device_data.epoch_rows(len(train_split), config.batch_size, config.seed, 1)
    epoch_fn = device_data.make_train_epoch(graphdef, tx, mesh, config).lower(
        state, *device_split, jax.ShapeDtypeStruct(rows.shape, rows.dtype)).compile()

    def run_epoch(state, epoch, bar):
      del bar  # Nothing to show: the epoch is a single device call.
      return device_data.train_epoch(epoch_fn, state, device_split, len(train_split), config,
                                     epoch)
  else:
    step, _ = ts.jit_steps(graphdef, tx, mesh, config)
    step = step.lower(state, *_batch_specs(mesh, config.batch_size, np.uint8,
                                           np.int32)).compile()

    def run_epoch(state, epoch, bar):
      return train_epoch(step, state, mesh, train_split, config, epoch, bar)
  return run_epoch


def compile_eval(graphdef, tx, state, mesh, config):
  """The eval step, compiled ahead of time for config.eval_batch_size."""
  _, evaluate_step = ts.jit_steps(graphdef, tx, mesh, config)
  return evaluate_step.lower(state.params, *_batch_specs(
      mesh, config.eval_batch_size, np.uint8, np.int32, np.float32)).compile()


def initial_state(config, mesh, checkpoints):
  """(graphdef, state, optimizer, epoch, history): from the newest checkpoint when there is one,
  else fresh (Keras initializers, or config.init_from's weights)."""
  latest = checkpoints.latest_step()
  graphdef, state, tx = ts.create(config, keras_weights='' if latest else config.init_from)
  state = jax.device_put(state, parallel.replicated(mesh))
  if latest is None:
    if config.init_from:
      say(f'Starting from the weights in {config.init_from}')
    return graphdef, state, tx, 0, []
  state, meta = checkpoints.restore(latest, state, config.to_dict())
  say(f"Resumed from epoch {meta['epoch']}, step {int(state.step)} "
      f'({checkpoints.directory})')
  return graphdef, state, tx, meta['epoch'], meta['history']


def _write_history(path: pathlib.Path, history: list[dict]) -> None:
  # The checkpoint is the truth: drop rows of epochs that a kill left without a checkpoint.
  path.write_text(''.join(reporting.metrics_line(row) for row in history))


def train_and_evaluate(config, workdir: str) -> list[dict]:
  """Trains (or resumes) config's model, validating after every epoch; returns the metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh()
  with checkpointing.open_checkpoints(workdir, config.keep_checkpoints) as checkpoints:
    graphdef, state, tx, epoch, history = initial_state(config, mesh, checkpoints)
    _write_history(workdir / 'metrics.jsonl', history)
    if epoch >= config.num_epochs:
      say(f'Already finished: epoch {epoch}/{config.num_epochs} in {workdir}; nothing to do '
          '(raise --config.num_epochs to train on).')
      return history
    history = _train_epochs(config, workdir, mesh, checkpoints, graphdef, state, tx, epoch,
                            history)
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


def _train_epochs(config, workdir, mesh, checkpoints, graphdef, state, tx, epoch, history):
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
  for epoch in range(epoch + 1, config.num_epochs + 1):
    start = time.perf_counter()
    bar = reporting.ProgressBar(steps, enabled=config.progress_bar)
    state, (loss, accuracy) = run_epoch(state, epoch, bar)
    train_seconds = time.perf_counter() - start
    val_loss, val_accuracy = evaluate(evaluate_step, state.params, mesh, eval_split,
                                      config.eval_batch_size)
    row = dict(epoch=epoch, loss=loss, accuracy=accuracy, val_loss=val_loss,
               val_accuracy=val_accuracy, seconds=time.perf_counter() - start,
               samples_per_second=num_samples / train_seconds)
    _check_finite(row, checkpoints)
    history = history + [row]
    checkpoints.save(int(state.step), state, dict(epoch=epoch, config=config.to_dict(),
                                                  history=history), val_accuracy)
    say(reporting.epoch_line(row, config.num_epochs, num_samples))
    reporting.append_metrics(workdir / 'metrics.jsonl', row)
  path = keras_export.export_h5(nnx_model(graphdef, state), config, workdir / EXPORT_NAME)
  say(f'Saved the Keras model to {path}')
  return history
