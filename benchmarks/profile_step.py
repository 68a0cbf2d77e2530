"""Where a train step's time goes: each compiled op's milliseconds per step, with what it is.

  python benchmarks/profile_step.py                    # base (k=3), batch 500
  python benchmarks/profile_step.py --kernel 5 --top 30 --steps 10
  python benchmarks/profile_step.py --eval             # the eval step, a batch of 1000

Builds flax_mnist's train step as benchmarks/throughput.py does (the run plan of this machine,
the same batch of real digits), warms it up, traces `--steps` steps with jax.profiler and lists
the ops (XLA fusions and library calls) by total time, each with its output shape and the JAX
operation it came from (from the compiled HLO). Times are per step, summed over micro-batches;
on a multi-core CPU ops can overlap and library matmuls spread over cores, so the sum of the
ops is not the step's wall time. For A/B figures use throughput.py (interleaved blocks).
"""

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

import throughput  # noqa: E402  (sets the import path for flax_mnist and peers)
import peers  # noqa: E402

_NOT_OPS = ('$', 'Thunk', 'while', 'Pjit', 'Slinky')  # Python frames and the runtime's own.


def _op_shapes(hlo_text: str) -> dict[str, str]:
  """op name -> 'shape  (JAX operation)' for every instruction of the compiled HLO."""
  shapes = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%([\w.-]+) = (\S+) ', line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      what = op_name.group(1).split('/')[-1] if op_name else ''
      shapes.setdefault(match.group(1), f'{match.group(2)}  {what}'.strip())
  return shapes


def step_and_args(config, plan, evaluation: bool):
  """(a function of its args that returns what to wait on, args): one train step (threading
  the state through) or one eval step over a padded eval batch."""
  from flax_mnist import host_memory
  host_memory.keep_freed_memory()  # As the command line does.
  import jax
  import numpy as np
  from flax_mnist import sharding, steps as steps_lib
  graphdef, state, tx = steps_lib.create(config, plan)
  mesh = sharding.make_mesh()
  state = jax.device_put(state, sharding.replicated(mesh))
  size = plan.eval_batch if evaluation else config.batch_size
  images, labels = throughput.benchmark_batch(size)
  if evaluation:
    evaluate = steps_lib.jit_eval_step(graphdef, mesh, plan)
    batch = sharding.put_batch(mesh, images, labels, np.ones(size, np.float32))
    return evaluate, (state.params, *batch)
  train = steps_lib.jit_train_step(graphdef, tx, mesh, plan, config)
  holder = [state]

  def step(*batch):
    holder[0], metrics = train(holder[0], *batch)
    return metrics
  step.lower = lambda *batch: train.lower(holder[0], *batch)
  return step, sharding.put_batch(mesh, *peers.train_args(plan, images, labels))


def runner(step, args):
  """run(times): `times` steps, blocking until they are done."""
  import jax

  def run(times):
    for _ in range(times):
      out = step(*args)
    jax.block_until_ready(out)
  return run


def profile(kernel: int, steps: int, overrides: str, evaluation: bool = False
            ) -> tuple[float, dict, dict, str]:
  """(examples/s untraced, op -> total microseconds, op -> calls, compiled HLO text)."""
  import jax
  from flax_mnist import plan as plan_lib
  config = throughput.with_overrides(throughput.load_config(throughput.CONFIGS[kernel]),
                                     overrides)
  plan = plan_lib.decide(config)
  print(plan.line())
  step, args = step_and_args(config, plan, evaluation)
  hlo = step.lower(*args).compile().as_text()
  size = plan.eval_batch if evaluation else config.batch_size
  run = runner(step, args)
  run(3)  # Warm-up.
  began = time.perf_counter()
  run(steps)
  rate = steps * size / (time.perf_counter() - began)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    run(steps)
    jax.profiler.stop_trace()
    path = glob.glob(f'{trace_dir}/**/*perfetto_trace.json.gz', recursive=True)[0]
    events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  totals, calls = collections.Counter(), collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and not event['name'].startswith(_NOT_OPS):
      totals[event['name']] += event['dur']
      calls[event['name']] += 1
  return rate, totals, calls, hlo


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kernel', type=int, default=3, choices=sorted(throughput.CONFIGS))
  parser.add_argument('--steps', type=int, default=5, help='steps traced (and timed before)')
  parser.add_argument('--top', type=int, default=25, help='ops listed')
  parser.add_argument('--overrides', default='', help="config fields, 'FIELD=VALUE,...'")
  parser.add_argument('--eval', action='store_true', help='the eval step (a padded eval batch)')
  args = parser.parse_args()
  rate, totals, calls, hlo = profile(args.kernel, args.steps, args.overrides, args.eval)
  shapes = _op_shapes(hlo)
  total = sum(totals.values()) / args.steps / 1000
  print(f'{rate:.0f} examples/s untraced; ops sum to {total:.1f} ms per step')
  print(f'{"ms/step":>8} {"share":>6} {"calls":>6}  op  (output shape, JAX operation)')
  for name, micros in totals.most_common(args.top):
    ms = micros / args.steps / 1000
    print(f'{ms:8.2f} {ms / total:6.1%} {calls[name] // args.steps:6d}  {name}  '
          f'({shapes.get(name, "?")})')


if __name__ == '__main__':
  main()
