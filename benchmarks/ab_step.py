"""A/B of config variants of flax_mnist's train (or eval) step, interleaved in ONE process.

  python benchmarks/ab_step.py --variant base= --variant mb25=micro_batch_size=25
  python benchmarks/ab_step.py --eval --kernel 5 --rounds 30 \
      --variant base= --variant conv2_xla=conv_impl=xla

Each variant is compiled once, then the variants take turns (order reversed every round) at
`--steps` steps each, and every variant's step time is divided by the first variant's in the
same round: the median of those paired ratios holds up on a machine whose speed drifts by
tens of percent within minutes (a shared cloud VM), where medians of separate processes
(benchmarks/throughput.py) need many more blocks. A ratio below 1 is faster than the first.
Only config fields differ between variants; for code changes, compare commits with
throughput.py.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

import profile_step  # noqa: E402
import throughput  # noqa: E402  (sets the import path for flax_mnist)


def parse_variant(text: str) -> tuple[str, str]:
  """'NAME=FIELD=VALUE,FIELD=VALUE' (or 'NAME=') -> (NAME, 'FIELD=VALUE,...')."""
  name, _, overrides = text.partition('=')
  if not name:
    raise argparse.ArgumentTypeError(f'{text!r}: a variant is NAME=FIELD=VALUE,... or NAME=')
  return name, overrides


def make_run(config, evaluation: bool):
  """run(steps) of one variant, blocking until its steps are done."""
  from flax_mnist import plan as plan_lib
  return profile_step.runner(*profile_step.step_and_args(config, plan_lib.decide(config),
                                                          evaluation))


def compare(variants, kernel: int, evaluation: bool, rounds: int, steps: int) -> list[str]:
  """One line per variant: median step time and median paired ratio to the first variant."""
  runs = {}
  for name, overrides in variants:
    config = throughput.with_overrides(throughput.load_config(throughput.CONFIGS[kernel]),
                                       overrides)
    runs[name] = make_run(config, evaluation)
    runs[name](2)  # Compilation and warm-up.
  times = {name: [] for name in runs}
  names = list(runs)
  for round_ in range(rounds):
    for name in names if round_ % 2 == 0 else names[::-1]:
      began = time.perf_counter()
      runs[name](steps)
      times[name].append((time.perf_counter() - began) / steps * 1000)
  first = times[names[0]]
  lines = []
  for name in names:
    ratio = statistics.median(t / f for t, f in zip(times[name], first))
    lines.append(f'{name:<16} {statistics.median(times[name]):8.1f} ms per step '
                 f'(min {min(times[name]):.1f})   paired ratio to {names[0]}: {ratio:.3f}')
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', action='append', type=parse_variant, required=True,
                      help='NAME=FIELD=VALUE,... (config overrides); the first is the baseline')
  parser.add_argument('--kernel', type=int, default=3, choices=sorted(throughput.CONFIGS))
  parser.add_argument('--eval', action='store_true', help='the eval step, not the train step')
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--steps', type=int, default=2, help='steps per variant per round')
  args = parser.parse_args()
  what = 'eval' if args.eval else 'train'
  print(f'{what} step, k={args.kernel}, {args.rounds} rounds of {args.steps} steps per variant')
  print('\n'.join(compare(args.variant, args.kernel, args.eval, args.rounds, args.steps)))


if __name__ == '__main__':
  main()
