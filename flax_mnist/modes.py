"""The modes that use a trained model: eval, export, predict and report, each from a restored
checkpoint (or config.init_from's Keras weights when the workdir has none)."""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

from flax_mnist import checkpoints as checkpoints_lib
from flax_mnist import distributed, loop, run_lock, schema, sharding
from flax_mnist import lanes as lanes_lib
from flax_mnist import steps as steps_lib
from flax_mnist.data import checks
from flax_mnist.data import images as images_lib
from flax_mnist.data import tfds_source
from flax_mnist.errors import ConfigError
from flax_mnist.keras import export as keras_export
from flax_mnist.reporting import jsonl, report, summary
from flax_mnist.reporting.console import say


@dataclasses.dataclass
class Restored:
  """A model restored for a mode: its graph, state (of every lane, when the config has
  several), and the checkpoint's meta (None for init_from weights)."""
  graphdef: object
  state: steps_lib.TrainState
  meta: dict | None
  lanes: int = 1

  def describe(self, lane: int | None = None) -> str:
    which = '' if lane is None or self.lanes == 1 else f' lane {lane}'
    if self.meta is None:
      return f'the init_from weights{which}'
    if partial := self.meta.get('partial'):  # Saved by a stop, mid-epoch.
      return (f"step {int(self.state.step)} ({partial['batches']} batches into epoch "
              f"{partial['epoch']}, saved mid-epoch){which}")
    return f"step {int(self.state.step)} (epoch {self.meta['epoch']}){which}"

  def lane_state(self, lane: int | None) -> steps_lib.TrainState:
    """One lane's state (the whole state of a single-model config)."""
    return self.state if self.lanes == 1 else steps_lib.lane_state(self.state, lane or 0)

  def model(self, lane: int | None = None):
    return loop.nnx_model(self.graphdef, self.lane_state(lane))

  def selected(self, lane: int | None) -> list[int]:
    """The lanes a mode works on: `lane`, or every lane when None."""
    return list(range(self.lanes)) if lane is None else [lane]


def single(plan):
  """The plan for one lane of a lanes plan (a mode working on one model)."""
  return dataclasses.replace(plan, lanes=1, lanes_per_pass=1)


def check_lane(plan, mode: str, lane: int | None, output: str = '') -> None:
  """ConfigError unless --lane (None: not given) names a lane of the plan; before anything is
  read or written. (main refuses it for modes that take none.)"""
  if lane is None:
    if mode == 'export' and output and plan.lanes > 1:
      raise ConfigError(f'--output names one file but this config trains {plan.lanes} lanes; '
                        'pass --lane=N with it (without --output every lane is exported to '
                        'WORKDIR/models/<lane>/).')
    return
  if not 0 <= lane < plan.lanes:
    raise ConfigError(f'--lane={lane}: this config has {plan.lanes} lane'
                      + ('s' if plan.lanes > 1 else '') + f' (0 to {plan.lanes - 1}); pass one '
                      'of them, or no --lane for all.')


def restore(config, plan, workdir: str, step: str, lane: int | None = None) -> Restored:
  """Checkpoint `step` ('latest', 'best', N) of workdir, or, when the workdir has none,
  config.init_from's Keras weights. With `lane` (a lanes run's --lane), 'best' is that lane's
  best checkpoint; without, the best by the lanes' mean."""
  mesh = sharding.make_mesh()
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not checks.has_checkpoints(workdir):
    if not config.init_from:
      raise checkpoints_lib.CheckpointError(
          f'no checkpoint in {directory}; train first, or pass --config.init_from=FILE.h5.')
    graphdef, state, _ = steps_lib.create(config, plan, keras_weights=config.init_from)
    return Restored(graphdef, jax.device_put(state, sharding.replicated(mesh)), None,
                    plan.lanes)
  graphdef, state = steps_lib.abstract(config, plan, sharding.replicated(mesh))
  # Beside a training run, its save in progress is not a leftover to remove.
  with checkpoints_lib.open_checkpoints(workdir, config.keep_checkpoints,
                                        clean=not run_lock.busy(workdir)) as checkpoints:
    found = checkpoints.resolve_step(step, lane if plan.lanes > 1 else None)
    state, meta = checkpoints.restore(found, state, config.to_dict(), training=False)
  return Restored(graphdef, state, meta, plan.lanes)


def run_eval(config, plan, workdir: str, step: str, lane: int | None = None) -> dict:
  """Evaluates a checkpoint on config.eval_split; prints and appends to WORKDIR/eval.jsonl.
  With lanes: lane `lane`, or (None) every lane and their ensemble."""
  restored = restore(config, plan, workdir, step, lane)
  mesh = sharding.make_mesh()
  split = tfds_source.load_split(config, config.eval_split)
  one = restored.lanes == 1 or lane is not None
  state = restored.lane_state(lane) if one else restored.state
  eval_plan = single(plan) if one else plan
  evaluate_step = loop.compile_eval(restored.graphdef, state, mesh, eval_plan)
  sums = loop.evaluate(evaluate_step, state.params, mesh, split, config.eval_batch_size,
                       plan.eval_batch)
  meta = restored.meta
  # What was asked (--step=best, latest) beside what it resolved to; the weights' file if no
  # checkpoint was read.
  row = dict(step=int(restored.state.step), epoch=meta['epoch'] if meta else None,
             split=config.eval_split, requested=step)
  if meta is None:
    row['init_from'] = str(config.init_from)
  if meta and meta.get('partial'):  # `epoch` counts whole epochs; this one is under way.
    row['mid_epoch'] = dict(epoch=meta['partial']['epoch'], batches=meta['partial']['batches'])
  if one:
    row.update(zip(('val_loss', 'val_accuracy'), sums.means()))
    if restored.lanes > 1:
      row['lane'] = lane
  else:
    losses, accuracies = sums[0].lane_means()
    for i, (l, a) in enumerate(zip(losses, accuracies)):
      say(f'Lane {i}: val_loss: {l:.4f} - val_accuracy: {a:.4f}')
    row.update(zip(('val_loss', 'val_accuracy'), sums[1].means()), lanes=[
        dict(val_loss=float(l), val_accuracy=float(a)) for l, a in zip(losses, accuracies)])
  what = restored.describe(lane) if one else f'{restored.describe()}, ensemble of {plan.lanes}'
  say(f'Eval of {what} on {len(split)} {config.eval_split} samples - '
      f"val_loss: {row['val_loss']:.4f} - val_accuracy: {row['val_accuracy']:.4f}")
  if distributed.is_main():
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    with open(pathlib.Path(workdir) / 'eval.jsonl', 'a') as f:
      f.write(json.dumps(row) + '\n')
  return row


