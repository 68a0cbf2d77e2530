"""Start-up times of the command line, against JAX's own start, in one run.

  python benchmarks/startup.py --workdir=WORKDIR --data_dir=DIR [--config=configs/base.py]
      [-- --config.FIELD=VALUE ...]

Times, in fresh processes, alternating, `--repeats` times each: `python -c "import jax;
jax.devices()"` (the floor any JAX program pays), `python -m flax_mnist.main --help`,
`--mode=config`, and `--mode=eval` on WORKDIR (a trained workdir of the config) with the
compilation cache and split cache warm (a first eval fills them), and once more with the split
cache off (the split read through tfds). Reports the median wall seconds of each and eval's
ratio to JAX's start.
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _seconds(command: list[str], env=None) -> float:
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - start
  if result.returncode and '--help' not in command:  # absl's --help exits 1.
    raise SystemExit(f'{" ".join(command)} failed:\n{result.stderr[-2000:]}')
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a trained workdir of --config')
  parser.add_argument('--data_dir', required=True, help='the tfds data dir it was trained with')
  parser.add_argument('--config', default='configs/base.py')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('overrides', nargs='*', help='--config.FIELD=VALUE the workdir was '
                      'trained with (after --)')
  args = parser.parse_args()
  main_command = [sys.executable, '-m', 'flax_mnist.main', '--config', args.config,
                  *args.overrides]
  commands = {
      'import jax; jax.devices()': [sys.executable, '-c', 'import jax; jax.devices()'],
      '--help': main_command[:3] + ['--help'],
      '--mode=config': main_command + ['--mode=config'],
      '--mode=eval': main_command + [f'--workdir={args.workdir}',
                                     f'--config.data_dir={args.data_dir}', '--mode=eval'],
  }
  with tempfile.TemporaryDirectory() as cache:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=f'{cache}/jax',
               FLAX_MNIST_SPLIT_CACHE=f'{cache}/splits')
    _seconds(commands['--mode=eval'], env)  # Fills both caches.
    envs = {name: env for name in commands}
    commands['--mode=eval, split cache off'] = commands['--mode=eval']
    envs['--mode=eval, split cache off'] = dict(env, FLAX_MNIST_SPLIT_CACHE='off')
    times = {name: [] for name in commands}
    for _ in range(args.repeats):
      for name, command in commands.items():
        times[name].append(_seconds(command, envs[name]))
  medians = {name: statistics.median(values) for name, values in times.items()}
  for name, value in medians.items():
    print(f'{name:<32} median {value:6.2f} s  (all: '
          f'{", ".join(f"{v:.2f}" for v in times[name])})')
  print(f'eval / JAX start: {medians["--mode=eval"] / medians["import jax; jax.devices()"]:.1f}x')


if __name__ == '__main__':
  main()
