"""The training loop: config -> data -> state -> steps -> metrics (Keras-style output)."""

import pathlib
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from flax_mnist import input_pipeline, model as model_lib, parallel, reporting
from flax_mnist import train_step as ts


def _say(text: str) -> None:
  print(text, flush=True)


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

  One step stays in flight: after dispatching step i the host waits for step i-1's metrics, so
  the device never idles and the progress bar shows real progress, with no per-step stall.
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


def _compile(train, evaluate_step, state, mesh, config):
  """Compiles both steps ahead of time, so epoch timings exclude compilation."""
  start = time.perf_counter()
  shape = (config.batch_size, *input_pipeline.IMAGE_SHAPE)
  images = jax.ShapeDtypeStruct(shape, np.uint8, sharding=parallel.batch_sharded(mesh))
  labels = jax.ShapeDtypeStruct(shape[:1], np.int32, sharding=parallel.batch_sharded(mesh))
  train = train.lower(state, images, labels).compile()
  eval_shape = (config.eval_batch_size, *input_pipeline.IMAGE_SHAPE)
  data = parallel.batch_sharded(mesh)
  evaluate_step = evaluate_step.lower(
      state.params, jax.ShapeDtypeStruct(eval_shape, np.uint8, sharding=data),
      jax.ShapeDtypeStruct(eval_shape[:1], np.int32, sharding=data),
      jax.ShapeDtypeStruct(eval_shape[:1], np.float32, sharding=data)).compile()
  return train, evaluate_step, time.perf_counter() - start


def train_and_evaluate(config, workdir: str) -> list[dict]:
  """Trains config's model, validating after every epoch; returns the per-epoch metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train_split = input_pipeline.load_split(config, config.train_split)
  eval_split = input_pipeline.load_split(config, config.eval_split)
  mesh = parallel.make_mesh()
  graphdef, state, tx = ts.create(config)
  _say(model_lib.summary(config, nnx_model(graphdef, state)))
  state = jax.device_put(state, parallel.replicated(mesh))
  train, evaluate_step = ts.jit_steps(graphdef, tx, mesh)
  train, evaluate_step, seconds = _compile(train, evaluate_step, state, mesh, config)
  steps = input_pipeline.steps_per_epoch(len(train_split), config.batch_size)
  num_samples = steps * config.batch_size
  _say(f'Compiled in {seconds:.1f}s on {jax.device_count()} {jax.default_backend()} device(s). '
       f'Train on {num_samples} samples, validate on {len(eval_split)} samples')
  rows = []
  for epoch in range(1, config.num_epochs + 1):
    start = time.perf_counter()
    bar = reporting.ProgressBar(steps, enabled=config.progress_bar)
    state, (loss, accuracy) = train_epoch(train, state, mesh, train_split, config, epoch, bar)
    train_seconds = time.perf_counter() - start
    val_loss, val_accuracy = evaluate(evaluate_step, state.params, mesh, eval_split,
                                      config.eval_batch_size)
    row = dict(epoch=epoch, loss=loss, accuracy=accuracy, val_loss=val_loss,
               val_accuracy=val_accuracy, seconds=time.perf_counter() - start,
               samples_per_second=num_samples / train_seconds)
    _say(reporting.epoch_line(row, config.num_epochs, num_samples))
    reporting.append_metrics(workdir / 'metrics.jsonl', row)
    rows.append(row)
  logging.info('Finished %d epochs in %s', config.num_epochs, workdir)
  return rows


def nnx_model(graphdef, state):
  """The NNX module holding `state`'s parameters (for summaries, export and prediction)."""
  return nnx.merge(graphdef, state.params)
