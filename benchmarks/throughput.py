"""Train-step throughput of flax_mnist against the seed model in Keras 3 and PyTorch, in ONE run.

  python benchmarks/throughput.py                      # k=3 (base) and k=5 (k5_nodropout)
  python benchmarks/throughput.py --contended          # the same beside a CPU-bound process
  python benchmarks/throughput.py --scaling            # vs batch size and conv2 width (base)
  python benchmarks/throughput.py --end_to_end --idx_dir=../shared/data/mnist

Samples/s of forward + backward + Adam at batch 500, float32, on this machine. Systems are
interleaved (the order rotates every repeat), warm-up (compilation) is excluded, and each figure
is the median over repeats, all on the same batch of real MNIST digits. Every timed block
runs in a fresh process, so no runtime's threads slow another down. Peers that are not
installed are reported as missing (`pip install -e '.[bench]'` installs them). --end_to_end also times the whole 20-epoch job of
flax_mnist and of the seed notebook's Keras code (benchmarks/seed_keras.py) as subprocesses.
"""

import argparse
import contextlib
import datetime
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import peers  # noqa: E402  (sets Keras' backend before anything imports it)

CONFIGS = {3: 'configs/base.py', 5: 'configs/k5_nodropout.py'}


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('bench_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def benchmark_batch(batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `batch_size` real MNIST training digits when the IDX files are at hand."""
  idx_dir = ROOT.parent / 'shared' / 'data' / 'mnist'
  if (idx_dir / 'train-images-idx3-ubyte.gz').exists():
    from flax_mnist.data import idx
    images, labels = idx.read_split(idx_dir, 'train')
    return images[:batch_size, ..., None], labels[:batch_size].astype(np.int32)
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
          rng.integers(0, 10, batch_size).astype(np.int32))


def with_overrides(config, overrides: str):
  """`config` with 'FIELD=VALUE,FIELD=VALUE' applied (values of the field's type)."""
  for item in filter(None, overrides.split(',')):
    name, value = item.split('=', 1)
    config[name] = type(config[name])(value)
  return config


@contextlib.contextmanager
def cpu_bound_neighbour(enabled: bool = True):
  """A second CPU-bound process (a busy loop on one core) for the duration of the block, so
  that a contended machine's figures are reproducible."""
  if not enabled:
    yield
    return
  busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
  try:
    yield
  finally:
    busy.kill()
    busy.wait()


def time_one_block(name: str, config_path: str, steps: int, overrides: str = '') -> float:
  """In a worker process: builds `name`, warms it up, returns samples/s of `steps` steps."""
  config = with_overrides(load_config(config_path), overrides)
  run = peers.SYSTEMS[name](config, *benchmark_batch(config.batch_size))
  run(3)  # Warm-up: compilation, tracing, allocator.
  start = time.perf_counter()
  run(steps)
  return steps * config.batch_size / (time.perf_counter() - start)


def measure(systems: list[str], config_path: str, steps: int, repeats: int,
            overrides: str = '') -> dict[str, list[float]]:
  """samples/s of each system over `repeats` timed blocks of `steps` steps, interleaved.

  Every block runs in a fresh process (python throughput.py --worker): runtimes sharing a
  process slow each other down (their idle thread pools keep spinning), measured here as up to
  a third off Keras' speed.
  """
  rates = {name: [] for name in systems}
  for repeat in range(repeats):
    for name in systems[repeat % len(systems):] + systems[:repeat % len(systems)]:
      result = subprocess.run(
          [sys.executable, __file__, '--worker', name, '--worker_config', config_path,
           '--steps', str(steps), '--worker_overrides', overrides], cwd=ROOT,
          capture_output=True, text=True)
      lines = [l for l in result.stdout.splitlines() if l.startswith('RATE ')]
      if result.returncode or not lines:
        raise SystemExit(f'{name} failed:\n{result.stderr[-3000:]}')
      rates[name].append(float(lines[-1].split()[1]))
      print(f'  repeat {repeat + 1}: {name} {rates[name][-1]:.0f} samples/s', flush=True)
  return rates


