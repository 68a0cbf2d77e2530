"""The command line, end to end, on a small subset of the real data."""

import json
import os
import subprocess
import sys

from conftest import REPO
from flax_mnist.reporting import jsonl


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', 'flax_mnist.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_trains_and_writes_metrics(tmp_path, prepared_data_dir, mnist_dir):
  workdir = tmp_path / 'run'
  result = _run('--config', 'configs/base.py', f'--workdir={workdir}',
                f'--config.data_dir={prepared_data_dir}', f'--config.idx_dir={mnist_dir}',
                '--config.train_split=train[:1000]', '--config.eval_split=test[:300]',
                '--config.num_epochs=2', '--config.eval_batch_size=200')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Total params: 1,199,882' in result.stdout
  assert 'Epoch 2/2 - 1000 samples - ' in result.stdout
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [row['epoch'] for row in rows] == [1, 2]
  for row in rows:
    assert tuple(row) == jsonl.METRIC_KEYS
    assert 0 <= row['val_accuracy'] <= 1 and row['loss'] > 0 and row['samples_per_second'] > 0


def test_unknown_override_fails_before_work(tmp_path):
  result = _run('--config', 'configs/base.py', f'--workdir={tmp_path / "w"}',
                '--config.batch_sise=10', timeout=120)
  assert result.returncode != 0
  assert 'batch_sise' in result.stderr
  assert not (tmp_path / 'w').exists()


def test_invalid_value_is_one_line(tmp_path):
  result = _run('--config', 'configs/base.py', f'--workdir={tmp_path / "w"}',
                '--config.kernel_size=20', timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.kernel_size=20 is invalid: must be between 1 and 14 (two valid convs and a '
      '2x2 pool must fit in 28x28).')
  assert not (tmp_path / 'w').exists()


def test_config_files_that_fail_and_stray_arguments_are_one_line(tmp_path):
  """A get_config that raises (ml_collections wraps its traceback in absl's error), a file
  without one, a stray argument (absl would print the whole --help first), and a flag of
  another mode."""
  slip = tmp_path / 'slip.py'
  slip.write_text('from flax_mnist import schema\n\n\ndef get_config():\n'
                  '  config = schema.defaults()\n  config.num_epochs = 2.0\n  return config\n')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  cases = [
      (['--config', str(slip)], f"error: cannot load config file '{slip}' (TypeError: Could not "
       "override field 'num_epochs' (reference). 2.0 is of original type <class 'float'> and "
       "cannot be casted to type <class 'int'>); pass e.g. --config configs/base.py."),
      (['--config', 'configs/base.py:extra'], "error: cannot load config file "
       "'configs/base.py:extra' (TypeError: get_config() takes 0 positional arguments but 1 was "
       "given); pass e.g. --config configs/base.py."),
      (['--config', str(tmp_path / 'empty.py')], f"error: config file '{tmp_path / 'empty.py'}' "
       'defines no get_config(); define one that returns the config, as configs/base.py does.'),
      (['--config', 'configs/base.py', 'extra', 'words'], 'error: unexpected arguments: extra '
       'words; flags take the form --NAME=VALUE (config fields --config.FIELD=VALUE).'),
      (['--config', 'configs/base.py', '--step=10'], 'error: --step applies to --mode=eval, '
       'export, predict or report, not --mode=train; drop it.'),  # Else: resumes the newest.
      (['--config', 'configs/base.py', '--mode=eval', '--invert'], 'error: --invert applies to '
       '--mode=predict, not --mode=eval; drop it.'),
      (['--config', 'configs/base.py', '--lane=0'], 'error: --lane applies to --mode=eval, '
       'export, predict or report, not --mode=train; drop it.'),
  ]
  for args, expected in cases:
    result = _run(*args, f'--workdir={tmp_path / "w"}', timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [expected], (
        args, result.stderr[-2000:])
  assert not (tmp_path / 'w').exists()
