"""The non-training modes: eval, export, predict and report, each from a restored checkpoint."""

import json
import pathlib

import jax

from flax_mnist import checkpointing, distributed, input_pipeline, keras_export, parallel
from flax_mnist import predict
from flax_mnist import report, reporting, train
from flax_mnist import train_step as ts


def restore(config, workdir: str, step: str):
  """(graphdef, state, meta): checkpoint `step` ('latest', 'best', N) of workdir, or, when the
  workdir has none, config.init_from's Keras weights (meta None)."""
  mesh = parallel.make_mesh()
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not directory.is_dir() or not any(directory.iterdir()):
    if not config.init_from:
      raise checkpointing.CheckpointError(
          f'no checkpoint in {directory}; train first, or pass --config.init_from=FILE.h5.')
    graphdef, state, _ = ts.create(config, keras_weights=config.init_from)
    return graphdef, jax.device_put(state, parallel.replicated(mesh)), None
  graphdef, state, _ = ts.create(config)
  state = jax.device_put(state, parallel.replicated(mesh))
  with checkpointing.open_checkpoints(workdir, config.keep_checkpoints) as checkpoints:
    state, meta = checkpoints.restore(checkpoints.resolve_step(step), state, config.to_dict())
  return graphdef, state, meta


def _describe(state, meta) -> str:
  if meta is None:
    return 'the init_from weights'
  return f"step {int(state.step)} (epoch {meta['epoch']})"


def run_eval(config, workdir: str, step: str) -> dict:
  """Evaluates a checkpoint on config.eval_split; prints and appends to WORKDIR/eval.jsonl."""
  graphdef, state, meta = restore(config, workdir, step)
  mesh = parallel.make_mesh()
  _, evaluate_step = ts.jit_steps(graphdef, ts.make_optimizer(config), mesh, config)
  split = input_pipeline.load_split(config, config.eval_split)
  val_loss, val_accuracy = train.evaluate(evaluate_step, state.params, mesh, split,
                                          config.eval_batch_size)
  row = dict(step=int(state.step), epoch=meta['epoch'] if meta else None,
             split=config.eval_split, val_loss=val_loss, val_accuracy=val_accuracy)
  train.say(f'Eval of {_describe(state, meta)} on {len(split)} {config.eval_split} samples - '
            f'val_loss: {val_loss:.4f} - val_accuracy: {val_accuracy:.4f}')
  if distributed.is_main():
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    with open(pathlib.Path(workdir) / 'eval.jsonl', 'a') as f:
      f.write(json.dumps(row) + '\n')
  return row


def run_export(config, workdir: str, step: str, output: str) -> pathlib.Path:
  """Writes checkpoint `step` as a Keras .h5 (default WORKDIR/keras_cnn.h5)."""
  graphdef, state, meta = restore(config, workdir, step)
  path = pathlib.Path(output) if output else pathlib.Path(workdir) / train.EXPORT_NAME
  if distributed.is_main():
    keras_export.export_h5(train.nnx_model(graphdef, state), config, path)
  train.say(f'Exported {_describe(state, meta)} to {path}')
  return path


def run_predict(config, workdir: str, step: str, images: str, invert: bool) -> int:
  """Classifies the image files named by `images`; returns how many could not be read."""
  paths = predict.expand_paths(images)
  if not paths:
    raise predict.ImageError('--images names no files; pass PATH[,PATH...] or a quoted GLOB.')
  predict.check_any_readable(paths, invert)  # Before the checkpoint is read.
  graphdef, state, _ = restore(config, workdir, step)
  return predict.classify_files(train.nnx_model(graphdef, state), paths, invert, train.say)


def run_report(config, workdir: str, step: str) -> list[pathlib.Path]:
  """Redraws WORKDIR/plots from checkpoint `step` (confusion matrix, errors on
  config.eval_split) and metrics.jsonl (curves; the checkpoint's own history if it is empty)."""
  graphdef, state, meta = restore(config, workdir, step)
  history = reporting.read_metrics(pathlib.Path(workdir) / 'metrics.jsonl')
  if not history and meta:
    history = meta['history']
  split = input_pipeline.load_split(config, config.eval_split)
  train.say(f'Report of {_describe(state, meta)} on {len(split)} {config.eval_split} samples')
  return report.write_report(graphdef, state.params, parallel.make_mesh(), config, split,
                             history, workdir, meta['epoch'] if meta else None, say=train.say)
