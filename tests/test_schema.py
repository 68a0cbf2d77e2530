"""The config schema: shipped configs pass, every bad field fails with a one-line error, and
every place that lists fields (configs, README, resume rules, --mode=config) derives from it."""

import re

import ml_collections
import pytest

from configs import base, k5_nodropout
from conftest import REPO, run_python
from flax_mnist import schema
from flax_mnist.errors import ConfigError


def test_shipped_configs_are_valid():
  schema.validate(base.get_config())
  schema.validate(k5_nodropout.get_config())


def test_base_is_the_schema_defaults_and_the_seed_first_run():
  config = base.get_config()
  assert config.to_dict() == {f.name: f.default for f in schema.FIELDS}
  assert (config.kernel_size, config.batch_size, config.num_epochs) == (3, 500, 20)
  assert (config.conv_dropout, config.dense_dropout, config.adam_eps) == (0.25, 0.5, 1e-7)


def test_k5_is_the_seed_second_run():
  config = k5_nodropout.get_config()
  assert (config.kernel_size, config.conv_dropout, config.dense_dropout) == (5, 0.0, 0.0)
  assert config.batch_size == 500 and config.num_epochs == 20


def test_every_field_is_declared_once_with_a_meaning():
  names = [f.name for f in schema.FIELDS]
  assert len(names) == len(set(names))
  for field in schema.FIELDS:
    assert field.meaning and (field.check is None or field.valid), field.name
    if field.check is not None:
      assert field.check(field.default), field.name


@pytest.mark.parametrize('field, value, message', [
    ('batch_size', 0, 'config.batch_size=0 is invalid: must be a positive integer'),
    ('num_epochs', -1, 'config.num_epochs=-1 is invalid'),
    ('kernel_size', 15, 'config.kernel_size=15 is invalid: must be between 1 and 14'),
    ('conv_dropout', 1.0, r'config.conv_dropout=1.0 is invalid: must be in \[0, 1\)'),
    ('conv_impl', 'fft',
     'config.conv_impl=.fft. is invalid: must be one of auto, im2col, im2col_vjp, winograd, '
     'winograd_native, '
     'xla'),
    ('learning_rate', 0.0,
     'config.learning_rate=0.0 is invalid: must be a positive finite number'),
    ('learning_rate', float('inf'), 'config.learning_rate=inf is invalid'),
    ('seed', -1, 'config.seed=-1 is invalid: must be an integer from 0 to 4294967295'),
    ('seed', 2**32, 'config.seed=4294967296 is invalid'),  # JAX would use seed 0's key.
])
def test_bad_values(field, value, message):
  config = base.get_config()
  config[field] = value
  with pytest.raises(ConfigError, match=message):
    schema.validate(config)


def test_lane_seeds_stay_in_range():
  config = base.get_config()
  config.seed, config.num_models = schema.MAX_SEED - 1, 2
  schema.validate(config)  # Lanes draw from MAX_SEED - 1 and MAX_SEED.
  config.num_models = 3
  with pytest.raises(ConfigError, match='config.seed=4294967294 with num_models=3 gives lane '
                     'seeds above 4294967295; lower config.seed.'):
    schema.validate(config)


def test_wrong_type():
  config = base.get_config().to_dict()
  config['batch_size'] = '500'
  with pytest.raises(ConfigError, match="config.batch_size='500' must be int"):
    schema.validate(ml_collections.ConfigDict(config))


def test_unknown_field():
  config = base.get_config()
  config.batch_sise = 100
  with pytest.raises(ConfigError, match='unknown config field.*batch_sise'):
    schema.validate(config)


def test_resume_differences_ignore_resumable_fields_and_default_missing_ones():
  saved = base.get_config().to_dict()
  current = dict(saved, num_epochs=30, conv_impl='xla', micro_batch_size=100, kernel_size=5)
  assert schema.resume_differences(saved, current) == ['kernel_size: 3 -> 5']
  older = {k: v for k, v in saved.items() if k != 'dtype'}  # Written before dtype existed.
  assert schema.resume_differences(older, saved) == []
  assert schema.resume_differences(older, dict(saved, dtype='bfloat16')) == [
      "dtype: 'float32' -> 'bfloat16'"]


def test_a_sweep_is_compared_by_its_grid_not_its_spelling():
  saved = dict(base.get_config().to_dict(), sweep='learning_rate=1e-3,3e-3; dense_dropout=0.25')
  for same in ('learning_rate=1e-3,3e-3;dense_dropout=0.25',
               ' learning_rate = 0.001, 0.003 ; dense_dropout=.25 ;'):
    assert schema.resume_differences(saved, dict(saved, sweep=same)) == []
  for other in ('learning_rate=3e-3,1e-3; dense_dropout=0.25',  # Another lane order.
                'dense_dropout=0.25; learning_rate=1e-3,3e-3'):
    assert schema.resume_differences(saved, dict(saved, sweep=other)) == [
        f"sweep: {saved['sweep']!r} -> {other!r}"]


def test_reading_a_checkpoint_ignores_how_it_was_trained():
  """eval, export, predict and report need the model's fields, not the training command's."""
  saved = base.get_config().to_dict()
  trained_otherwise = dict(saved, batch_size=100, train_split='train[:1000]', learning_rate=3e-3,
                           adam_b1=0.8, adam_b2=0.99, adam_eps=1e-8, seed=7, dtype='bfloat16',
                           conv_dropout=0.1, dense_dropout=0.2)
  assert schema.resume_differences(saved, trained_otherwise, training=False) == []
  assert len(schema.resume_differences(saved, trained_otherwise)) == 10  # To train on: all.
  for field, value in (('kernel_size', 5), ('conv2_features', 32), ('num_models', 2),
                       ('dataset', 'fashion_mnist'), ('sweep', 'learning_rate=1e-3,3e-3')):
    assert schema.resume_differences(saved, dict(saved, **{field: value}), training=False) == [
        f'{field}: {saved[field]!r} -> {value!r}']


def test_readme_table_is_the_schema():
  text = (REPO / 'README.md').read_text()
  found = re.search(r'<!-- config table: generated by python -m flax_mnist.schema -->\n(.*?)\n'
                    r'<!-- end of config table -->', text, re.S)
  assert found, 'README.md lacks the config table markers'
  assert found.group(1).strip() == schema.markdown_table(), (
      'README.md config table differs from the schema: paste the output of '
      '`python -m flax_mnist.schema` between the markers.')


def _main_without_jax(*args):
  """Runs python -m flax_mnist.main ARGS; fails unless it ended without importing JAX."""
  code = f'''
import runpy, sys
sys.argv = ['main', *{list(args)!r}]
try:
  runpy.run_module('flax_mnist.main', run_name='__main__')
except SystemExit:
  pass
assert 'jax' not in sys.modules, 'jax was imported'
print('NO JAX')
'''
  result = run_python(code)
  assert result.returncode == 0 and 'NO JAX' in result.stdout, result.stderr[-2000:]
  return result


def test_help_imports_no_jax():
  assert '--mode' in _main_without_jax('--help').stdout


def test_config_mode_lists_every_field_without_jax():
  out = _main_without_jax('--config', 'configs/base.py', '--mode=config', '--config.seed=7').stdout
  assert 'seed                = 7' in out and 'learning_rate       = 0.001' in out
  assert len([line for line in out.splitlines() if ' = ' in line]) == len(schema.FIELDS)
