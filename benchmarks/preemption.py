"""How long a preempted run takes from SIGTERM to exit, checkpoint written (the grace period).

  python benchmarks/preemption.py --idx_dir=../shared/data/mnist [--config=configs/base.py]

Starts `python -m flax_mnist.main` on the config in a fresh workdir, sends SIGTERM `--after`
seconds into epoch 1 (mid-epoch), and reports the seconds from the signal to the process's exit
(which includes finishing the current step and writing its checkpoint), the exit code and the
checkpoint's step. Cloud spot VMs and Kubernetes give 30 s before SIGKILL.
"""

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(config: str, idx_dir: str, after: float, workdir: str) -> dict:
  command = [sys.executable, '-m', 'flax_mnist.main', '--config', config,
             f'--config.idx_dir={idx_dir}', f'--workdir={workdir}', '--config.num_epochs=2',
             f'--config.data_dir={workdir}/tfds']
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
  for line in process.stdout:
    if line.startswith('Compiled in'):
      break
  time.sleep(after)
  process.send_signal(signal.SIGTERM)
  sent = time.perf_counter()
  _, stderr = process.communicate(timeout=600)
  seconds = time.perf_counter() - sent
  steps = sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir()
                 if p.name.isdigit())
  return dict(seconds=seconds, exit_code=process.returncode, checkpoints=steps,
              last_line=stderr.strip().splitlines()[-1] if stderr.strip() else '')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/base.py')
  parser.add_argument('--idx_dir', required=True)
  parser.add_argument('--after', type=float, default=5.0,
                      help='seconds into epoch 1 to send SIGTERM')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    result = measure(args.config, str(pathlib.Path(args.idx_dir).resolve()), args.after,
                     workdir)
  print(f"SIGTERM -> exit: {result['seconds']:.2f} s, exit code {result['exit_code']}, "
        f"checkpoints {result['checkpoints']}\n{result['last_line']}")


if __name__ == '__main__':
  main()
