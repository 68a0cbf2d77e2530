"""Winograd convolution F(4x4, r x r) with a hand-written backward pass, for CPU.

A 'valid', stride-1 NHWC convolution with an r x r kernel is computed on 4x4 output tiles: each
overlapping (r+3) x (r+3) input tile is transformed (V = B^T d B), the kernel once (U = G g G^T),
and for each of the (r+3)^2 transformed positions one matmul sums over input channels
(M = V U); the output tile is A^T M A. That multiplies 16 r^2 / (r+3)^2 times fewer numbers
than the direct convolution (4x for r=3, 6.25x for r=5). The backward pass is the same algebra
transposed: dM = A dY A^T once, then dU = V^T dM (kernel gradient, through G^T . G) and
dV = dM U^T, whose tiles B dV B^T are added back where they overlap (input gradient).

The transforms (Cook-Toom, from interpolation points) are exact in rationals; in float32 they
cost some precision, kept near lax.conv's by the choice of points: within 1e-5 of the output's
scale (tests/test_winograd.py). Transforms run in float32 whatever the input dtype.

For inference, conv_relu_max_pool also takes the layer's bias, ReLU and 2x2 max pool inside
the tiles (a 4x4 tile holds four whole windows), summing each output straight from M: the
full-size output is never stored. It has no written gradient; training uses winograd_conv.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_mnist.ops import pool

TILE = 4  # Output rows and columns per tile.
# Interpolation points (plus the point at infinity) per kernel size: these keep float32 error
# lowest among those tried (tests/test_winograd.py measures it against float64).
_POINTS = {3: (0, 1, -1, 2, -0.5), 5: (0, 1, -1, 2, -2, 0.5, -0.5)}
KERNEL_SIZES = tuple(sorted(_POINTS))


def supports(kernel_shape) -> bool:
  """Whether a kernel of shape (kh, kw, in, out) has a Winograd transform here."""
  kh, kw = kernel_shape[:2]
  return kh == kw and kh in _POINTS


@functools.lru_cache
def transforms(r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(A^T (4, a), G (a, r), B^T (a, a)) in float64 for F(4, r), a = r + 3.

  Correlation y = A^T [(G g) * (B^T d)] is the transpose of Toom-Cook polynomial
  multiplication: evaluate at the points, multiply, interpolate (the inverse Vandermonde).
  """
  points = _POINTS[r]
  alpha = TILE + r - 1

  def evaluation(n):  # Rows: polynomials of degree < n at each point; last: leading coefficient.
    return np.array([[float(p) ** k for k in range(n)] for p in points]
                    + [[0.0] * (n - 1) + [1.0]])
  return evaluation(TILE).T, evaluation(r), np.linalg.inv(evaluation(alpha)).T


def _weighted_sum(parts, weights):
  """sum_j weights[j] * parts[j], skipping zero terms.

  In lax ops: a transform is hundreds of them, and each jnp op is traced as a call of its own
  (jit), which made tracing a step markedly slower (benchmarks/RESULTS.md).
  """
  terms = [part if c == 1 else lax.neg(part) if c == -1 else lax.mul(part, np.float32(c))
           for c, part in zip(weights, parts) if c != 0]
  return functools.reduce(lax.add, terms)


def _combine(parts, matrix, axis):
  """stack([sum_j matrix[i, j] * parts[j] for each row i], axis), skipping zero terms."""
  return jnp.stack([_weighted_sum(parts, row) for row in matrix], axis)


def _tile_starts(x, offset, axis, tiles):
  """Every TILE-th row of `x` along `axis` from `offset`: row `offset` of each tile."""
  return lax.slice_in_dim(x, offset, offset + TILE * (tiles - 1) + 1, TILE, axis=axis)


def _overlap_add(parts, axis):
  """parts[j] (tiles along `axis`) -> rows tiles * TILE + len(parts) - TILE, row j of tile t
  added at t * TILE + j (the transpose of cutting overlapping tiles)."""
  tiles, alpha = parts[0].shape[axis], len(parts)
  length = tiles * TILE + alpha - TILE
  total = None
  for start in range(0, alpha, TILE):
    group = parts[start:start + TILE]
    group += [jnp.zeros_like(parts[0])] * (TILE - len(group))
    rows = jnp.stack(group, axis + 1)
    rows = rows.reshape(rows.shape[:axis] + (tiles * TILE,) + rows.shape[axis + 2:])
    widths = [(0, 0)] * rows.ndim
    widths[axis] = (start, length - tiles * TILE - start)
    rows = lax.pad(rows, np.float32(0), [(lo, hi, 0) for lo, hi in widths])
    total = rows if total is None else total + rows
  return total


