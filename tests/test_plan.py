"""The run plan: every 'auto' decided once per backend and device count, the configs it
refuses, the line it prints, and that no other module asks JAX which backend it runs on."""

import pathlib
import re

import pytest

from conftest import REPO, base_config
from flax_mnist import plan as plan_lib
from flax_mnist.errors import ConfigError


def _conv(backend, in_features, **overrides):
  return plan_lib.conv_impl(base_config(**overrides), backend, in_features)


def test_auto_conv_per_backend_and_layer():
  # CPU: Winograd for float32 layers with several input channels and a 3x3 or 5x5 kernel.
  assert _conv('cpu', 32, kernel_size=3) == 'winograd'
  assert _conv('cpu', 32, kernel_size=5) == 'winograd'
  assert _conv('cpu', 1, kernel_size=3) == 'im2col_vjp'
  assert _conv('cpu', 32, kernel_size=4) == 'im2col_vjp'
  assert _conv('cpu', 32, kernel_size=3, dtype='bfloat16') == 'im2col_vjp'
  assert _conv('gpu', 32, kernel_size=3) == 'xla'
  # A 1-channel first layer: im2col's 9-channel matmul beats cuDNN on GPU (not known for TPU).
  assert _conv('gpu', 1) == 'im2col'
  assert _conv('gpu', 32) == 'xla'
  assert _conv('tpu', 1) == 'xla' and _conv('tpu', 32) == 'xla'
  assert _conv('cpu', 32, conv_impl='xla') == 'xla'
  assert _conv('gpu', 1, conv_impl='winograd') == 'winograd'  # A named choice is kept as is.


@pytest.mark.parametrize('backend, conv1, conv2', [('cpu', 'im2col_vjp', 'winograd'),
                                                   ('gpu', 'im2col', 'xla'),
                                                   ('tpu', 'xla', 'xla')])
def test_plan_holds_each_layers_conv(backend, conv1, conv2):
  plan = plan_lib.make(base_config(), backend, 1)
  assert (plan.conv1, plan.conv2) == (conv1, conv2)


def _micro(backend, devices, **overrides):
  return plan_lib.make(base_config(**overrides), backend, devices).micro_batch


def test_auto_micro_batch_size():
  assert _micro('cpu', 1) == 50  # auto: winograd conv2 on CPU.
  assert _micro('cpu', 1, kernel_size=5) == 50
  # Wider Winograd layers: fewer examples, so that their tiles stay in the cache (30 -> 25 and
  # 16 -> 10, the largest divisors of 500); narrower ones keep 50.
  assert _micro('cpu', 1, conv2_features=128) == 25
  assert _micro('cpu', 1, conv2_features=256) == 10
  assert _micro('cpu', 1, conv2_features=32, conv1_features=16) == 50
  assert _micro('cpu', 4) == 100  # 200 -> 100: 200 does not divide 500.
  assert _micro('cpu', 1, conv_impl='im2col_vjp') == 20
  assert _micro('cpu', 1, conv_impl='im2col_vjp', kernel_size=5) == 10
  # 84 would be 20 (40, 60, 80 do not divide 500): the batch is padded to 6 x 84 instead.
  assert _micro('cpu', 4, conv_impl='im2col_vjp') == 84
  # bfloat16 and kernel sizes without a Winograd transform: im2col_vjp's sizes.
  assert _micro('cpu', 1, dtype='bfloat16') == 20
  assert _micro('cpu', 1, kernel_size=4) == 10
  assert _micro('cpu', 1, conv_impl='im2col') == 10
  assert _micro('cpu', 1, conv_impl='im2col', kernel_size=5) == 5
  assert _micro('gpu', 1) == 500
  assert _micro('cpu', 1, conv_impl='xla') == 500
  assert _micro('cpu', 1, micro_batch_size=50) == 50


def test_micro_batch_counts():
  plan = plan_lib.make(base_config(), 'cpu', 1)  # Batches 500 and 1000, micro-batches of 50.
  assert (plan.train_micro_batches, plan.eval_micro_batches) == (10, 20)
  plan = plan_lib.make(base_config(), 'gpu', 1)  # Whole batches.
  assert (plan.train_micro_batches, plan.eval_micro_batches) == (1, 1)


