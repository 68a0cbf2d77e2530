"""Command line: python -m flax_mnist.main --config configs/base.py [--workdir DIR] [--mode ...].

Flags and config are parsed with absl and ml_collections alone: --help, --mode=config and
config errors answer before JAX is imported. Then, in order: the config is validated against
the schema, malloc is told to keep freed memory and the cycle collector to wait for the imports
(flax_mnist/host_memory.py), jax.distributed starts (multi-process runs), the run plan is
decided and printed once, the inputs are checked, and the mode runs.
"""

import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before anything imports TensorFlow.

from absl import app, flags, logging
from ml_collections import config_flags

from flax_mnist import host_memory, schema
from flax_mnist.errors import FlaxMnistError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/base.py); override fields with '
    '--config.FIELD=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where metrics.jsonl and checkpoints go. Default: workdir/<config name>.')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'eval', 'export', 'predict', 'report', 'config'],
                          'train (resumes from the newest checkpoint), eval, export, predict, '
                          'report (the plots in WORKDIR/plots) or config (print every config '
                          'field with its value and meaning, and exit).')
_STEP = flags.DEFINE_string('step', 'latest',
                            'Checkpoint for eval/export/predict/report: latest, best or a step '
                            'number.')
_OUTPUT = flags.DEFINE_string('output', '', 'export: a .h5 (Keras 3 and tf-keras 2) or .keras '
                              '(Keras 3) path (default WORKDIR/keras_cnn.h5).')
_IMAGES = flags.DEFINE_string('images', '', 'predict: image files, PATH[,PATH...], each a file, '
                              'a folder (its image files) or a quoted GLOB.')
_INVERT = flags.DEFINE_bool('invert', False, 'predict: images are dark digits on light paper.')
_LANE = flags.DEFINE_integer('lane', None, 'eval/export/predict/report of a run of several '
                             'models (config.num_models, config.sweep): lane N only. Default: '
                             'every lane, and their ensemble for eval and predict.')
flags.mark_flags_as_required(['config'])
# The modes each flag applies to; given to another, it is refused rather than ignored
# (--mode=train --step=10 would resume from the newest checkpoint).
_READING = ('eval', 'export', 'predict', 'report')
_FLAG_MODES = {'step': _READING, 'lane': _READING, 'output': ('export',),
               'images': ('predict',), 'invert': ('predict',)}


def default_workdir() -> str:
  """workdir/<config file stem>, so runs of different configs never share a folder."""
  stem = pathlib.Path(config_flags.get_config_filename(flags.FLAGS['config'])).stem
  return str(pathlib.Path('workdir') / stem)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every config-loading problem turned into a one-line error."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # ml_collections reports a missing config file only on first use.
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):  # Its get_config failed: a traceback.
      _fail_config_file(argv, _last_line(e))
    _fail(f'{" ".join(str(e).split()).rstrip(".")}. Pass --helpfull to see the flags.')
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field.
    if "has no attribute 'get_config'" in str(e):
      _fail(f'config file {_config_argument(argv)!r} defines no get_config(); define one that '
            'returns the config, as configs/base.py does.')
    hint = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    _fail(f'unknown config field in the overrides: {hint}')
  except Exception as e:  # A missing config file, or one that fails to import.
    _fail_config_file(argv, f'{type(e).__name__}: {_last_line(e)}')
  if len(remaining) > 1:  # absl would print the whole --help before saying so.
    _fail(f'unexpected arguments: {" ".join(remaining[1:])}; flags take the form --NAME=VALUE '
          '(config fields --config.FIELD=VALUE).')
  for name, modes in _FLAG_MODES.items():
    if flags.FLAGS[name].present and _MODE.value not in modes:
      listed = ', '.join(modes[:-1]) + (' or ' if len(modes) > 1 else '') + modes[-1]
      _fail(f'--{name} applies to --mode={listed}, not --mode={_MODE.value}; drop it.')
  return remaining


def _last_line(error: BaseException) -> str:
  """The last non-empty line of an error's message: the cause, where it holds a traceback."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _fail_config_file(argv: list[str], cause: str) -> None:
  """One line for a config file that cannot be loaded, with the cause (its error's last line)."""
  _fail(f'cannot load config file {_config_argument(argv)!r} ({cause.rstrip(".")}); pass e.g. '
        '--config configs/base.py.')


def _config_argument(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return '?'


def _fail(message: str, code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache, so a resume, eval, export or predict of a
  config compiled before loads its programs instead of compiling them again.

  The folder is JAX_COMPILATION_CACHE_DIR when set, else
  $XDG_CACHE_HOME/flax_mnist/jax (~/.cache/flax_mnist/jax): one per user, shared by all
  workdirs, since a program depends on the config and the devices, not on the run.
  """
  import jax
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR') or (
      pathlib.Path(os.environ.get('XDG_CACHE_HOME') or '~/.cache').expanduser() / 'flax_mnist'
      / 'jax')
  jax.config.update('jax_compilation_cache_dir', str(folder))
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)  # Also the eval step.


def run_mode(config, plan, workdir: str) -> int:
  """Runs --mode with the decided plan; returns the process exit code."""
  from flax_mnist import loop, modes
  from flax_mnist.data import checks
  host_memory.resume_collector()  # The imports are done.
  lane = _LANE.value
  checks.check(config, plan, _MODE.value, workdir, _OUTPUT.value)  # Before any writing.
  if _MODE.value == 'train':
    loop.train_and_evaluate(config, workdir, plan)
  elif _MODE.value == 'eval':
    modes.run_eval(config, plan, workdir, _STEP.value, lane)
  elif _MODE.value == 'export':
    modes.run_export(config, plan, workdir, _STEP.value, _OUTPUT.value, lane)
  elif _MODE.value == 'report':
    modes.run_report(config, plan, workdir, _STEP.value, lane)
  else:
    return 1 if modes.run_predict(config, plan, workdir, _STEP.value, _IMAGES.value,
                                  _INVERT.value, lane) else 0
  return 0


def main(argv) -> None:
  del argv  # parse_flags has refused any left over.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it opens at INFO.
  config = _CONFIG.value
  try:
    schema.validate(config)  # Fields first: distributed start-up reads some of them.
    if _MODE.value == 'config':
      print(schema.describe(config))
      return
    host_memory.keep_freed_memory()  # Before JAX allocates anything.
    host_memory.pause_collector()  # Until run_mode's imports are done (or an error).
    from flax_mnist import distributed, plan  # After flag parsing: imports JAX.
    from flax_mnist.reporting.console import say
    distributed.initialize(config)  # Before any other JAX call.
    enable_compilation_cache()
    decided = plan.decide(config)
    from flax_mnist.modes import check_lane  # Needs the plan's lanes, not the plan line.
    check_lane(decided, _MODE.value, _LANE.value, _OUTPUT.value)
    say(decided.line())
    sys.exit(run_mode(config, decided, _WORKDIR.value or default_workdir()))
  except FlaxMnistError as e:
    _fail(str(e), getattr(e, 'exit_code', 2))
  except KeyboardInterrupt:  # A second Ctrl-C in training, or one outside it.
    _fail('interrupted; checkpoints already written are intact. Run the same command again to '
          'resume from the newest.', 130)
  finally:
    host_memory.resume_collector()  # Where start-up ended before run_mode's imports.


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
