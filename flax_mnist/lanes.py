"""Many models in one program: the lanes of a run, and the config each lane trains.

`config.num_models` N and `config.sweep` give the lanes. Without a sweep, lane i trains the
model that `--config.seed=<seed + i>` trains alone: its own initialisation, data order and
dropout. A sweep such as 'learning_rate=1e-3,3e-3; dense_dropout=0.25,0.5' is a grid: every
combination of its values, each with N seeds, lane = combination * N + replica, and replica r
has seed + r, so the combinations are compared on the same seeds.

All lanes train in one compiled step (steps.py maps the step over a leading lane axis of the
state and the batches); swept values reach it as traced per-lane arrays, so a sweep compiles
once. This module imports no JAX: `schema.validate` checks a sweep with it before anything runs.
"""

import dataclasses
import itertools

import numpy as np

from flax_mnist.errors import ConfigError

# Float fields that change no shape: they may differ between lanes.
SWEEPABLE = ('learning_rate', 'adam_b1', 'adam_b2', 'adam_eps', 'conv_dropout',
             'dense_dropout')
MODELS_DIR = 'models'  # WORKDIR/models/<lane>/ holds each lane's files.


def parse_sweep(text: str) -> list[tuple[str, tuple[float, ...]]]:
  """'name=v1,v2; name=v3,...' -> [(name, (v1, v2)), ...]; ConfigError naming the fix when a
  name is not sweepable, repeated, or a value is not a number or not valid for its field."""
  from flax_mnist import schema  # schema imports this module lazily; no cycle at import.
  axes, seen = [], set()
  for part in filter(None, (p.strip() for p in text.split(';'))):
    name, equals, values = (s.strip() for s in part.partition('='))
    if not equals or name not in SWEEPABLE:
      raise ConfigError(f'config.sweep={text!r}: {part!r} is not NAME=V1,V2,... with NAME one '
                        f'of {", ".join(SWEEPABLE)}; separate names with ";".')
    if name in seen:
      raise ConfigError(f'config.sweep={text!r} names {name} twice; give all its values once.')
    seen.add(name)
    try:
      numbers = tuple(float(v) for v in values.split(','))
    except ValueError:
      raise ConfigError(f'config.sweep={text!r}: the values of {name} must be numbers '
                        'separated by commas, e.g. learning_rate=1e-3,3e-3.') from None
    field = schema.BY_NAME[name]
    bad = [v for v in numbers if not field.check(v)]
    if bad:
      raise ConfigError(f'config.sweep={text!r}: {name}={bad[0]!r} is invalid: must be '
                        f'{field.valid}.')
    if len(set(numbers)) != len(numbers):
      raise ConfigError(f'config.sweep={text!r} repeats a value of {name}; give each once.')
    axes.append((name, numbers))
  return axes


def count(config) -> int:
  """How many lanes `config` trains (1: the plain single-model run)."""
  return config.num_models * int(np.prod([len(v) for _, v in parse_sweep(config.sweep)]))


def check(config) -> None:
  """ConfigError when the sweep is malformed or gives a single lane (a plain run)."""
  axes = parse_sweep(config.sweep)
  if axes and count(config) == 1:
    name, (value,) = axes[0]
    raise ConfigError(f'config.sweep={config.sweep!r} gives one lane; set '
                      f'--config.{name}={value!r} instead, or sweep two or more values.')


@dataclasses.dataclass(frozen=True)
class Lane:
  """One lane: its index, seed and swept values (name -> value)."""
  index: int
  seed: int
  values: dict

  def label(self) -> str:
    swept = ''.join(f', {k} {v:g}' for k, v in self.values.items())
    return f'seed {self.seed}{swept}'


def lanes(config) -> list[Lane]:
  """Every lane of `config`, in lane order."""
  axes = parse_sweep(config.sweep)
  names = [name for name, _ in axes]
  combos = itertools.product(*[values for _, values in axes])
  return [Lane(i * config.num_models + r, config.seed + r, dict(zip(names, combo)))
          for i, combo in enumerate(combos) for r in range(config.num_models)]


def lane_config(config, lane: Lane):
  """The single-model config that trains what `lane` trains (for tests and comparisons)."""
  single = config.copy_and_resolve_references()
  with single.unlocked():
    single.num_models, single.sweep, single.seed = 1, '', lane.seed
    for name, value in lane.values.items():
      single[name] = value
  return single


def model_configs(config) -> list:
  """The config that each model of `config` trains, in lane order: `config` itself for a
  single model (what a model's Keras file records: its own seed, learning rate, dropout)."""
  if count(config) == 1:
    return [config]
  return [lane_config(config, lane) for lane in lanes(config)]


def swept_values(config) -> dict[str, np.ndarray]:
  """name -> float32 (lanes,) for every swept field: the traced per-lane hyperparameters."""
  all_lanes = lanes(config)
  names = [name for name, _ in parse_sweep(config.sweep)]
  return {n: np.array([lane.values[n] for lane in all_lanes], np.float32) for n in names}
