"""Convolution implementations with `lax.conv_general_dilated`'s signature, for `nnx.Conv`.

XLA's CPU convolution (and its backward pass) is several times slower than a matrix multiply of
the same size, so on CPU a 'valid', stride-1 NHWC convolution is computed as im2col: the k*k
shifted views of the input are concatenated along channels and multiplied by the kernel reshaped
to (k*k*in, out) in one matmul. Its gradient is again slices, pads and matmuls, which XLA's CPU
backend runs fast. On GPU the native (cuDNN) convolution is the better choice, except for a
1-channel input (the first layer), whose 9-channel im2col matmul beats cuDNN (measured on an H100,
benchmarks/RESULTS.md); on TPU the native one.
"""

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ('auto', 'im2col', 'xla')


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None,
                preferred_element_type=None, out_sharding=None):
  """A drop-in for lax.conv_general_dilated, for NHWC/HWIO, stride 1, 'VALID', no dilation."""
  del dimension_numbers, out_sharding  # nnx.Conv passes NHWC/HWIO/NHWC, the only layout here.
  valid = padding == 'VALID' or (not isinstance(padding, str)
                                 and all(tuple(p) == (0, 0) for p in padding))
  if (tuple(window_strides) != (1, 1) or not valid
      or (lhs_dilation and tuple(lhs_dilation) != (1, 1))
      or (rhs_dilation and tuple(rhs_dilation) != (1, 1)) or feature_group_count != 1):
    raise NotImplementedError('im2col_conv supports stride 1, VALID padding, no dilation, '
                              'no feature groups; use conv_impl="xla".')
  kh, kw, cin, cout = rhs.shape
  n, h, w, _ = lhs.shape
  oh, ow = h - kh + 1, w - kw + 1
  # Patch channels ordered (row offset, column offset, input channel) = rhs's HWI order.
  patches = jnp.concatenate(
      [lhs[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
  out = lax.dot_general(patches, rhs.reshape(kh * kw * cin, cout),
                        (((3,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
  return out


def resolve(conv_impl: str, backend: str | None = None, in_features: int | None = None) -> str:
  """Maps 'auto' to the fastest implementation on `backend` (default: JAX's default backend)
  for a layer of `in_features` input channels (None: any layer)."""
  if conv_impl != 'auto':
    return conv_impl
  backend = backend or jax.default_backend()
  if backend == 'cpu' or (backend == 'gpu' and in_features == 1):
    return 'im2col'
  return 'xla'


def conv_function(conv_impl: str, in_features: int | None = None):
  """Returns the conv_general_dilated-compatible function for conv_impl (after resolve) for a
  layer of `in_features` input channels."""
  return {'im2col': im2col_conv,
          'xla': lax.conv_general_dilated}[resolve(conv_impl, in_features=in_features)]
