"""The training loop: config -> plan -> data -> state -> epochs -> metrics and checkpoints.

Every epoch ends with a validation pass, a Keras-style line, a row in metrics.jsonl and an
orbax checkpoint. Running the same command again resumes from the newest checkpoint, exactly:
data order depends only on (seed, epoch) and dropout keys only on (seed, step).
"""

import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_mnist import checkpoints as checkpoints_lib
from flax_mnist import distributed, epochs, interrupt, model as model_lib, run_lock, sharding
from flax_mnist import lanes as lanes_lib
from flax_mnist import plan as plan_lib
from flax_mnist import steps as steps_lib
from flax_mnist.data import batches, tfds_source
from flax_mnist.errors import FlaxMnistError
from flax_mnist.keras import export as keras_export
from flax_mnist.reporting import console, outputs, report
from flax_mnist.reporting.console import say


def nnx_model(graphdef, state) -> model_lib.CNN:
  """The NNX module holding `state`'s parameters (for summaries, export and prediction)."""
  return nnx.merge(graphdef, state.params)


def compile_eval(graphdef, state, mesh, plan):
  """The eval step, compiled ahead of time for the plan's (padded) eval batch."""
  return steps_lib.jit_eval_step(graphdef, mesh, plan).lower(state.params, *epochs.batch_specs(
      mesh, plan.eval_batch, np.uint8, np.int32, np.float32)).compile()


def evaluate(evaluate_step, params, mesh, split, batch_size, padded_size):
  """The eval step's metric sums over every example of `split`, `batch_size` at a time in
  batches padded to `padded_size` rows (padding masked out): MetricSums for one model, (per-lane
  MetricSums, the ensemble's) for lanes."""
  total = None
  rows = sharding.process_rows(mesh, padded_size)
  for images, labels, mask in batches.eval_batches(split, batch_size, rows, padded_size):
    sums = evaluate_step(params, *sharding.put_batch(mesh, images, labels, mask))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return total


@dataclasses.dataclass
class Start:
  """Where training starts: a fresh or restored state, its epoch and metrics so far, and where
  an epoch that a stop cut short stopped (None after a whole epoch)."""
  state: steps_lib.TrainState
  epoch: int = 0
  history: list[dict] = dataclasses.field(default_factory=list)
  resume: epochs.Resume | None = None


