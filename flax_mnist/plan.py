"""The run plan: every 'auto' in the config decided once, from the backend and device count.

`decide` runs once per process, after jax.distributed starts and before anything is built; its
frozen `Plan` is printed as one line, passed to the model, the steps and the epoch engine, and
stored in each checkpoint's metadata. No other module asks JAX which backend it runs on. The
policy (measured in benchmarks/RESULTS.md, explained in docs/performance.md):

- conv: on CPU, Winograd F(4x4, k x k) for layers with several input channels (float32, k = 3
  or 5): in C++ kernels (ops/winograd_native.cc) on one device where they build, else
  computed by XLA (ops/winograd.py), the plan line saying why; other layers im2col with a
  written backward, or with the C++ kernels the first layer as a direct convolution inside
  them (conv1 direct_native: it writes conv2's input, conv2's backward kernel takes its
  gradients). On GPU im2col for the 1-channel first layer, XLA's (cuDNN) for the rest;
  XLA's on TPU.
- micro-batches (CPU only): gradients summed over micro-batches whose activations stay in the
  cache: 50 examples per device with XLA's Winograd conv2 of the seed's widths, 125 with the C++
  kernels (fewer for wider layers); with im2col, as many as keep conv2's patches within a byte
  budget; at most that, and the most that divides the batch, for the train and the eval batch each
  (batch 128 with eval batch 1000: 32 and 50, not their common 8). A batch with no such divisor
  near the size is padded to an even split instead (127: 3 micro-batches of 43, 2 rows masked).
  Elsewhere the whole batch.
- pool: float32 uses the fused ReLU+max-pool with TensorFlow's gradient (on CPU the variant
  whose backward pass stores its pooled-size work, which XLA's CPU fusion would recompute);
  bfloat16 the same values differentiated by JAX (faster there on GPU). For inference on CPU
  in float32 with a 3x3 Winograd conv2, conv2's bias, ReLU and pool are taken in its tiles
  (pool_in_tiles; at 5x5 that measured slower with XLA's Winograd, faster with the C++
  kernels). The C++ kernels take them in the tiles in training too, the backward kernel
  reading the pooled gradient (pool_in_tiles_training). With XLA's 3x3 Winograd, in one
  process and one lane a pass, training computes the ReLU, pool and conv dropout in a pass of
  their own and stores them (pooled_stored; at 5x5 no gain).
- device-resident data: on for GPU/TPU with one process (a step there is too short to feed
  from the host), off on CPU.
- padding: a batch that the device count does not divide is padded to the next multiple with
  masked rows that change nothing computed (batch 500 on 8 devices: 504 rows, 4 masked); on
  CPU also a batch that no good micro-batch size divides (above).
- lanes (config.num_models, config.sweep): all trained by one step; on CPU one lane after
  another (each lane's micro-batches stay in the cache, as a single model's), elsewhere all
  lanes at once by jax.vmap (a small model leaves an accelerator mostly idle).
"""

import dataclasses

