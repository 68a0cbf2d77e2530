"""Convolution implementations with `lax.conv_general_dilated`'s signature, for `nnx.Conv`.

XLA's CPU convolution (and its backward pass) is several times slower than a matrix multiply of
the same size, so on CPU a 'valid', stride-1 NHWC convolution is computed as im2col: the k*k
shifted views of the input are gathered along channels and multiplied by the kernel reshaped
to (k*k*in, out) in one matmul. 'im2col' leaves its gradient to autodiff (slices, pads and
matmuls). 'im2col_vjp' writes the backward pass out: the kernel gradient is one matmul of the
saved patches with the output gradient, and the input gradient is XLA's own convolution of the
padded output gradient with the flipped kernel, which on CPU beats im2col's pads and adds.
'winograd' (flax_mnist/ops/winograd.py) multiplies 4x (3x3) to 6.25x (5x5) fewer numbers; on CPU
it is the fastest for layers with several input channels (conv2), im2col_vjp for the 1-channel
first layer; 'winograd_native' (flax_mnist/ops/winograd_native.py) is the same maths in C++
kernels that keep each row of tiles in cache, faster still where it can be built, and with
them the first layer is 'direct_native', computed inside them (PAIRS). On GPU the native
(cuDNN) convolution is the better choice, except for a 1-channel input (the first layer),
whose 9-channel im2col matmul beats cuDNN; on TPU the native one. Which runs where is
decided by flax_mnist/plan.py (measurements: benchmarks/RESULTS.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from flax_mnist.ops import winograd, winograd_native

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _check_supported(window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count):
  valid = padding == 'VALID' or (not isinstance(padding, str)
                                 and all(tuple(p) == (0, 0) for p in padding))
  if (tuple(window_strides) != (1, 1) or not valid
      or (lhs_dilation and tuple(lhs_dilation) != (1, 1))
      or (rhs_dilation and tuple(rhs_dilation) != (1, 1)) or feature_group_count != 1):
    raise NotImplementedError('im2col_conv supports stride 1, VALID padding, no dilation, '
                              'no feature groups; use conv_impl="xla".')


def patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """(N, H, W, C) -> (N, H-kh+1, W-kw+1, kh*kw*C): channels ordered (row, column, channel).

  Built in two stacks (columns, then rows), each of whole contiguous channel vectors: XLA's CPU
  loop for that is several times faster than for one concatenate of k*k channel slices.
  """
  n, h, w, c = x.shape
  oh, ow = h - kh + 1, w - kw + 1
  rows = jnp.stack([x[:, :, j:j + ow] for j in range(kw)], 3).reshape(n, h, ow, kw * c)
  return jnp.stack([rows[:, i:i + oh] for i in range(kh)], 3).reshape(n, oh, ow, kh * kw * c)


def _matmul(p, rhs, precision, preferred_element_type):
  kh, kw, cin, cout = rhs.shape
  return lax.dot_general(p, rhs.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=preferred_element_type)


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None,
                preferred_element_type=None, out_sharding=None):
  """A drop-in for lax.conv_general_dilated, for NHWC/HWIO, stride 1, 'VALID', no dilation."""
  del dimension_numbers, out_sharding  # nnx.Conv passes NHWC/HWIO/NHWC, the only layout here.
  _check_supported(window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count)
  kh, kw, cin, cout = rhs.shape
  n, h, w, _ = lhs.shape
  oh, ow = h - kh + 1, w - kw + 1
  # Patch channels ordered (row offset, column offset, input channel) = rhs's HWI order.
  p = jnp.concatenate(
      [lhs[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
  return _matmul(p, rhs, precision, preferred_element_type)


def _conv_vjp_fwd(lhs, rhs, precision, preferred_element_type):
  p = patches(lhs, *rhs.shape[:2])
  return _matmul(p, rhs, precision, preferred_element_type), (p, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_vjp(lhs, rhs, precision, preferred_element_type):
  return _conv_vjp_fwd(lhs, rhs, precision, preferred_element_type)[0]


def _conv_vjp_bwd(precision, preferred_element_type, residuals, dy):
  del preferred_element_type
  p, rhs = residuals
  kh, kw, cin, cout = rhs.shape
  dy = dy.astype(p.dtype)
  rows = dy.shape[0] * dy.shape[1] * dy.shape[2]
  # Kernel gradient: patches^T @ dy, one matmul contracting over every output position.
  drhs = lax.dot_general(p.reshape(rows, kh * kw * cin), dy.reshape(rows, cout),
                         (((0,), (0,)), ((), ())), precision=precision)
  # Input gradient: the 'full' convolution of dy with the kernel flipped and transposed.
  flipped = jnp.flip(rhs, (0, 1)).transpose(0, 1, 3, 2)
  dlhs = lax.conv_general_dilated(dy, flipped, (1, 1), [(kh - 1, kh - 1), (kw - 1, kw - 1)],
                                  dimension_numbers=_NHWC, precision=precision)
  return dlhs, drhs.reshape(rhs.shape).astype(rhs.dtype)


_conv_vjp.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def im2col_vjp_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, precision=None,
                    preferred_element_type=None, out_sharding=None):
  """As im2col_conv, with the hand-written backward pass described in the module docstring."""
  del dimension_numbers, out_sharding
  _check_supported(window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count)
  return _conv_vjp(lhs, rhs, precision, preferred_element_type)


def computed_with_conv2(*args, **kwargs):
  """conv1's 'direct_native' runs only inside winograd_native.convs_relu_max_pool (PAIRS)."""
  raise NotImplementedError('conv_impl direct_native is computed with conv2 in the C++ '
                            'kernels (winograd_native.convs_relu_max_pool), not on its own')


FUNCTIONS = {'im2col': im2col_conv, 'im2col_vjp': im2col_vjp_conv,
             'winograd': winograd.winograd_conv,
             'winograd_native': winograd_native.winograd_native_conv,
             'direct_native': computed_with_conv2,
             'xla': lax.conv_general_dilated}
# The path that pools in conv2's tiles, per Winograd implementation (inference; in training
# too with the C++ kernels).
POOLED = {'winograd': winograd.conv_relu_max_pool,
          'winograd_native': winograd_native.conv_relu_max_pool}
# conv1 implementations computed together with conv2, its ReLUs and the pool.
PAIRS = {'direct_native': winograd_native.convs_relu_max_pool}