def installed(name: str) -> bool:
  return importlib.util.find_spec(peers.PACKAGES[name]) is not None


def version(package: str) -> str:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return 'missing'


def throughput_table(kernels, steps, repeats, names) -> str:
  available = [n for n in names if installed(n)]
  rows = ['| k | ' + ' | '.join(names) + ' | fastest peer | flax_mnist / fastest peer |',
          '|---' * (len(names) + 3) + '|']
  for k in kernels:
    print(f'k={k} ({CONFIGS[k]}): {steps} steps x {repeats} repeats', flush=True)
    medians = {n: statistics.median(r) for n, r in
               measure(available, CONFIGS[k], steps, repeats).items()}
    cells = [f'{medians[n]:.0f}' if n in medians else 'missing' for n in names]
    peer_rates = {n: v for n, v in medians.items() if n != 'flax_mnist'}
    best = max(peer_rates, key=peer_rates.get) if peer_rates else None
    ratio = f'{medians["flax_mnist"] / peer_rates[best]:.2f}x' if best else 'n/a'
    rows.append(f'| {k} | ' + ' | '.join(cells) + f' | {best} | {ratio} |')
  return '\n'.join(rows)


def scaling_table(batch_sizes, widths, steps, repeats, names) -> str:
  """samples/s of the base model against batch size (conv2 width 64) and against conv2 width
  (batch 500), for each system in `names`."""
  available = [n for n in names if installed(n)]
  rows = ['| batch | conv2 width | ' + ' | '.join(names) + ' | flax_mnist / best peer |',
          '|---' * (len(names) + 3) + '|']
  cells = [(b, 64) for b in batch_sizes] + [(500, w) for w in widths if w != 64]
  for batch, width in cells:
    overrides = f'batch_size={batch},conv2_features={width}'
    print(f'batch {batch}, conv2 width {width}: {steps} steps x {repeats} repeats', flush=True)
    medians = {n: statistics.median(r) for n, r in
               measure(available, CONFIGS[3], steps, repeats, overrides).items()}
    peer = max((v for n, v in medians.items() if n != 'flax_mnist'), default=None)
    ratio = f'{medians["flax_mnist"] / peer:.2f}x' if peer else 'n/a'
    rows.append(f'| {batch} | {width} | '
                + ' | '.join(f'{medians[n]:.0f}' if n in medians else 'missing' for n in names)
                + f' | {ratio} |')
  return '\n'.join(rows)


def _timed(command: list[str]) -> tuple[float, str]:
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f'{" ".join(command)} failed:\n{result.stderr[-3000:]}')
  return time.perf_counter() - start, result.stdout


def end_to_end_table(idx_dir: str, workdir: str) -> str:
  """Wall time of the whole base job (20 epochs, eval each epoch) for both programs."""
  rows = ['| program | wall time (s) | compile (s) | final val_accuracy |', '|---|---|---|---|']
  with tempfile.TemporaryDirectory() as scratch:
    if Path(workdir or scratch, 'checkpoints').exists():
      raise SystemExit(f'{workdir} already holds a run; pass a fresh --e2e_workdir.')
    seconds, out = _timed([sys.executable, '-m', 'flax_mnist.main', '--config',
                           'configs/base.py', f'--config.idx_dir={idx_dir}',
                           f'--workdir={workdir or scratch}', '--config.progress_bar=false'])
  compile_s = re.search(r'Compiled in ([\d.]+)s', out).group(1)
  accuracy = re.findall(r'val_accuracy: ([\d.]+)', out)[-1]
  rows.append(f'| flax_mnist (`python -m flax_mnist.main --config configs/base.py`) | '
              f'{seconds:.0f} | {compile_s} | {accuracy} |')
  seconds, out = _timed([sys.executable, str(ROOT / 'benchmarks' / 'seed_keras.py'),
                         f'--idx_dir={idx_dir}'])
  accuracy = re.findall(r'val_accuracy: ([\d.]+)', out)[-1]
  rows.append(f'| seed notebook Keras code (`benchmarks/seed_keras.py`) | {seconds:.0f} | '
              f'in epoch 1 | {accuracy} |')
  return '\n'.join(rows)


