"""notebooks/colab_tpu.ipynb: valid nbformat v4, public CLI only, flags that main accepts.

The Colab-only parts (TPU, Drive, download) cannot run here; the device probe cell runs for
real, and every `python -m flax_mnist.main` line is parsed by main's own flag parser and
config validation.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import nbformat

from conftest import REPO

NOTEBOOK = REPO / 'notebooks' / 'colab_tpu.ipynb'
# What the notebook's {NAME} placeholders stand for in IPython's ! lines, here.
_VALUES = {'WORKDIR': '/content/drive/MyDrive/flax_mnist/workdir/base', 'BATCH_SIZE': '504',
           'REPO_DIR': str(REPO)}


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


_PARSE = '''
import sys
from absl import flags
from flax_mnist import configuration, main
main.parse_flags(['flax_mnist.main'] + sys.argv[2:])
configuration.validate(flags.FLAGS.config, int(sys.argv[1]))
print(flags.FLAGS.mode, flags.FLAGS.config.batch_size, flags.FLAGS.workdir)
'''


def test_cli_flags_exist_and_config_is_valid_on_8_devices():
  """main's own parser accepts each line; the batch size they use suits a v2-8's 8 cores."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  processes = [subprocess.Popen([sys.executable, '-c', _PARSE, '8', *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for args in _main_invocations()]  # In parallel: each one imports jax.
  for process, mode in zip(processes, ['train', 'eval', 'export']):
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert out.split() == [mode, '504', _VALUES['WORKDIR']]


def test_device_cell_runs_here(monkeypatch, capsys):
  """The probe cell is plain Python: run it on 8 (forced) CPU devices, like a v2-8's cores."""
  devices, batch = 8, 504
  monkeypatch.setenv('XLA_FLAGS', f'--xla_force_host_platform_device_count={devices}')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  cell = next(cell for cell in _code_cells() if cell.id == 'devices')
  namespace = {}
  exec(compile(cell.source, 'devices', 'exec'), namespace)  # pylint: disable=exec-used
  assert (namespace['N_DEVICES'], namespace['BATCH_SIZE']) == (devices, batch)
  assert f'{devices} devices, batch size {batch}' in capsys.readouterr().out
