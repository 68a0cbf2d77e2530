"""The modes that use a trained model: eval, export, predict and report, each from a restored
checkpoint (or config.init_from's Keras weights when the workdir has none)."""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

from flax_mnist import checkpoints as checkpoints_lib
from flax_mnist import distributed, loop, sharding
from flax_mnist import steps as steps_lib
from flax_mnist.data import images as images_lib
from flax_mnist.data import tfds_source
from flax_mnist.keras import export as keras_export
from flax_mnist.reporting import jsonl, report
from flax_mnist.reporting.console import say


@dataclasses.dataclass
class Restored:
  """A model restored for a mode: its graph, state, and the checkpoint's meta (None for
  init_from weights)."""
  graphdef: object
  state: steps_lib.TrainState
  meta: dict | None

  def describe(self) -> str:
    if self.meta is None:
      return 'the init_from weights'
    return f"step {int(self.state.step)} (epoch {self.meta['epoch']})"

  def model(self):
    return loop.nnx_model(self.graphdef, self.state)


def restore(config, plan, workdir: str, step: str) -> Restored:
  """Checkpoint `step` ('latest', 'best', N) of workdir, or, when the workdir has none,
  config.init_from's Keras weights."""
  mesh = sharding.make_mesh()
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not directory.is_dir() or not any(directory.iterdir()):
    if not config.init_from:
      raise checkpoints_lib.CheckpointError(
          f'no checkpoint in {directory}; train first, or pass --config.init_from=FILE.h5.')
    graphdef, state, _ = steps_lib.create(config, plan, keras_weights=config.init_from)
    return Restored(graphdef, jax.device_put(state, sharding.replicated(mesh)), None)
  graphdef, state, _ = steps_lib.create(config, plan)
  state = jax.device_put(state, sharding.replicated(mesh))
  with checkpoints_lib.open_checkpoints(workdir, config.keep_checkpoints) as checkpoints:
    state, meta = checkpoints.restore(checkpoints.resolve_step(step), state, config.to_dict())
  return Restored(graphdef, state, meta)


def run_eval(config, plan, workdir: str, step: str) -> dict:
  """Evaluates a checkpoint on config.eval_split; prints and appends to WORKDIR/eval.jsonl."""
  restored = restore(config, plan, workdir, step)
  mesh = sharding.make_mesh()
  evaluate_step = loop.compile_eval(restored.graphdef, restored.state, mesh, plan)
  split = tfds_source.load_split(config, config.eval_split)
  val_loss, val_accuracy = loop.evaluate(evaluate_step, restored.state.params, mesh, split,
                                         config.eval_batch_size, plan.eval_batch)
  meta = restored.meta
  row = dict(step=int(restored.state.step), epoch=meta['epoch'] if meta else None,
             split=config.eval_split, val_loss=val_loss, val_accuracy=val_accuracy)
  say(f'Eval of {restored.describe()} on {len(split)} {config.eval_split} samples - '
      f'val_loss: {val_loss:.4f} - val_accuracy: {val_accuracy:.4f}')
  if distributed.is_main():
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    with open(pathlib.Path(workdir) / 'eval.jsonl', 'a') as f:
      f.write(json.dumps(row) + '\n')
  return row


def run_export(config, plan, workdir: str, step: str, output: str) -> pathlib.Path:
  """Writes checkpoint `step` as a Keras file: .h5/.hdf5 (default WORKDIR/keras_cnn.h5, the
  seed's) or Keras 3's .keras, as `output`'s suffix says. The name is checked before the
  checkpoint is restored, so that a typo fails at once."""
  path = keras_export.check_name(output or pathlib.Path(workdir) / keras_export.EXPORT_NAME)
  restored = restore(config, plan, workdir, step)
  if distributed.is_main():
    keras_export.export(restored.model(), config, path)
  say(f'Exported {restored.describe()} to {path}')
  return path


def classify(model, images: np.ndarray) -> np.ndarray:
  """Class probabilities (N, classes) for (N, 28, 28) images in [0, 1]."""
  return np.asarray(jax.nn.softmax(model(images.reshape(len(images), -1))))


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


def run_predict(config, plan, workdir: str, step: str, images: str, invert: bool) -> int:
  """Classifies the image files named by `images`; returns how many could not be read."""
  paths = images_lib.expand_paths(images)
  if not paths:
    raise images_lib.ImageError('--images names no files; pass PATH[,PATH...] or a quoted '
                                'GLOB.')
  images_lib.check_any_readable(paths, invert)  # Before the checkpoint is read.
  restored = restore(config, plan, workdir, step)
  return classify_files(restored.model(), paths, invert, say)


def run_report(config, plan, workdir: str, step: str) -> list[pathlib.Path]:
  """Redraws WORKDIR/plots from checkpoint `step` (confusion matrix, errors on
  config.eval_split) and metrics.jsonl (curves; the checkpoint's own history if it is empty)."""
  restored = restore(config, plan, workdir, step)
  meta = restored.meta
  history = jsonl.read(pathlib.Path(workdir) / jsonl.METRICS_FILE)
  if not history and meta:
    history = meta['history']
  split = tfds_source.load_split(config, config.eval_split)
  say(f'Report of {restored.describe()} on {len(split)} {config.eval_split} samples')
  return report.write_report(restored.graphdef, restored.state.params, sharding.make_mesh(),
                             config, split, history, workdir, meta['epoch'] if meta else None)