def _input_tiles(x, bt, tiles_h, tiles_w):
  """x (n, H, W, C) -> V (a*a, n*tiles_h*tiles_w, C): B^T d B of every input tile."""
  alpha = bt.shape[0]
  v = _combine([_tile_starts(x, i, 1, tiles_h) for i in range(alpha)], bt, 0)
  v = _combine([_tile_starts(v, j, 3, tiles_w) for j in range(alpha)], bt, 1)
  return v.reshape(alpha * alpha, -1, x.shape[-1])


def _input_tiles_transpose(dv, bt, n, tiles_h, tiles_w):
  """The transpose of _input_tiles: dV (a*a, T, C) -> dx (n, H', W', C), tiles overlap-added."""
  alpha = bt.shape[0]
  dv = dv.reshape(alpha, alpha, n, tiles_h, tiles_w, dv.shape[-1])
  cols = _combine([dv[:, j] for j in range(alpha)], bt.T, 0)
  cols = _overlap_add([cols[j] for j in range(alpha)], 3)  # (a, n, tiles_h, W', C)
  rows = _combine([cols[i] for i in range(alpha)], bt.T, 0)
  return _overlap_add([rows[i] for i in range(alpha)], 1)


def _per_position(products, alpha, n, tiles_h, tiles_w):
  """M (a*a, T, Co) -> (a, a, n, tiles_h, tiles_w, Co): position (p, q) of every tile."""
  return products.reshape(alpha, alpha, n, tiles_h, tiles_w, products.shape[-1])


def _output_tiles(products, at, n, tiles_h, tiles_w):
  """M (a*a, T, Co) -> y (n, tiles_h*TILE, tiles_w*TILE, Co): A^T M A of every tile."""
  alpha = at.shape[1]
  m = _per_position(products, alpha, n, tiles_h, tiles_w)
  y = _combine([m[i] for i in range(alpha)], at, 3)
  y = _combine([y[j] for j in range(alpha)], at, 4)
  return y.reshape(n, tiles_h * TILE, tiles_w * TILE, products.shape[-1])


def _pooled_output_tiles(products, at, n, tiles_h, tiles_w):
  """M (a*a, T, Co) -> the 2x2 max pool of A^T M A, (n, 2 tiles_h, 2 tiles_w, Co).

  Each output is summed straight from M (a^2 terms, not 2a as in _output_tiles' two passes)
  and pooled at once, so XLA makes one pass over M that writes only the pooled quarter:
  the full-size output is never stored and read back. A tile's 4x4 outputs hold four whole
  2x2 windows, so the pool never crosses tiles.
  """
  alpha = at.shape[1]
  m = _per_position(products, alpha, n, tiles_h, tiles_w)
  parts = [m[p, q] for p in range(alpha) for q in range(alpha)]

  def output(i, j):  # Row i, column j of every tile: sum_pq A^T[i, p] A^T[j, q] M[p, q].
    return _weighted_sum(parts, np.outer(at[i], at[j]).ravel())

  def window(row, col):  # Pooled row `row`, column `col` of every tile (0 or 1 each).
    a, b, c, d = (output(2 * row + i, 2 * col + j) for i in (0, 1) for j in (0, 1))
    return lax.max(lax.max(a, b), lax.max(c, d))  # NaN propagates, as in pool.py.

  pooled = jnp.stack([jnp.stack([window(row, col) for col in (0, 1)], 3) for row in (0, 1)], 2)
  return pooled.reshape(n, 2 * tiles_h, 2 * tiles_w, products.shape[-1])


def _output_tiles_transpose(dy, at):
  """The transpose of _output_tiles: dy (n, th*TILE, tw*TILE, Co) -> dM (a*a, T, Co)."""
  alpha = at.shape[1]
  n, h, w, cout = dy.shape
  d = dy.reshape(n, h // TILE, TILE, w // TILE, TILE, cout)
  d = _combine([d[:, :, i] for i in range(TILE)], at.T, 0)
  d = _combine([d[..., j, :] for j in range(TILE)], at.T, 1)
  return d.reshape(alpha * alpha, -1, cout)


def kernel_tiles(w, g):
  """w (r, r, C, Co) -> U (a*a, C, Co) = G w G^T."""
  u = _combine([w[k] for k in range(w.shape[0])], g, 0)
  u = _combine([u[:, k] for k in range(w.shape[1])], g, 1)
  return u.reshape(-1, *w.shape[2:])


def kernel_tiles_transpose(du, g):
  """The transpose of kernel_tiles: dU (a*a, C, Co) -> dw (r, r, C, Co)."""
  alpha = g.shape[0]
  du = du.reshape(alpha, alpha, *du.shape[1:])
  dw = _combine([du[p] for p in range(alpha)], g.T, 0)
  return _combine([dw[:, q] for q in range(alpha)], g.T, 1)


def _tile_counts(out_h, out_w):
  return -(-out_h // TILE), -(-out_w // TILE)


def _products(x, w, precision):
  """(V, M = V U, (out_h, out_w), (tiles_h, tiles_w)) of x (n, H, W, C) and w (r, r, C, Co)."""
  r = w.shape[0]
  _, g, bt = transforms(r)
  out_h, out_w = x.shape[1] - r + 1, x.shape[2] - r + 1
  tiles_h, tiles_w = _tile_counts(out_h, out_w)
  # Inputs padded at the bottom and right so the tiles cover the output; outputs cropped.
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, tiles_h * TILE - out_h),
                                      (0, tiles_w * TILE - out_w), (0, 0)))
  v = _input_tiles(x, bt, tiles_h, tiles_w)
  u = kernel_tiles(w.astype(jnp.float32), g)
  products = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
  return v, products, (out_h, out_w), (tiles_h, tiles_w)


