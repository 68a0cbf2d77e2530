"""notebooks/colab_tpu.ipynb: valid nbformat v4, public CLI only, flags that main accepts.

The Colab-only parts (TPU, Drive, download) cannot run here; the device probe cell runs for
real, and every `python -m flax_mnist.main` line is parsed by main's own flag parser, config
validation and run plan for 1 and 8 TPU devices: the seed's batch of 500 on every TPU type.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import nbformat

from conftest import REPO, base_config

NOTEBOOK = REPO / 'notebooks' / 'colab_tpu.ipynb'
# What the notebook's {NAME} placeholders stand for in IPython's ! lines, here.
_VALUES = {'WORKDIR': '/content/drive/MyDrive/flax_mnist/workdir/base', 'REPO_DIR': str(REPO)}
# The padding on a v2-8's 8 cores, as the plan line prints it and the notebook quotes it.
_PADDED = 'batch padded to 504 (4 masked rows)'


def _notebook():
  return nbformat.read(str(NOTEBOOK), as_version=nbformat.NO_CONVERT)


def _code_cells():
  return [cell for cell in _notebook().cells if cell.cell_type == 'code']


def _main_invocations():
  """The argument lists of every `!python -m flax_mnist.main ...` line, placeholders filled."""
  calls = []
  for cell in _code_cells():
    for line in cell.source.splitlines():
      if 'flax_mnist.main' in line:
        line = re.sub(r'\{(\w+)\}', lambda m: _VALUES[m.group(1)], line)
        words = shlex.split(line)
        assert words[:3] == ['!python', '-m', 'flax_mnist.main'], line
        calls.append(words[3:])
  return calls


def test_valid_nbformat_v4():
  notebook = _notebook()
  assert notebook.nbformat == 4
  nbformat.validate(notebook)
  assert notebook.metadata.accelerator == 'TPU'
  assert notebook.metadata.kernelspec.name == 'python3'
  assert all(cell.outputs == [] and cell.execution_count is None for cell in _code_cells())


def test_matches_its_generator():
  sys.path.insert(0, str(REPO / 'notebooks'))
  try:
    import make_colab_tpu
  finally:
    sys.path.pop(0)
  assert json.loads(nbformat.writes(make_colab_tpu.build())) == json.loads(NOTEBOOK.read_text())


def test_code_uses_only_the_public_cli():
  code = '\n'.join(cell.source for cell in _code_cells())
  assert 'colab_tpu' not in code and 'setup_tpu' not in code
  assert not re.search(r'\b(import|from)\s+flax_mnist', code)
  # Any other mention of the package is a path or the repository URL.
  assert set(re.findall(r'flax_mnist\.(\w+)', code)) <= {'main', 'git'}
  assert 'import jax' not in code.replace("'import jax;", '')  # Only in the probe process.
  for needed in ('drive.mount(', 'files.download(', '"jax[tpu]"', 'REPO_URL'):
    assert needed in code


def test_steps_train_eval_export_on_drive():
  calls = _main_invocations()
  modes = [next((a.split('=', 1)[1] for a in args if a.startswith('--mode=')), 'train')
           for args in calls]
  assert modes == ['train', 'eval', 'export']
  for args in calls:
    assert args[:2] == ['--config', 'configs/base.py']
    assert f'--workdir={_VALUES["WORKDIR"]}' in args
  assert '--output=/content/keras_cnn.h5' in calls[2]
  assert "files.download('/content/keras_cnn.h5')" in _code_cells()[-1].source


def test_batch_is_the_configs_on_every_tpu_type():
  """No batch size of the notebook's own: the config's 500 everywhere, padded by the program."""
  text = '\n'.join(cell.source for cell in _notebook().cells)
  assert 'BATCH_SIZE' not in text and 'batch_size' not in text
  assert not any(arg.startswith('--config.') for args in _main_invocations() for arg in args)
  devices_md = next(cell.source for cell in _notebook().cells if cell.id == 'devices-md')
  assert f'`{_PADDED}`' in devices_md
  drive_md = next(cell.source for cell in _notebook().cells if cell.id == 'drive-md')
  assert 'another TPU type' in drive_md and 'Keep the TPU type the same' not in drive_md


_PARSE = '''
import sys
from absl import flags
from flax_mnist import main, plan, schema
main.parse_flags(['flax_mnist.main'] + sys.argv[1:])
config = flags.FLAGS.config
schema.validate(config)
print(flags.FLAGS.mode, config.batch_size, flags.FLAGS.workdir)
for devices in (1, 8):  # v5e-1 and v6e-1; v2-8.
  print(plan.make(config, 'tpu', devices).line())
'''


def test_cli_flags_exist_and_config_is_valid_on_1_and_8_devices():
  """main's own parser accepts each line; they train with the config's batch of 500, which the
  plan for a v2-8's 8 cores pads to 504 (4 masked rows) and 1 TPU device takes as is."""
  batch = base_config().batch_size
  assert batch == 500
  env = dict(os.environ, PYTHONPATH=str(REPO))
  processes = [subprocess.Popen([sys.executable, '-c', _PARSE, *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for args in _main_invocations()]  # In parallel: each one imports jax.
  for process, mode in zip(processes, ['train', 'eval', 'export']):
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    parsed, one, eight = out.splitlines()
    assert parsed.split() == [mode, str(batch), _VALUES['WORKDIR']]
    assert one.startswith('Plan: tpu x1 ') and 'padded' not in one
    assert eight.startswith('Plan: tpu x8 ') and eight.endswith(f', {_PADDED}')


def test_device_cell_runs_here(monkeypatch, capsys):
  """The probe cell is plain Python: run it on 8 (forced) CPU devices, like a v2-8's cores. It
  only shows them: no batch size to pick."""
  devices = 8
  monkeypatch.setenv('XLA_FLAGS', f'--xla_force_host_platform_device_count={devices}')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  cell = next(cell for cell in _code_cells() if cell.id == 'devices')
  namespace = {}
  exec(compile(cell.source, 'devices', 'exec'), namespace)  # pylint: disable=exec-used
  assert 'BATCH_SIZE' not in namespace
  listed, counted = capsys.readouterr().out.splitlines()
  assert listed.startswith('[') and listed.count('CpuDevice') == devices, listed
  assert counted == f'{devices} devices'