def cpu_name(cpuinfo: Path = Path('/proc/cpuinfo')) -> str:
  """The CPU's model and widest vector set: the lead over the peers depends on it
  (benchmarks/RESULTS.md, 2026-12-06), so every report says which it had."""
  if not cpuinfo.exists():
    return platform.processor() or platform.machine()
  lines = cpuinfo.read_text().splitlines()
  field = lambda name: next((l.split(':', 1)[1].strip() for l in lines if l.startswith(name)), '')
  flags = set(field('flags').split())
  vectors = next((label for flag, label in (('avx512f', 'AVX-512'), ('avx2', 'AVX2'),
                                             ('asimd', 'NEON')) if flag in flags), '')
  return field('model name') + (f' ({vectors})' if vectors else '')


def header(argv) -> str:
  # The [tf] extra installs tensorflow-cpu, [test] (through tf-keras) tensorflow: name the one here.
  tensorflow = 'tensorflow-cpu' if version('tensorflow-cpu') != 'missing' else 'tensorflow'
  packages = ['jax', 'jaxlib', 'flax', 'optax', 'keras', tensorflow, 'torch', 'numpy']
  return '\n'.join([
      f'## {datetime.date.today().isoformat()}: `python benchmarks/throughput.py '
      f'{" ".join(argv)}`'.rstrip() + '',
      '',
      f'Machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, '
      f'Python {platform.python_version()}. Versions: '
      + ', '.join(f'{p} {version(p)}' for p in packages) + '.', ''])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kernels', default='3,5', help='kernel sizes to measure (3, 5)')
  parser.add_argument('--steps', type=int, default=10, help='train steps per timed run')
  parser.add_argument('--repeats', type=int, default=5, help='timed runs per system')
  parser.add_argument('--systems', default=','.join(peers.SYSTEMS),
                      help='systems to compare (default: all)')
  parser.add_argument('--contended', action='store_true',
                      help='run every timed block beside a CPU-bound process (a busy loop)')
  parser.add_argument('--scaling', action='store_true',
                      help='samples/s vs batch size and conv2 width instead of the k table')
  parser.add_argument('--batch_sizes', default='125,250,500,1000,2000', help='for --scaling')
  parser.add_argument('--widths', default='64,128', help='conv2 widths for --scaling')
  parser.add_argument('--end_to_end', action='store_true',
                      help='also time the full 20-epoch base job against the seed Keras code')
  parser.add_argument('--idx_dir', default=str(ROOT.parent / 'shared' / 'data' / 'mnist'),
                      help='IDX files for --end_to_end')
  parser.add_argument('--e2e_workdir', default='',
                      help='keep the end-to-end flax_mnist run here (default: a temp dir)')
  parser.add_argument('--markdown', default='', help='append the report to this file')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--worker_config', default='', help=argparse.SUPPRESS)
  parser.add_argument('--worker_overrides', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    rate = time_one_block(args.worker, args.worker_config, args.steps, args.worker_overrides)
    print(f'RATE {rate}', flush=True)
    return
  neighbour = ' beside a CPU-bound process' if args.contended else ''
  report = header(sys.argv[1:]) + '\nTrain-step throughput, samples/s (median of '
  report += f'{args.repeats} runs of {args.steps} steps, float32{neighbour}):\n\n'
  with cpu_bound_neighbour(args.contended):
    if args.scaling:
      report += scaling_table([int(b) for b in args.batch_sizes.split(',')],
                              [int(w) for w in args.widths.split(',')], args.steps,
                              args.repeats, args.systems.split(',')) + '\n'
    else:
      report += throughput_table([int(k) for k in args.kernels.split(',')], args.steps,
                                 args.repeats, args.systems.split(',')) + '\n'
  if args.end_to_end:
    report += '\nWhole job, base config (20 epochs, validation after each):\n\n'
    report += end_to_end_table(args.idx_dir, args.e2e_workdir) + '\n'
  print('\n' + report)
  if args.markdown:
    with open(args.markdown, 'a') as f:
      f.write('\n' + report)


if __name__ == '__main__':
  main()