def run_export(config, plan, workdir: str, step: str, output: str,
               lane: int | None = None) -> list[pathlib.Path]:
  """Writes checkpoint `step` as a Keras file: .h5/.hdf5 (default WORKDIR/keras_cnn.h5, the
  seed's) or Keras 3's .keras, as `output`'s suffix says. With lanes: lane `lane`, or every
  lane, each to WORKDIR/models/<lane>/keras_cnn.h5. The name is checked before the checkpoint
  is restored, so that a typo fails at once."""
  if output:
    keras_export.check_name(output)
  restored = restore(config, plan, workdir, step, lane)
  if restored.meta is not None:  # The file records the checkpoint's training, not the flags'.
    config = schema.as_trained(config, restored.meta.get('config', {}))
  configs = lanes_lib.model_configs(config)
  paths = []
  for i in restored.selected(lane):
    folder = summary.model_dir(workdir, restored.lanes, i)
    path = pathlib.Path(output or folder / keras_export.EXPORT_NAME)
    replaced = ' (replacing the file there)' if path.exists() else ''
    if distributed.is_main():
      path.parent.mkdir(parents=True, exist_ok=True)
      keras_export.export(restored.model(i), configs[i], path)
    say(f'Exported {restored.describe(i)} to {path}{replaced}')
    paths.append(path)
  return paths


def classify(models, images: np.ndarray) -> np.ndarray:
  """Class probabilities (N, classes) for (N, 28, 28) images in [0, 1]: a model's, or the
  average of several models' (an ensemble of lanes)."""
  models = models if isinstance(models, list) else [models]
  return np.mean([np.asarray(jax.nn.softmax(m(images.reshape(len(images), -1))))
                  for m in models], axis=0)


def _print_error(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def classify_files(model, paths: list[pathlib.Path], invert: bool = False, report=print,
                   report_error=_print_error) -> int:
  """Reports 'file: digit (probability)' per file; unreadable files get one error line each.

  Returns the number of files that could not be classified.
  """
  images, readable, failures = [], [], 0
  for path in paths:
    try:
      images.append(images_lib.load_image(path, invert))
      readable.append(path)
    except images_lib.ImageError as e:
      report_error(f'error: {e}')
      failures += 1
  if images:
    probabilities = classify(model, np.stack(images))
    for path, p in zip(readable, probabilities):
      report(f'{path}: {int(p.argmax())} ({float(p.max()):.4f})')
  return failures


def run_predict(config, plan, workdir: str, step: str, images: str, invert: bool,
                lane: int | None = None) -> int:
  """Classifies the image files named by `images`; returns how many could not be read. With
  lanes: by lane `lane`, or by the ensemble of every lane (probabilities averaged)."""
  paths = images_lib.expand_paths(images)
  if not paths:
    raise images_lib.ImageError('--images names no files; pass PATH[,PATH...] or a quoted '
                                'GLOB.')
  images_lib.check_any_readable(paths, invert)  # Before the checkpoint is read.
  restored = restore(config, plan, workdir, step, lane)
  models = [restored.model(i) for i in restored.selected(lane)]
  by = f'the ensemble of {len(models)} lanes, ' if len(models) > 1 else ''
  say(f'Predictions of {by}{restored.describe(lane)}:')
  return classify_files(models, paths, invert, say)


def run_report(config, plan, workdir: str, step: str, lane: int | None = None
               ) -> list[pathlib.Path]:
  """Redraws WORKDIR/plots from checkpoint `step` (confusion matrix, errors on
  config.eval_split) and metrics.jsonl (curves; the checkpoint's own history if it is empty).
  With lanes: those of lane `lane`, or of every lane, in WORKDIR/models/<lane>/."""
  restored = restore(config, plan, workdir, step, lane)
  meta = restored.meta
  split = tfds_source.load_split(config, config.eval_split)
  paths = []
  for i in restored.selected(lane):
    folder = summary.model_dir(workdir, restored.lanes, i)
    history = jsonl.read(folder / jsonl.METRICS_FILE)
    if not history and meta:
      history = [row['lanes'][i] if restored.lanes > 1 else row for row in meta['history']]
    say(f'Report of {restored.describe(i)} on {len(split)} {config.eval_split} samples')
    paths += report.write_report(restored.graphdef, restored.lane_state(i).params,
                                 sharding.make_mesh(), config, split, history, folder,
                                 meta['epoch'] if meta else None)
  return paths
