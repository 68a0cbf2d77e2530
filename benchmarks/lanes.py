"""Cost of training N models in one program (config.num_models) against one model, in ONE run.

  python benchmarks/lanes.py                          # N = 1, 2, 4 of configs/base.py
  python benchmarks/lanes.py --lanes 1,4,16 --config configs/k5_nodropout.py
  python benchmarks/lanes.py --lanes_per_pass 0,4     # auto (1 on CPU) against all-at-once vmap

Times the compiled train step (forward, backward and Adam of every lane, the config's batch
each: 500 in both configs; real MNIST digits) in a fresh process per block, interleaved, after
warm-up; the median over repeats. `ratio` is the time of N lanes over N times one model's: at
most 1.0 means N lanes in one program cost no more than N runs one after another.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = '''
import json, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
import jax, numpy as np
from peers import train_args
from throughput import benchmark_batch, load_config
from flax_mnist import epochs, plan as plan_lib, sharding, steps
config = load_config({config!r})
config.num_models, config.lanes_per_pass = {lanes}, {per_pass}
plan = plan_lib.decide(config)
mesh = sharding.make_mesh()
graphdef, state, tx = steps.create(config, plan)
state = jax.device_put(state, sharding.replicated(mesh))
images, labels, *mask = train_args(plan, *benchmark_batch(config.batch_size))
if plan.lanes > 1:
  images, labels = np.stack([images] * plan.lanes), np.stack([labels] * plan.lanes)
batch = (sharding.put_batch(mesh, images, labels, lanes=plan.lanes > 1)
         + sharding.put_batch(mesh, *mask))
step = steps.jit_train_step(graphdef, tx, mesh, plan, config).lower(state, *batch).compile()
for _ in range(2):
  state, metrics = step(state, *batch)
jax.block_until_ready(state)
began = time.perf_counter()
for _ in range({steps}):
  state, metrics = step(state, *batch)
jax.block_until_ready(state)
print('RESULT', json.dumps(dict(seconds=(time.perf_counter() - began) / {steps},
                                per_pass=plan.lanes_per_pass, line=plan.line(),
                                batch=config.batch_size)))
'''


def time_block(config: str, lanes: int, per_pass: int, steps: int) -> dict:
  code = _CHILD.format(root=str(ROOT), bench=str(ROOT / 'benchmarks'), config=config,
                       lanes=lanes, per_pass=per_pass, steps=steps)
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=ROOT, check=False)
  if result.returncode:
    raise SystemExit(f'error: the block of {lanes} lanes failed: {result.stderr[-2000:]}')
  return json.loads(result.stdout.split('RESULT ', 1)[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/base.py')
  parser.add_argument('--lanes', default='1,2,4', help='lane counts, comma-separated')
  parser.add_argument('--lanes_per_pass', default='0', help='0 (the plan\'s auto) and/or counts')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  counts = [int(n) for n in args.lanes.split(',')]
  passes = [int(n) for n in args.lanes_per_pass.split(',')]
  cases = [(n, p) for n in counts for p in passes if n > 1 or p == passes[0]]
  times = {case: [] for case in cases}
  lines, per_passes = {}, {}
  for repeat in range(args.repeats):
    for case in cases[repeat % len(cases):] + cases[:repeat % len(cases)]:
      block = time_block(args.config, *case, args.steps)
      times[case].append(block['seconds'])
      lines[case], per_passes[case] = block['line'], block['per_pass']
      batch = block['batch']
  one = statistics.median(times[cases[0]])
  print(f'{args.config}, batch {batch} per lane, median of {args.repeats} blocks of {args.steps} '
        'steps')
  print('| lanes | lanes per pass | s/step | samples/s (all lanes) | ratio to N x 1 lane |')
  print('| --- | --- | --- | --- | --- |')
  for n, per_pass in cases:
    seconds = statistics.median(times[(n, per_pass)])
    shown = per_passes[(n, per_pass)] if n > 1 else '-'
    print(f'| {n} | {shown} | {seconds:.3f} | {batch * n / seconds:,.0f} | '
          f'{seconds / (n * one):.2f} |')
  print(lines[cases[-1]])


if __name__ == '__main__':
  main()
