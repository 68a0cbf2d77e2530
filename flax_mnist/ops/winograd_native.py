"""Winograd F(4x4, k x k) as C++ kernels called by XLA (`winograd_native.cc`), for CPU.

The maths of winograd.py, fused: XLA runs that module's transforms and batched matmuls as
separate passes over tile arrays several times an activation's size, which is where a
train step's time went on AVX-512 CPUs (benchmarks/RESULTS.md); the C++ kernels take each
row of tiles through all of them while it is in cache, and add conv2's bias, ReLU and pool
(and the first layer, a one-channel direct convolution) where they are. No library offers
that: XLA's oneDNN and YNNPACK fusions take one matmul at a time. Built and loaded by
native_build.py; `native_build.unavailable()` says why they cannot run here.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flax_mnist.ops import native_build, winograd

_LANES = 16  # Channels per vector in the kernels: the glue pads channels to a multiple.


def _padded(size: int) -> int:
  return -(-size // _LANES) * _LANES


def _call(name, result, *args, r):
  why = native_build.unavailable()
  if why:
    raise RuntimeError(f'winograd_native: {why}')
  return jax.ffi.ffi_call(f'flax_mnist_winograd_{name}', result, vmap_method='sequential')(
      *args, r=np.int64(r))


def _tiles(x_shape, r):
  """((out_h, out_w), (tiles_h, tiles_w)) of a valid r x r convolution of x_shape's sides."""
  out = x_shape[1] - r + 1, x_shape[2] - r + 1
  return out, tuple(-(-side // winograd.TILE) for side in out)


def _inputs(x, w):
  """(x padded: tiles cover the output and channels fill vectors, w's channels padded too,
  (out_h, out_w), (tiles_h, tiles_w))."""
  (out_h, out_w), tiles = _tiles(x.shape, w.shape[0])
  cin = w.shape[2]
  x = jnp.pad(x.astype(jnp.float32),
              ((0, 0), (0, tiles[0] * winograd.TILE - out_h),
               (0, tiles[1] * winograd.TILE - out_w), (0, _padded(cin) - cin)))
  return x, _padded_kernel(w), (out_h, out_w), tiles


def _padded_kernel(w):
  cin, cout = w.shape[2:]
  return jnp.pad(w.astype(jnp.float32),
                 ((0, 0), (0, 0), (0, _padded(cin) - cin), (0, _padded(cout) - cout)))


def _padded_bias(b):
  return jnp.pad(b.astype(jnp.float32), (0, _padded(b.shape[0]) - b.shape[0]))


def _kernel_tiles(wp, transposed=False):
  """U = G w G^T per tile position (u), or per position transposed (ut, for the gradient)."""
  return winograd.kernel_tiles(wp.swapaxes(2, 3) if transposed else wp,
                               winograd.transforms(wp.shape[0])[1])


def _kernel_gradient(du, w_like):
  """dw from dU (the backward kernel's), its padding cropped."""
  cin, cout = w_like.shape[2:]
  dw = winograd.kernel_tiles_transpose(du, winograd.transforms(w_like.shape[1])[1])
  return dw[:, :, :cin, :cout].astype(w_like.dtype)


def _like(a):
  """A zero-size array that carries a's other dimensions and dtype to a backward pass."""
  return jnp.zeros((0,) + a.shape[1:], a.dtype)


def _du_shape(ut):
  return jax.ShapeDtypeStruct((ut.shape[0], ut.shape[2], ut.shape[1]), jnp.float32)


def _forward(x, w):
  xp, wp, (out_h, out_w), (th, tw) = _inputs(x, w)
  y = _call('forward', jax.ShapeDtypeStruct((x.shape[0], 4 * th, 4 * tw, wp.shape[3]),
                                            jnp.float32), xp, _kernel_tiles(wp), r=w.shape[0])
  return y[:, :out_h, :out_w, :w.shape[3]], (xp, _kernel_tiles(wp, transposed=True))


@jax.custom_vjp
def _conv(x, w):
  return _forward(x, w)[0].astype(x.dtype)


def _conv_fwd(x, w):
  y, (xp, ut) = _forward(x, w)
  return y.astype(x.dtype), (xp, ut, _like(x), _like(w))


def _conv_bwd(residuals, dy):
  xp, ut, x_like, w_like = residuals
  r, cin, cout = w_like.shape[1], w_like.shape[2], w_like.shape[3]
  n, out_h, out_w = dy.shape[:3]
  th, tw = (xp.shape[1] - r + 1) // winograd.TILE, (xp.shape[2] - r + 1) // winograd.TILE
  dy = jnp.pad(dy.astype(jnp.float32), ((0, 0), (0, 4 * th - out_h), (0, 4 * tw - out_w),
                                        (0, ut.shape[1] - cout)))
  dx, du = _call('backward', (jax.ShapeDtypeStruct(xp.shape, jnp.float32), _du_shape(ut)),
                 xp, ut, dy, r=r)
  dx = dx[:, :x_like.shape[1], :x_like.shape[2], :cin]
  return dx.astype(x_like.dtype), _kernel_gradient(du, w_like)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _pool(xp, w, b, positions: bool):
  """relu(max_pool_2x2(conv(xp, w) + b)) of an input padded by _inputs, cropped as Keras
  floors odd sides; with `positions`, also each window's position of its first maximum
  (uncropped, 4 where no gradient passes)."""
  r, cout = w.shape[0], w.shape[3]
  wp = _padded_kernel(w)
  th, tw = (xp.shape[1] - r + 1) // winograd.TILE, (xp.shape[2] - r + 1) // winograd.TILE
  pooled = jax.ShapeDtypeStruct((xp.shape[0], 2 * th, 2 * tw, wp.shape[3]), jnp.float32)
  args = xp, _kernel_tiles(wp), _padded_bias(b)
  if positions:
    out, where = _call('pooled_train', (pooled, pooled.update(dtype=jnp.uint8)), *args, r=r)
  else:
    out, where = _call('pooled', pooled, *args, r=r), None
  return out, where, _kernel_tiles(wp, transposed=True) if positions else None


def _crop(pooled, like, cout):
  """The pooled output of the valid convolution: Keras floors odd sides."""
  return pooled[:, :like[0] // 2, :like[1] // 2, :cout]


def _routed_gradient(dpooled, positions, cout_padded):
  """The pooled gradient padded to the kernel's layout, and the bias gradient it implies."""
  n, ph, pw, cout = dpooled.shape
  dpooled = jnp.pad(dpooled.astype(jnp.float32),
                    ((0, 0), (0, positions.shape[1] - ph), (0, positions.shape[2] - pw),
                     (0, cout_padded - cout)))
  db = jnp.sum(jnp.where(positions < 4, dpooled, 0), (0, 1, 2))[:cout]
  return dpooled, db


@jax.custom_vjp
def _conv_pool(x, w, b):
  xp, _, (out_h, out_w), _ = _inputs(x, w)
  return _crop(_pool(xp, w, b, False)[0], (out_h, out_w), w.shape[3]).astype(x.dtype)


def _conv_pool_fwd(x, w, b):
  xp, _, out, _ = _inputs(x, w)
  pooled, positions, ut = _pool(xp, w, b, True)
  return (_crop(pooled, out, w.shape[3]).astype(x.dtype),
          (xp, ut, positions, _like(x), _like(w), _like(b)))


def _conv_pool_bwd(residuals, dpooled):
  xp, ut, positions, x_like, w_like, b_like = residuals
  dpooled, db = _routed_gradient(dpooled, positions, ut.shape[1])
  dx, du = _call('backward_pooled', (jax.ShapeDtypeStruct(xp.shape, jnp.float32),
                                     _du_shape(ut)), xp, ut, positions, dpooled,
                 r=w_like.shape[1])
  dx = dx[:, :x_like.shape[1], :x_like.shape[2], :w_like.shape[2]]
  return dx.astype(x_like.dtype), _kernel_gradient(du, w_like), db.astype(b_like.dtype)


_conv_pool.defvjp(_conv_pool_fwd, _conv_pool_bwd)


def conv_relu_max_pool(x, w, b, precision=None):
  """winograd.conv_relu_max_pool (conv, bias, ReLU, 2x2 max pool) in one kernel: the output is
  pooled in its tiles and never stored at full size. Its gradient (TensorFlow's: all of a
  window's to its first maximum, pool.py) is one kernel too, fed the pooled gradient and each
  window's position of its maximum, recorded by the forward kernel."""
  del precision  # float32 throughout, as winograd.py on CPU.
  return _conv_pool(x, w, b)


def _first_layer(image, w1, b1, w2):
  """relu(conv(image, w1) + b1) computed by the C++ kernel straight into conv2's padded input
  layout (zeros past the valid outputs), conv2's valid output sides, and the pixels as the
  kernels read them (float32, N x H x W)."""
  r, c1 = w1.shape[0], w1.shape[3]
  side = (image.shape[1] - r + 1, image.shape[2] - r + 1)
  out, (th, tw) = _tiles((image.shape[0], *side), w2.shape[0])
  shape = (image.shape[0], 4 * th + r - 1, 4 * tw + r - 1, _padded(c1))
  w = jnp.pad(w1.astype(jnp.float32).reshape(r * r, c1), ((0, 0), (0, _padded(c1) - c1)))
  pixels = image.astype(jnp.float32).reshape(image.shape[:3])
  y1 = _call('conv1', jax.ShapeDtypeStruct(shape, jnp.float32), pixels, w, _padded_bias(b1),
             r=r)
  return y1, out, pixels


@jax.custom_vjp
def _pair(image, w1, b1, w2, b2):
  y1, out, _ = _first_layer(image, w1, b1, w2)
  return _crop(_pool(y1, w2, b2, False)[0], out, w2.shape[3]).astype(image.dtype)


def _pair_fwd(image, w1, b1, w2, b2):
  """(Arguments are jax.custom_vjp's CustomVJPPrimal: value, and whether it is differentiated.)"""
  if image.perturbed:
    raise NotImplementedError('convs_relu_max_pool has no gradient for its image (the data); '
                              'use conv_impl=winograd to differentiate a model by its input')
  image, w1, b1, w2, b2 = (arg.value for arg in (image, w1, b1, w2, b2))
  y1, out, pixels = _first_layer(image, w1, b1, w2)
  pooled, positions, ut = _pool(y1, w2, b2, True)
  return (_crop(pooled, out, w2.shape[3]).astype(image.dtype),
          (pixels, y1, ut, positions, _like(w1), _like(b1), _like(w2), _like(b2)))


def _pair_bwd(residuals, dpooled):
  pixels, y1, ut, positions, w1_like, b1_like, w2_like, b2_like = residuals
  if isinstance(dpooled, jax.custom_derivatives.SymbolicZero):  # The output unused.
    dpooled = jnp.zeros(dpooled.shape, dpooled.dtype)
  r, c1 = w1_like.shape[1], w1_like.shape[3]
  dpooled, db2 = _routed_gradient(dpooled, positions, ut.shape[1])
  c1p = y1.shape[3]
  du, dw1, db1 = _call('backward_pair', (_du_shape(ut),
                                         jax.ShapeDtypeStruct((r * r, c1p), jnp.float32),
                                         jax.ShapeDtypeStruct((c1p,), jnp.float32)),
                       y1, ut, positions, dpooled, pixels, r=r)
  dw1 = dw1.reshape(r, r, 1, c1p)[..., :c1].astype(w1_like.dtype)
  return (None, dw1, db1[:c1].astype(b1_like.dtype), _kernel_gradient(du, w2_like),
          db2.astype(b2_like.dtype))


# symbolic_zeros: the forward pass learns which arguments are differentiated (the image never).
_pair.defvjp(_pair_fwd, _pair_bwd, symbolic_zeros=True)


def convs_relu_max_pool(image, w1, b1, w2, b2):
  """The seed's first two layers and pool, relu(max_pool(conv2(relu(conv1(image) + b1)) + b2)),
  for a one-channel image (N, H, W, 1) and kernels of one size: conv1 a direct convolution
  in C++ writing conv2's padded input, the rest conv_relu_max_pool. The backward kernel
  takes conv1's gradients from each image's conv2 input gradient while it is in cache,
  never writing it: differentiating by the image is refused (NotImplementedError)."""
  if w1.shape[0] != w2.shape[0] or w1.shape[2] != 1 or image.shape[3] != 1:
    raise NotImplementedError('convs_relu_max_pool: a one-channel image and two kernels of '
                              'one size only')
  return _pair(image, w1, b1, w2, b2)


def winograd_native_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """winograd.winograd_conv's drop-in for lax.conv_general_dilated, on the C++ kernels."""
  del dimension_numbers, out_sharding, preferred_element_type, precision
  winograd.check_supported(window_strides, padding, lhs_dilation, rhs_dilation,
                           feature_group_count, rhs.shape)
  return _conv(lhs, rhs)