from flax_mnist import geometry
from flax_mnist import lanes as lanes_lib
from flax_mnist.errors import ConfigError
from flax_mnist.sharding import padded_size
from flax_mnist.ops.winograd import KERNEL_SIZES as WINOGRAD_KERNEL_SIZES
# Bytes of conv2 im2col patches per micro-batch and device on CPU, per implementation.
_CPU_PATCH_BYTES = {'im2col': 7_000_000, 'im2col_vjp': 14_000_000}
# Winograd conv2: examples per micro-batch and device on CPU at the seed's widths (32 channels
# in, 64 out). Its tile arrays grow with both widths, so wider layers get proportionally fewer
# examples (conv2 width 128: 25, 256: 10 measured 8-27% faster than 50; benchmarks/RESULTS.md).
_CPU_WINOGRAD_EXAMPLES, _CPU_WINOGRAD_CHANNELS = 50, 32 + 64
# With the C++ kernels, which keep a row of tiles or one image in cache whatever the
# micro-batch, larger micro-batches measured faster (the dense layer's weights are read and
# its gradient summed once per micro-batch): 100-250 alike, 5% faster than 50.
_CPU_NATIVE_EXAMPLES = 125
# Kernel sizes whose inference pools in Winograd's tiles: 5x5's 8x8 tiles make the one-pass
# sums (676 terms per tile and channel) slower than two passes (benchmarks/RESULTS.md).
_POOL_IN_TILES_KERNEL_SIZES = (3,)
# Kernel sizes whose training computes the ReLU, pool and conv dropout in a pass of their own
# on CPU: at 3x3 XLA fused them into a pass that wrote the flattened rows the dense layer
# reads, and that pass ran about five times slower than the same work written in NHWC;
# stored, the train step is ~7% faster. At 5x5 no gain (benchmarks/RESULTS.md).
_POOLED_STORED_KERNEL_SIZES = (3,)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this run computes: fixed for the run, independent of which process asks."""
  backend: str
  devices: int
  processes: int
  conv1: str  # Implementation of each convolution (flax_mnist/ops/conv.py).
  conv2: str
  conv_note: str  # Why conv2 is not on the C++ Winograd kernels where it would be ('' else).
  pool: str  # 'fused' (written gradient), 'fused_cpu' (the same, for CPU) or 'autodiff'.
  # Inference (eval, predict) takes conv2's bias, ReLU and pool in its Winograd tiles
  # (flax_mnist/ops/winograd.py conv_relu_max_pool) instead of after its output.
  pool_in_tiles: bool
  # Training does too, its gradient one kernel fed the pooled gradient (the C++ kernels,
  # flax_mnist/ops/winograd_native.py).
  pool_in_tiles_training: bool
  # Training computes conv2's ReLU, pool and dropout in a pass of their own and stores the
  # result (flax_mnist/ops/once.py) instead of in the pass that writes the flattened rows.
  pooled_stored: bool
  # Global rows per train step: config.batch_size and `train_padding` masked rows, added for
  # the devices or for whole micro-batches (batch_layout).
  train_batch: int
  train_padding: int
  eval_batch: int  # Global rows per eval step: config.eval_batch_size and `eval_padding`.
  eval_padding: int
  micro_batch: int  # Global rows per train micro-batch.
  train_micro_batches: int
  eval_micro_batch: int  # Global rows per eval micro-batch.
  eval_micro_batches: int
  device_data: bool
  lanes: int = 1  # Models trained together (flax_mnist/lanes.py).
  lanes_per_pass: int = 1  # Lanes computed at once by jax.vmap.

  def line(self) -> str:
    """The one line printed at start."""
    feed = 'device-resident data' if self.device_data else 'host-fed'
    hosts = f' on {self.processes} processes' if self.processes > 1 else ''
    lanes = (f', {self.lanes} lanes ({self.lanes_per_pass} per pass)' if self.lanes > 1
             else '')
    pool_notes = (' (in conv2\'s tiles)' if self.pool_in_tiles_training
                  else ' (in conv2\'s tiles for inference)' if self.pool_in_tiles else '')
    pool_notes += ', pooled output stored in training' if self.pooled_stored else ''
    evaluation = (', ' if self.eval_micro_batch == self.micro_batch
                  else f'), eval {self.eval_micro_batch} (')
    micro = (f'micro-batch {self.micro_batch} ({self.train_micro_batches} per train batch'
             f'{evaluation}{self.eval_micro_batches} per eval batch)')
    return (f'Plan: {self.backend} x{self.devices}{hosts} - conv1 {self.conv1}, conv2 '
            f'{self.conv2}{self.conv_note}, pool {self.pool}{pool_notes}, {micro}, {feed}'
            f'{_padded("batch", self.train_batch, self.train_padding)}'
            f'{_padded("eval batch", self.eval_batch, self.eval_padding)}{lanes}')

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _padded(name: str, rows: int, padding: int) -> str:
  """The plan line's note of a padded batch ('' for none)."""
  if not padding:
    return ''
  return f', {name} padded to {rows} ({padding} masked row{"s" if padding > 1 else ""})'


def conv_impl(config, backend: str, in_features: int, native: bool = False) -> str:
  """config.conv_impl, or for 'auto' the implementation for a layer of `in_features` inputs
  (`native`: whether the C++ Winograd kernels can run here)."""
  if config.conv_impl != 'auto':
    return config.conv_impl
  if backend == 'cpu':
    winograd_fits = (in_features > 1 and config.dtype == 'float32'
                     and config.kernel_size in WINOGRAD_KERNEL_SIZES)
    return ('winograd_native' if native else 'winograd') if winograd_fits else 'im2col_vjp'
  return 'im2col' if backend == 'gpu' and in_features == 1 else 'xla'