def test_train_and_eval_batches_get_their_own_micro_batch():
  """Their common divisors can be far smaller than either's best (8 for 128 and 1000), and
  micro-batches that small make the steps slower (benchmarks/RESULTS.md)."""
  plan = plan_lib.make(base_config(batch_size=128), 'cpu', 1)
  assert (plan.micro_batch, plan.train_micro_batches) == (32, 4)
  assert (plan.eval_micro_batch, plan.eval_micro_batches) == (50, 20)
  assert 'micro-batch 32 (4 per train batch), eval 50 (20 per eval batch), ' in plan.line()
  plan = plan_lib.make(base_config(batch_size=100, eval_batch_size=7), 'cpu', 1)
  assert (plan.micro_batch, plan.eval_micro_batch) == (50, 7)
  plan = plan_lib.make(base_config(batch_size=128), 'cpu', 8)  # 16 rows a device: one each.
  assert (plan.micro_batch, plan.eval_micro_batch) == (128, 200)
  # An explicit size is both (it must divide both batches).
  plan = plan_lib.make(base_config(batch_size=128, micro_batch_size=8), 'cpu', 1)
  assert (plan.micro_batch, plan.eval_micro_batch, plan.eval_micro_batches) == (8, 8, 125)
  # Every batch is whole micro-batches, on every backend (on GPU, batch 128 once split the eval
  # batch of 1000 into 7 micro-batches of the train batch's size: a reshape error).
  for backend, devices in (('cpu', 1), ('cpu', 3), ('cpu', 8), ('gpu', 1), ('tpu', 8)):
    for batch, evaluation in ((128, 1000), (500, 1000), (99, 7), (1000, 128), (64, 60)):
      plan = plan_lib.make(base_config(batch_size=batch, eval_batch_size=evaluation), backend,
                           devices)
      assert plan.micro_batch * plan.train_micro_batches == plan.train_batch, plan
      assert plan.eval_micro_batch * plan.eval_micro_batches == plan.eval_batch, plan


@pytest.mark.parametrize('devices, batch, rows, micro', [
    (1, 127, 129, 43),  # A prime: 3 micro-batches of 43 (2 rows masked), not 127 of 1.
    (1, 106, 108, 36),  # 2 x 53: 3 of 36, not 53 of 2.
    (3, 1000, 1008, 144),  # 1002 rows for 3 devices are 2 x 3 x 167: 7 of 144, not 167 of 6.
    (2, 131, 132, 66),
    (1, 128, 128, 32),  # A divisor at least half of the even split's size is kept.
    (1, 500, 500, 50), (8, 500, 504, 168), (1, 47, 47, 47)])