def train_and_evaluate(config, workdir: str, plan: plan_lib.Plan | None = None) -> list[dict]:
  """Trains (or resumes) config's model, validating after every epoch; returns the metrics.

  `plan` defaults to plan.decide(config) (main passes the one it printed)."""
  plan = plan or plan_lib.decide(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with (run_lock.held(workdir),
        checkpoints_lib.open_checkpoints(workdir, config.keep_checkpoints) as checkpoints,
        interrupt.catch_stop_signals()):
    run = _Run(config, plan, workdir, checkpoints)
    start = run.start()
    if distributed.is_main():
      run.outputs.rewrite(start.history)  # As the checkpoint has them.
    if start.epoch >= config.num_epochs:
      where = (f'epoch {start.epoch}/{config.num_epochs}' if start.epoch == config.num_epochs
               else f'epoch {start.epoch}, past num_epochs={config.num_epochs}')
      say(f'Already finished: {where} in {workdir}; nothing to do (raise --config.num_epochs to '
          'train on).')
      return start.history
    return run.epochs(start)


class TrainingDiverged(FlaxMnistError):
  """The loss became NaN or infinite."""


class _Run:
  """One training run's fixed parts; `start` finds where it starts, `epochs` trains to the end."""

  def __init__(self, config, plan, workdir, checkpoints):
    self.config, self.plan, self.workdir, self.checkpoints = config, plan, workdir, checkpoints
    self.mesh = sharding.make_mesh()
    self.latest = checkpoints.latest_step()
    self.tx = steps_lib.make_optimizer(config)
    self.outputs = outputs.for_plan(config, plan, workdir)
    replicated = sharding.replicated(self.mesh)
    if self.latest is None:  # A fresh state; else the shapes that a checkpoint fills.
      self.graphdef, fresh, _ = steps_lib.create(config, plan, config.init_from)
      self.state = jax.device_put(fresh, replicated)
    else:
      self.graphdef, self.state = steps_lib.abstract(config, plan, replicated)

  def start(self) -> Start:
    """From the newest readable checkpoint when there is one, else fresh (Keras initializers,
    or config.init_from's weights)."""
    if self.latest is None:
      if self.config.init_from:
        say(f'Starting from the weights in {self.config.init_from}')
      return Start(self.state)
    state, meta = self.checkpoints.restore_newest_readable(self.state, self.config.to_dict())
    resume = epochs.Resume.from_meta(meta.get('partial'))
    if resume is None:  # Else said by `epochs`, which knows the epoch's length.
      say(f"Resumed from epoch {meta['epoch']}, step {int(state.step)} "
          f'({self.checkpoints.directory})')
    self.say_if_validated_elsewhere(meta)
    return Start(state, meta['epoch'], meta['history'], resume)

  def say_if_validated_elsewhere(self, meta: dict) -> None:
    """eval_split may change between runs (it shapes no state), but the metrics of the epochs
    before and after then compare different sets: the run says so once."""
    before, now = meta['config'].get('eval_split', self.config.eval_split), self.config.eval_split
    if before != now and meta['epoch'] < self.config.num_epochs and meta['epoch'] > 0:
      say(f"Note: validating on {now} from epoch {meta['epoch'] + 1} on; epochs up to "
          f"{meta['epoch']} were validated on {before}, so their val_ metrics (and "
          '--step=best) compare different sets.')

  def meta(self, epoch: int, history: list[dict], **extra) -> dict:
    return dict(epoch=epoch, config=self.config.to_dict(), plan=self.plan.to_dict(),
                history=history, **extra)

  def epochs(self, start: Start) -> list[dict]:
    config, mesh = self.config, self.mesh
    state, history, resume = start.state, start.history, start.resume
    with distributed.main_process_first('load_data'):  # Process 0 prepares a shared data_dir.
      train_split = tfds_source.load_split(config, config.train_split)
      eval_split = tfds_source.load_split(config, config.eval_split)
    if not history:
      one = next(self.outputs.models(state, history))[0]
      say(model_lib.summary(config, nnx_model(self.graphdef, one)))
      self.outputs.introduce()
    began = time.perf_counter()
    evaluate_step = compile_eval(self.graphdef, state, mesh, self.plan)
    engine = epochs.build(self.graphdef, self.tx, state, mesh, self.plan, config, train_split,
                          resume)
    steps = batches.steps_per_epoch(len(train_split), config.batch_size)
    num_samples = steps * config.batch_size
    if resume:
      say(f'{resume.line(int(state.step), steps)} ({self.checkpoints.directory})')
    say(f'Compiled in {time.perf_counter() - began:.1f}s. Train {self.outputs.trained}on '
        f'{num_samples} samples, validate on {len(eval_split)} samples')
    writer = self.outputs.writer(int(state.step))
    stop_rule = interrupt.stop_rule(mesh, self.plan.processes)
    for epoch in range(start.epoch + 1, config.num_epochs + 1):
      if stop_rule.between_epochs():  # The last epoch's checkpoint is saved.
        self.stop(state, history)
      began = time.perf_counter()
      first_step = int(state.step) - (resume.batches if resume else 0)
      trained = epochs.samples_to_train(steps, config.batch_size, resume)
      progress = epochs.Progress(
          console.ProgressBar(steps, enabled=config.progress_bar and distributed.is_main()),
          writer.step_log(first_step), stop_rule)
      try:
        state, sums = engine.run(state, epoch, progress, resume)
      except interrupt.StoppedMidEpoch as stop:
        writer.flush()  # The steps logged so far, up to the checkpoint that `stop` saves.
        self.stop(stop.state, history, stop)
      resume = None
      # JAX dispatches asynchronously: without a progress bar or step logging nothing has waited
      # for the steps yet, and the timings would measure their queueing, not their work.
      jax.block_until_ready((state, sums))
      train_seconds = time.perf_counter() - began
      evaluation = jax.block_until_ready(evaluate(evaluate_step, state.params, mesh, eval_split,
                                                  config.eval_batch_size, self.plan.eval_batch))
      row = self.outputs.row(epoch, sums, evaluation, time.perf_counter() - began,
                             train_seconds, trained)
      history = self.record(state, history, row, writer, num_samples, trained)
    writer.close()
    self.finish(state, eval_split, history)
    return history

  def record(self, state, history, row, writer, num_samples, trained) -> list[dict]:
    """Keeps a finished epoch: TensorBoard, then its checkpoint, then the console line and the
    metrics files (the checkpoint is the truth they are rewritten from on resume). Returns
    the history with `row`. `trained`: the samples of the epoch's `num_samples` that this
    process trained (fewer after a mid-epoch resume)."""
    self.check_finite(row)
    history = history + [row]
    writer.write_epoch(int(state.step), row)  # Flushed before the checkpoint that keeps it.
    self.checkpoints.save(int(state.step), state, self.meta(row['epoch'], history),
                          row.get('val_accuracy_mean', row.get('val_accuracy')))
    self.outputs.show(row, num_samples, trained)
    return history

  def finish(self, state, eval_split, history) -> None:
    """The seed's keras_cnn.h5 and the report's plots (each lane's in its folder)."""
    models = zip(self.outputs.models(state, history), lanes_lib.model_configs(self.config))
    for (model_state, model_history, folder), model_config in models:
      if distributed.is_main():
        path = keras_export.export_h5(nnx_model(self.graphdef, model_state), model_config,
                                      folder / keras_export.EXPORT_NAME)
        say(f'Saved the Keras model to {path}')
      report.write_report(self.graphdef, model_state.params, self.mesh, self.config,
                          eval_split, model_history, folder)
    self.outputs.close(history)

  def check_finite(self, row: dict) -> None:
    lanes = row.get('lanes', [row])
    bad = [i for i, r in enumerate(lanes)
           if not all(math.isfinite(r[k]) for k in ('loss', 'val_loss'))]
    if not bad:
      return
    first = lanes[bad[0]]
    which = f" (lane {', '.join(map(str, bad))})" if 'lanes' in row else ''
    kept = self.checkpoints.latest_step()
    raise TrainingDiverged(
        f"training diverged in epoch {row['epoch']}{which} (loss {first['loss']}, val_loss "
        f"{first['val_loss']}); nothing was saved for it, "
        + (f'the newest checkpoint (step {kept}) is intact' if kept
           else 'no checkpoint exists yet') + '. Lower --config.learning_rate.')

  def stop(self, state, history, stop: interrupt.StoppedMidEpoch | None = None):
    """On a stop signal: saves the state of an epoch cut short (`stop`), raises Interrupted."""
    step = int(state.step)
    if stop is not None and step and step not in self.checkpoints.steps():
      sums = None if stop.sums is None else stop.sums.to_json()
      partial = dict(epoch=stop.epoch, batches=stop.batches, sums=sums)
      self.checkpoints.save(step, state, self.meta(stop.epoch - 1, history, partial=partial),
                            None)
    if not step:
      raise interrupt.Interrupted('interrupted before the first step; nothing to save. Run the '
                                  'same command again to start.')
    where = f' (epoch {stop.epoch}, batch {stop.batches})' if stop and stop.batches else ''
    raise interrupt.Interrupted(
        f'interrupted at step {step}{where}; its checkpoint is in '
        f'{self.checkpoints.directory}. Run the same command again to resume exactly where it '
        'stopped.')