def _native_kernels(config, backend: str, devices: int, processes: int,
                    unavailable: str | None) -> tuple[bool, str]:
  """(whether the C++ Winograd kernels are used where Winograd is, the plan line's note).

  They run on CPU in one process on one device: XLA cannot split a custom call over devices
  (it would gather the batch on each). `unavailable` is why they cannot be built or loaded
  here: '' when they can; None when not checked (auto keeps winograd.py; an explicit
  conv_impl=winograd_native is taken as asked)."""
  one_cpu = backend == 'cpu' and devices == 1 and processes == 1
  if config.conv_impl == 'winograd_native':
    if not one_cpu:
      where = 'on CPU only' if backend != 'cpu' else (
          f'on one device (XLA cannot split them over {devices} devices)')
      raise ConfigError(f'config.conv_impl=winograd_native runs its C++ kernels {where}; '
                        'use conv_impl=winograd.')
    if unavailable:
      raise ConfigError(f'config.conv_impl=winograd_native: {unavailable}; use '
                        'conv_impl=winograd.')
    return True, ''
  if config.conv_impl != 'auto' or not one_cpu:
    return False, ''
  return unavailable == '', f' (C++ kernels unavailable: {unavailable})' if unavailable else ''


def batch_layout(config, backend: str, devices: int, conv2: str,
                 batch: int) -> tuple[int, int]:
  """(rows, micro-batch size) of a batch of `batch` examples: rows is `batch` padded for the
  devices, and padded further on CPU when no micro-batch near the policy's size divides it.

  An explicit config.micro_batch_size is taken as it is. Off CPU, and on CPU with XLA's conv2,
  the micro-batch is the whole batch. Otherwise it is the largest multiple of the device count,
  up to the policy's size, that divides the rows, when that is at least half of an even split
  into the fewest micro-batches of at most that size; otherwise (a prime batch, 1000 on 3
  devices) the batch is padded with masked rows to that even split (127 rows: 3 micro-batches of
  43, not 127 of 1). Train and eval batches get theirs each: a common divisor of both can be far
  smaller than either's best (8 for 128 and 1000), and steps of micro-batches that small are
  slower."""
  rows = padded_size(batch, devices)
  if config.micro_batch_size:
    return rows, config.micro_batch_size
  if backend != 'cpu' or conv2 not in (*_CPU_PATCH_BYTES, 'winograd', 'winograd_native'):
    return rows, rows
  size = _cpu_micro_batch_examples(config, conv2) * devices
  divisor = max(m for m in range(devices, min(size, rows) + 1, devices) if rows % m == 0)
  count = -(-batch // size)  # The fewest micro-batches of at most `size` rows.
  even = padded_size(-(-batch // count), devices)
  return (rows, divisor) if 2 * divisor >= even else (count * even, even)


def _cpu_micro_batch_examples(config, conv2: str) -> int:
  """Examples per device in a CPU micro-batch whose activations stay in the cache."""
  if conv2 in ('winograd', 'winograd_native'):
    channels = config.conv1_features + config.conv2_features
    examples = _CPU_NATIVE_EXAMPLES if conv2 == 'winograd_native' else _CPU_WINOGRAD_EXAMPLES
    return max(examples * _CPU_WINOGRAD_CHANNELS // max(channels, _CPU_WINOGRAD_CHANNELS), 1)
  side = geometry.conv_sides(config.kernel_size)[1]
  patch_bytes = side * side * config.kernel_size ** 2 * config.conv1_features * 4
  return max(_CPU_PATCH_BYTES[conv2] // patch_bytes, 1)


def _check_micro_batch(config, devices: int) -> None:
  micro = config.micro_batch_size
  if micro % devices:
    raise ConfigError(f'config.micro_batch_size={micro} is not divisible by the {devices} '
                      f'devices; use a multiple of {devices}, or 0 for auto.')
  train, evaluation = (padded_size(config.batch_size, devices),
                       padded_size(config.eval_batch_size, devices))
  if micro and (train % micro or evaluation % micro):
    on = f'{devices} devices' if devices > 1 else '1 device'
    raise ConfigError(f'config.micro_batch_size={micro} must divide the train and eval '
                      f'batches ({train} and {evaluation} rows on {on}); use a common divisor, '
                      'or 0 for auto.')


def make(config, backend: str, devices: int, processes: int = 1,
         native_unavailable: str | None = None) -> Plan:
  """The plan for `config` on `devices` devices of `backend` over `processes` processes;
  ConfigError when the config cannot run there. `native_unavailable`: why the C++ Winograd
  kernels cannot run here ('' when they can, None when not checked)."""
  _check_micro_batch(config, devices)
  if config.conv_impl.startswith('winograd') and config.kernel_size not in WINOGRAD_KERNEL_SIZES:
    raise ConfigError(f'config.conv_impl={config.conv_impl} has no transform for kernel_size='
                      f'{config.kernel_size} (only '
                      f'{", ".join(map(str, WINOGRAD_KERNEL_SIZES))}); use conv_impl=auto or '
                      'im2col_vjp.')
  native, conv_note = _native_kernels(config, backend, devices, processes, native_unavailable)
  conv2 = conv_impl(config, backend, config.conv1_features, native)
  conv_note = conv_note if conv2 == 'winograd' else ''
  train, micro = batch_layout(config, backend, devices, conv2, config.batch_size)
  evaluation, eval_micro = batch_layout(config, backend, devices, conv2,
                                        config.eval_batch_size)
  if config.device_data == 'auto':
    device_data = backend != 'cpu' and processes == 1
  else:
    device_data = config.device_data == 'on'
  lanes = lanes_lib.count(config)
  per_pass = config.lanes_per_pass or (1 if backend == 'cpu' else lanes)
  pool = pool_variant(config, backend)
  winograd_cpu = conv2 == 'winograd' and pool == 'fused_cpu'
  native_cpu = conv2 == 'winograd_native' and pool == 'fused_cpu'
  pool_in_tiles = native_cpu or (winograd_cpu
                                 and config.kernel_size in _POOL_IN_TILES_KERNEL_SIZES)
  # With the C++ kernels pooling, conv1 is a direct convolution inside them: it writes conv2's
  # input, and conv2's backward kernel takes its gradients (ops/winograd_native.py).
  conv1 = 'direct_native' if native_cpu else conv_impl(config, backend, 1, native)
  per_pass = min(per_pass, lanes)
  return Plan(backend=backend, devices=devices, processes=processes, conv1=conv1, conv2=conv2,
              conv_note=conv_note, pool=pool, pool_in_tiles=pool_in_tiles,
              pool_in_tiles_training=native_cpu,
              pooled_stored=_stores_pooled(config, winograd_cpu, processes, per_pass),
              train_batch=train,
              train_padding=train - config.batch_size, eval_batch=evaluation,
              eval_padding=evaluation - config.eval_batch_size,
              micro_batch=micro, train_micro_batches=train // micro,
              eval_micro_batch=eval_micro, eval_micro_batches=evaluation // eval_micro,
              device_data=device_data,
              lanes=lanes, lanes_per_pass=per_pass)


def _stores_pooled(config, winograd_cpu: bool, processes: int, per_pass: int) -> bool:
  """Whether training computes conv2's ReLU, pool and dropout in a pass of their own
  (ops/once.py): measured faster with XLA's 3x3 Winograd conv2 on 1, 2 and 4 CPU devices of
  one process, one lane a pass (the C++ kernels pool in their tiles instead). Not under jax.vmap
  (several lanes a pass), where a conditional runs both branches; not over several
  processes, where its predicate, read from one device's rows, would cross hosts in every
  micro-batch (not measured)."""
  return (winograd_cpu and config.kernel_size in _POOLED_STORED_KERNEL_SIZES
          and processes == 1 and per_pass == 1)


def pool_variant(config, backend: str) -> str:
  """The ReLU + max-pool (flax_mnist/ops/pool.py VARIANTS) for the dtype and backend."""
  if config.dtype != 'float32':
    return 'autodiff'
  return 'fused_cpu' if backend == 'cpu' else 'fused'


def decide(config) -> Plan:
  """The plan for this process's JAX runtime (call after jax.distributed is initialised)."""
  import jax
  from flax_mnist.ops import native_build
  backend, devices, processes = jax.default_backend(), jax.device_count(), jax.process_count()
  wanted = (backend == 'cpu' and devices == 1 and processes == 1
            and config.conv_impl in ('auto', 'winograd_native'))
  return make(config, backend, devices, processes,
              native_build.unavailable() if wanted else None)