def _forward(x, w, precision):
  at, g, _ = transforms(w.shape[0])
  v, products, (out_h, out_w), tiles = _products(x, w, precision)
  y = _output_tiles(products, at, x.shape[0], *tiles)[:, :out_h, :out_w]
  # U^T for the input gradient, transformed from w^T: a plain matmul there (a transposed-operand
  # one over U measured no faster; benchmarks/RESULTS.md).
  return y, (v, kernel_tiles(jnp.swapaxes(w.astype(jnp.float32), 2, 3), g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, precision):
  return _forward(x, w, precision)[0].astype(x.dtype)


def _conv_fwd(x, w, precision):
  y, (v, u_t) = _forward(x, w, precision)
  # Zero-size arrays carry the input dtypes to the backward pass.
  return y.astype(x.dtype), (v, u_t, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _conv_bwd(precision, residuals, dy):
  v, u_t, x_dtype, w_dtype = residuals
  alpha = int(round(v.shape[0] ** 0.5))
  r = alpha - TILE + 1
  at, g, bt = transforms(r)
  n, out_h, out_w, _ = dy.shape
  tiles_h, tiles_w = _tile_counts(out_h, out_w)
  dy = jnp.pad(dy.astype(jnp.float32), ((0, 0), (0, tiles_h * TILE - out_h),
                                        (0, tiles_w * TILE - out_w), (0, 0)))
  dm = _output_tiles_transpose(dy, at)
  # dU = V^T dM contracts V's tile axis where it lies: no V^T copy (which had cost a full pass
  # over V; benchmarks/RESULTS.md).
  du = lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))), precision=precision)
  dv = lax.dot_general(dm, u_t, (((2,), (1,)), ((0,), (0,))), precision=precision)
  dx = _input_tiles_transpose(dv, bt, n, tiles_h, tiles_w)
  dx = dx[:, :out_h + r - 1, :out_w + r - 1]
  return dx.astype(x_dtype.dtype), kernel_tiles_transpose(du, g).astype(w_dtype.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_relu_max_pool(x, w, b, precision=None):
  """relu(max_pool_2x2(conv(x, w) + b)) for inference: a 'valid' stride-1 NHWC convolution
  (kernel of a size in KERNEL_SIZES), its bias, Keras' ReLU and MaxPool2D(2), with the pool
  taken in Winograd's tile space (_pooled_output_tiles) and the bias and ReLU on the pooled
  quarter (adding b and rounding are monotonic, so max(y) + b == max(y + b) exactly).

  The same values as winograd_conv, the bias, then pool.relu_max_pool_2x2, up to summation
  order; odd output sides are rounded down, as Keras' pool does (pool.py takes even sides
  only). No written gradient (the model uses it only when not training).
  """
  _, products, (out_h, out_w), tiles = _products(x, w, precision)
  pooled = _pooled_output_tiles(products, transforms(w.shape[0])[0], x.shape[0], *tiles)
  pooled = pooled[:, :out_h // 2, :out_w // 2] + b.astype(jnp.float32)
  return pool.relu_keeping_nan(pooled).astype(x.dtype)


def winograd_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None,
                  preferred_element_type=None, out_sharding=None):
  """A drop-in for lax.conv_general_dilated: NHWC/HWIO, stride 1, 'VALID', no dilation, and a
  square kernel of a size in KERNEL_SIZES."""
  del dimension_numbers, out_sharding, preferred_element_type  # NHWC/HWIO/NHWC only.
  check_supported(window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count,
                  rhs.shape)
  return _conv(lhs, rhs, precision)


def check_supported(window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count,
                    kernel_shape) -> None:
  """NotImplementedError unless the convolution is one that Winograd here computes."""
  valid = padding == 'VALID' or (not isinstance(padding, str)
                                 and all(tuple(p) == (0, 0) for p in padding))
  if (tuple(window_strides) != (1, 1) or not valid or feature_group_count != 1
      or (lhs_dilation and tuple(lhs_dilation) != (1, 1))
      or (rhs_dilation and tuple(rhs_dilation) != (1, 1)) or not supports(kernel_shape)):
    raise NotImplementedError(
        'winograd_conv supports stride 1, VALID padding, no dilation or feature groups, and '
        f'square kernels of size {", ".join(map(str, KERNEL_SIZES))}; use conv_impl="im2col_vjp".')