def test_a_batch_no_good_micro_batch_divides_is_padded_to_an_even_split(devices, batch, rows,
                                                                         micro):
  plan = plan_lib.make(base_config(batch_size=batch, eval_batch_size=batch), 'cpu', devices)
  assert (plan.train_batch, plan.train_padding, plan.micro_batch) == (rows, rows - batch, micro)
  assert (plan.eval_batch, plan.eval_micro_batch) == (rows, micro)
  assert micro % devices == 0 and micro <= 50 * devices
  masked = f'padded to {rows} ({rows - batch} masked row{"s" * (rows - batch > 1)})'
  assert (f', batch {masked}' in plan.line()) == (rows > batch)
  assert (f', eval batch {masked}' in plan.line()) == (rows > batch)
  # Off CPU, and with an explicit size, only the devices pad.
  assert plan_lib.make(base_config(batch_size=batch), 'gpu', devices).train_batch == (
      -(-batch // devices) * devices)
  explicit = plan_lib.make(base_config(batch_size=batch, eval_batch_size=batch,
                                       micro_batch_size=devices), 'cpu', devices)
  assert explicit.train_batch == -(-batch // devices) * devices


def test_pool_variant_follows_dtype():
  assert plan_lib.make(base_config(), 'cpu', 1).pool == 'fused_cpu'
  assert plan_lib.make(base_config(), 'gpu', 1).pool == 'fused'  # No conditional on GPU.
  assert plan_lib.make(base_config(dtype='bfloat16'), 'gpu', 1).pool == 'autodiff'


def test_inference_pools_in_winograd_tiles_only_for_3x3_float32_on_cpu():
  plan = plan_lib.make(base_config(), 'cpu', 1)
  assert plan.pool_in_tiles and not plan.pool_in_tiles_training  # XLA's Winograd.
  assert '(in conv2\'s tiles for inference)' in plan.line()
  for config, backend in [(base_config(kernel_size=5), 'cpu'), (base_config(), 'gpu'),
                          (base_config(dtype='bfloat16'), 'cpu'),
                          (base_config(conv_impl='im2col_vjp'), 'cpu')]:
    assert not plan_lib.make(config, backend, 1).pool_in_tiles


def test_training_stores_the_pooled_output_only_for_3x3_winograd_on_cpu_one_lane_a_pass():
  for config, devices in [(base_config(), 1), (base_config(), 4),
                          (base_config(num_models=3), 1),  # lax.map: one lane a pass.
                          (base_config(conv_dropout=0.0), 1)]:
    assert plan_lib.make(config, 'cpu', devices).pooled_stored, config
    assert 'pooled output stored in training' in plan_lib.make(config, 'cpu', devices).line()
  for config, backend in [(base_config(kernel_size=5), 'cpu'), (base_config(), 'gpu'),
                          (base_config(), 'tpu'), (base_config(dtype='bfloat16'), 'cpu'),
                          (base_config(conv_impl='im2col_vjp'), 'cpu'),
                          (base_config(num_models=3, lanes_per_pass=3), 'cpu')]:
    assert not plan_lib.make(config, backend, 1).pooled_stored, config
    assert 'pooled output stored' not in plan_lib.make(config, backend, 1).line()
  assert not plan_lib.make(base_config(), 'cpu', 4, 2).pooled_stored  # Not measured.


def _native(config, backend='cpu', devices=1, processes=1, unavailable=''):
  return plan_lib.make(config, backend, devices, processes, unavailable)


@pytest.mark.parametrize('kernel_size', [3, 5])
def test_the_cpp_kernels_take_winograd_on_one_cpu_device_where_they_build(kernel_size):
  """With conv1 inside them, they pool in their tiles, for inference and in training, in
  micro-batches of 125, at both kernel sizes (each measured faster there:
  benchmarks/RESULTS.md); nothing else stores the pooled output."""
  plan = _native(base_config(kernel_size=kernel_size))
  assert (plan.conv1, plan.conv2) == ('direct_native', 'winograd_native')
  assert plan.pool_in_tiles and plan.pool_in_tiles_training and not plan.pooled_stored
  assert (plan.micro_batch, plan.eval_micro_batch) == (125, 125)
  assert ('conv1 direct_native, conv2 winograd_native, pool fused_cpu (in conv2\'s tiles), '
          'micro-batch 125 (4 per train batch, 8 per eval batch)') in plan.line()
  # Wider layers, fewer examples (as with XLA's Winograd); an explicit choice as asked.
  assert _native(base_config(kernel_size=kernel_size, conv2_features=128)).micro_batch == 50
  explicit = _native(base_config(kernel_size=kernel_size, conv_impl='winograd_native'))
  assert (explicit.conv1, explicit.conv2) == ('direct_native', 'winograd_native')
  bfloat16 = _native(base_config(kernel_size=kernel_size, conv_impl='winograd_native',
                                 dtype='bfloat16'))
  assert bfloat16.conv1 == 'winograd_native' and not bfloat16.pool_in_tiles_training
  # Where Winograd is not chosen, or on several devices or processes: as without them.
  for config, backend, devices, processes in [
      (base_config(kernel_size=kernel_size, dtype='bfloat16'), 'cpu', 1, 1),
      (base_config(kernel_size=kernel_size), 'gpu', 1, 1),
      (base_config(kernel_size=kernel_size), 'cpu', 2, 1),
      (base_config(kernel_size=kernel_size), 'cpu', 2, 2),
      (base_config(kernel_size=kernel_size, conv_impl='winograd'), 'cpu', 1, 1)]:
    with_them = _native(config, backend, devices, processes)
    assert with_them == plan_lib.make(config, backend, devices, processes), config
    assert with_them.conv2 != 'winograd_native'


def test_without_the_cpp_kernels_the_plan_line_says_why():
  plan = _native(base_config(), unavailable='no C++ compiler found (install g++ or set CXX)')
  assert plan.conv2 == 'winograd'
  assert ('conv2 winograd (C++ kernels unavailable: no C++ compiler found (install g++ or set '
          'CXX)), pool') in plan.line()
  assert plan_lib.make(base_config(), 'cpu', 1).conv_note == ''  # Not checked: no note.
  assert _native(base_config(), devices=2, unavailable='no compiler').conv_note == ''


@pytest.mark.parametrize('backend, devices, unavailable, expected', [
    ('cpu', 1, 'no C++ compiler found (install g++ or set CXX)',
     'config.conv_impl=winograd_native: no C++ compiler found (install g++ or set CXX); use '
     'conv_impl=winograd.'),
    ('gpu', 1, '', 'config.conv_impl=winograd_native runs its C++ kernels on CPU only; use '
                   'conv_impl=winograd.'),
    ('cpu', 2, '', 'runs its C++ kernels on one device (XLA cannot split them over 2 devices)'),
])
def test_asking_for_the_cpp_kernels_where_they_cannot_run(backend, devices, unavailable,
                                                          expected):
  with pytest.raises(ConfigError, match=re.escape(expected)):
    _native(base_config(conv_impl='winograd_native'), backend, devices, 1, unavailable)
  with pytest.raises(ConfigError, match='winograd_native has no transform for kernel_size=4'):
    _native(base_config(conv_impl='winograd_native', kernel_size=4))


@pytest.mark.parametrize('backend, devices, processes, expected', [
    ('gpu', 1, 1, True), ('tpu', 4, 1, True), ('cpu', 1, 1, False), ('cpu', 4, 1, False),
    ('gpu', 4, 2, False), ('tpu', 4, 4, False)])
def test_auto_device_data_on_accelerators_with_one_process(backend, devices, processes,
                                                           expected):
  plan = plan_lib.make(base_config(), backend, devices, processes)
  assert plan.device_data is expected


def test_device_data_on_and_off_override_auto():
  assert plan_lib.make(base_config(device_data='on'), 'cpu', 1).device_data is True
  assert plan_lib.make(base_config(device_data='off'), 'gpu', 1).device_data is False
  assert plan_lib.make(base_config(device_data='on'), 'gpu', 4, 2).device_data is True


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_batches_the_devices_do_not_divide_are_padded(backend):
  plan = plan_lib.make(base_config(eval_batch_size=900), backend, 8)  # The seed's 500 on 8.
  # 904 rows are 8 x 113: on CPU, where no good micro-batch divides them, 3 x 304.
  assert (plan.train_batch, plan.train_padding, plan.eval_batch) == (
      504, 4, 912 if backend == 'cpu' else 904)
  assert plan.micro_batch % 8 == 0 and 504 % plan.micro_batch == 0
  assert 'batch padded to 504 (4 masked rows)' in plan.line()
  plan = plan_lib.make(base_config(), backend, 4)
  assert (plan.train_batch, plan.train_padding, plan.eval_batch) == (500, 0, 1000)
  assert 'padded' not in plan.line()


def test_an_explicit_micro_batch_must_split_over_devices_and_divide_the_batches():
  with pytest.raises(ConfigError,
                     match='config.micro_batch_size=20 is not divisible by the 8 devices'):
    plan_lib.make(base_config(micro_batch_size=20), 'cpu', 8)
  with pytest.raises(ConfigError, match=r'config.micro_batch_size=16 must divide the train '
                     r'and eval batches \(504 and 1000 rows on 8 devices\)'):
    plan_lib.make(base_config(micro_batch_size=16), 'cpu', 8)
  with pytest.raises(ConfigError, match=r'config.micro_batch_size=30 must divide the train '
                     r'and eval batches \(500 and 1000 rows on 1 device\)'):
    plan_lib.make(base_config(micro_batch_size=30), 'cpu', 1)
  assert plan_lib.make(base_config(micro_batch_size=8), 'cpu', 8).train_micro_batches == 63


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_winograd_needs_a_kernel_size_it_has_a_transform_for(backend):
  with pytest.raises(ConfigError, match='conv_impl=winograd has no transform for kernel_size=4'):
    plan_lib.make(base_config(conv_impl='winograd', kernel_size=4), backend, 1)
  plan_lib.make(base_config(conv_impl='winograd', kernel_size=5), backend, 1)
  # auto never picks Winograd where it cannot run.
  assert plan_lib.make(base_config(kernel_size=4), 'cpu', 1).conv2 == 'im2col_vjp'


def test_line_names_every_decision():
  line = plan_lib.make(base_config(), 'cpu', 1).line()
  assert line.startswith('Plan: cpu x1 - ')
  for part in ('conv1 im2col_vjp', 'conv2 winograd',
               "pool fused_cpu (in conv2's tiles for inference), pooled output stored in training",
               'micro-batch 50',
               '10 per train batch', '20 per eval batch', 'host-fed'):
    assert part in line, (part, line)
  line = plan_lib.make(base_config(), 'gpu', 4, 2).line()
  assert 'gpu x4 on 2 processes' in line and 'host-fed' in line
  assert 'device-resident data' in plan_lib.make(base_config(), 'gpu', 1).line()


def test_to_dict_holds_every_field():
  plan = plan_lib.make(base_config(), 'cpu', 1)
  assert plan_lib.Plan(**plan.to_dict()) == plan


def test_only_the_plan_asks_jax_for_the_backend():
  """Every backend-dependent choice goes through the plan, so it is printed and checkpointed."""
  package = REPO / 'flax_mnist'
  callers = sorted(str(path.relative_to(package)) for path in package.rglob('*.py')
                   if re.search(r'\bdefault_backend\s*\(', path.read_text()))
  assert callers == ['plan.py']
  assert pathlib.Path(plan_lib.__file__).resolve() == package / 'plan.py'
