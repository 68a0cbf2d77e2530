// Winograd F(4x4, r x r) convolution kernels for CPU, called from XLA as FFI custom calls.
//
// Why hand-written: XLA computes flax_mnist/ops/winograd.py as separate passes (input transform,
// 36 or 64 batched matmuls, output transform), each writing a tile array several times the
// activation's size to memory and reading it back. Here one thread takes a row of tiles (or
// an image) through all of them while its tiles sit in L1/L2. The maths is winograd.py's,
// term for term; the transforms' constants are generated from winograd.transforms() into
// TRANSFORMS_HEADER (flax_mnist/ops/winograd_native.py) when the kernel is built.
//
// Layouts (row-major, float32, channels a multiple of 16; the caller pads them):
//   x (N, 4*th + r - 1, 4*tw + r - 1, C): the input, padded so that the tiles cover it;
//   u (A*A, C, Co): G w G^T; ut (A*A, Co, C): its transpose per position; A = r + 3;
//   y (N, 4*th, 4*tw, Co): the output; pooled (N, 2*th, 2*tw, Co).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats: one AVX-512 register, two AVX2 ones; GCC and Clang vector extensions.
typedef float v16 __attribute__((vector_size(64)));
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }

#include TRANSFORMS_HEADER  // in_tf<r>, in_tf_t<r>, out_tf<r>, out_tf_t<r> (generated).

template <int R> struct Tf;
template <> struct Tf<3> {
  static constexpr int A = 6;
  static void in(const v16 (&d)[6][6], v16 (&v)[6][6]) { in_tf3(d, v); }
  static void in_t(const v16 (&v)[6][6], v16 (&d)[6][6]) { in_tf_t3(v, d); }
  static void out(const v16 (&m)[6][6], v16 (&y)[4][4]) { out_tf3(m, y); }
  static void out_t(const v16 (&y)[4][4], v16 (&m)[6][6]) { out_tf_t3(y, m); }
};
template <> struct Tf<5> {
  static constexpr int A = 8;
  static void in(const v16 (&d)[8][8], v16 (&v)[8][8]) { in_tf5(d, v); }
  static void in_t(const v16 (&v)[8][8], v16 (&d)[8][8]) { in_tf_t5(v, d); }
  static void out(const v16 (&m)[8][8], v16 (&y)[4][4]) { out_tf5(m, y); }
  static void out_t(const v16 (&y)[4][4], v16 (&m)[8][8]) { out_tf_t5(y, m); }
};

// C[i][0:16*NV] (+)= sum_k A(i, k) * B[k][0:16*NV] for ROWS rows i, where A(i, k) is at
// a[i * a_row + k * a_k]: registers hold ROWS x NV accumulators, each B row is loaded once.
template <int ROWS, int NV, bool ACCUMULATE>
inline void block(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb,
                  float* c, int64_t ldc, int64_t depth) {
  v16 acc[ROWS][NV];
  for (int i = 0; i < ROWS; ++i)
    for (int q = 0; q < NV; ++q) acc[i][q] = ACCUMULATE ? load(c + i * ldc + 16 * q) : v16{};
  for (int64_t k = 0; k < depth; ++k) {
    v16 row[NV];
    for (int q = 0; q < NV; ++q) row[q] = load(b + k * ldb + 16 * q);
    for (int i = 0; i < ROWS; ++i) {
      const v16 s = splat(a[i * a_row + k * a_k]);
      for (int q = 0; q < NV; ++q) acc[i][q] += s * row[q];
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int q = 0; q < NV; ++q) store(c + i * ldc + 16 * q, acc[i][q]);
}

// Every row of C (+)= A @ B for 16 * NV columns, ROWS rows a register block (the last rows
// of a count ROWS does not divide one by one).
template <int ROWS, int NV, bool ACCUMULATE>
void column_block(const float* a, int64_t a_row, int64_t a_k, int64_t rows, const float* b,
                  int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  int64_t i = 0;
  for (; i + ROWS <= rows; i += ROWS)
    block<ROWS, NV, ACCUMULATE>(a + i * a_row, a_row, a_k, b, ldb, c + i * ldc, ldc, depth);
  for (; i < rows; ++i)
    block<1, NV, ACCUMULATE>(a + i * a_row, a_row, a_k, b, ldb, c + i * ldc, ldc, depth);
}

// C (rows x cols) (+)= A (rows x depth, strided as in `block`) @ B (depth x cols), cols a
// multiple of 16: 64 columns at a time in 6-row blocks, a narrower rest in taller blocks
// (about 24 accumulators each: enough independent sums to keep both FMA units busy).
template <bool ACCUMULATE>
void matmul(const float* a, int64_t a_row, int64_t a_k, int64_t rows, const float* b,
            int64_t ldb, float* c, int64_t ldc, int64_t depth, int64_t cols) {
  int64_t col = 0;
  for (; col + 64 <= cols; col += 64)
    column_block<6, 4, ACCUMULATE>(a, a_row, a_k, rows, b + col, ldb, c + col, ldc, depth);
  switch ((cols - col) / 16) {
    case 3:
      column_block<8, 3, ACCUMULATE>(a, a_row, a_k, rows, b + col, ldb, c + col, ldc, depth);
      break;
    case 2:
      column_block<12, 2, ACCUMULATE>(a, a_row, a_k, rows, b + col, ldb, c + col, ldc, depth);
      break;
    case 1:
      column_block<12, 1, ACCUMULATE>(a, a_row, a_k, rows, b + col, ldb, c + col, ldc, depth);
      break;
    default:
      break;
  }
}

// Runs body(item, worker) for item in [0, items) on the caller and up to pool.num_threads()
// scheduled tasks; items are claimed one at a time. The caller waits only for items already
// claimed, so a task the pool starts late (its threads busy with other XLA work, perhaps this
// very call's caller) finds nothing left and returns: no task is ever waited for before it
// runs. `Shared` (per-worker scratch) outlives every task.
template <typename Shared, typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t items, std::shared_ptr<Shared> shared,
                  Body body) {
  struct Counter {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> workers{0};
  };
  auto counter = std::make_shared<Counter>();
  auto work = [counter, shared, items, body]() {
    int worker = -1;
    for (int64_t item; (item = counter->next.fetch_add(1)) < items;) {
      if (worker < 0) worker = counter->workers.fetch_add(1);
      body(item, worker);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), items) - 1;
  for (int64_t t = 0; t < tasks; ++t) pool.Schedule([work] { work(); });
  work();
  while (counter->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

struct Dims {
  int64_t n, th, tw, c, co, h, w;
};

Dims dims_of(const ffi::Buffer<ffi::F32>& x, int64_t co, int64_t r) {
  auto d = x.dimensions();
  return {d[0], (d[1] - r + 1) / 4, (d[2] - r + 1) / 4, d[3], co, d[1], d[2]};
}

// V = B^T d B of tile (i, j) of image n, channels ch..ch+15, stored for position (p, q) at
// out[((p * A + q) * count + index) * C + ch]: `count` tiles per position in the buffer.
template <int R>
inline void input_tile(const float* x, const Dims& s, int64_t n, int64_t i, int64_t j,
                       int64_t ch, float* out, int64_t count, int64_t index) {
  constexpr int A = Tf<R>::A;
  v16 d[A][A], v[A][A];
  for (int k = 0; k < A; ++k)
    for (int l = 0; l < A; ++l)
      d[k][l] = load(x + ((n * s.h + 4 * i + k) * s.w + 4 * j + l) * s.c + ch);
  Tf<R>::in(d, v);
  for (int p = 0; p < A; ++p)
    for (int q = 0; q < A; ++q) store(out + ((p * A + q) * count + index) * s.c + ch, v[p][q]);
}

// One row of tiles: V = B^T d B of each tile, M = V U per position, then
// `epilogue(j, ch, m)` with tile j's products m[A][A] of the 16 output channels from ch.
template <int R, typename Epilogue>
void tile_row(const float* x, const float* u, const Dims& s, int64_t n, int64_t i, float* vb,
              float* mb, Epilogue epilogue) {
  constexpr int A = Tf<R>::A;
  for (int64_t j = 0; j < s.tw; ++j)
    for (int64_t ch = 0; ch < s.c; ch += 16) input_tile<R>(x, s, n, i, j, ch, vb, s.tw, j);
  for (int64_t p = 0; p < A * A; ++p)
    matmul<false>(vb + p * s.tw * s.c, s.c, 1, s.tw, u + p * s.c * s.co, s.co,
                  mb + p * s.tw * s.co, s.co, s.c, s.co);
  for (int64_t j = 0; j < s.tw; ++j)
    for (int64_t ch = 0; ch < s.co; ch += 16) {
      v16 m[A][A];
      for (int p = 0; p < A; ++p)
        for (int q = 0; q < A; ++q) m[p][q] = load(mb + ((p * A + q) * s.tw + j) * s.co + ch);
      epilogue(j, ch, m);
    }
}

struct Scratch {
  std::vector<std::vector<float>> buffers;  // Per worker.
  explicit Scratch(int workers) : buffers(workers) {}
};

template <int R, typename Epilogue>
void forward_rows(ffi::ThreadPool& pool, const float* x, const float* u, const Dims& s,
                  Epilogue epilogue) {
  constexpr int A = Tf<R>::A;
  const int64_t v_size = A * A * s.tw * s.c, m_size = A * A * s.tw * s.co;
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 1);
  auto scratch = std::make_shared<Scratch>(workers);
  parallel_for(pool, s.n * s.th, scratch, [=](int64_t row, int worker) {
    std::vector<float>& buffer = scratch->buffers[worker];
    if (buffer.empty()) buffer.resize(v_size + m_size);
    tile_row<R>(x, u, s, row / s.th, row % s.th, buffer.data(), buffer.data() + v_size,
                [&](int64_t j, int64_t ch, const v16 (&m)[A][A]) {
                  epilogue(row / s.th, row % s.th, j, ch, m);
                });
  });
}

template <int R>
void forward(ffi::ThreadPool& pool, const float* x, const float* u, float* y, const Dims& s) {
  constexpr int A = Tf<R>::A;
  forward_rows<R>(pool, x, u, s, [=](int64_t n, int64_t i, int64_t j, int64_t ch,
                                     const v16 (&m)[A][A]) {
    v16 o[4][4];
    Tf<R>::out(m, o);
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b)
        store(y + ((n * 4 * s.th + 4 * i + a) * 4 * s.tw + 4 * j + b) * s.co + ch, o[a][b]);
  });
}

inline v16 max_keeping_nan(v16 a, v16 b) { return (a > b) | (a != a) ? a : b; }

// relu(max_pool_2x2(y) + bias), NaN kept (as flax_mnist/ops/pool.py): a 4x4 tile holds four
// whole 2x2 windows.
template <int R>
void forward_pooled(ffi::ThreadPool& pool, const float* x, const float* u, const float* bias,
                    float* out, const Dims& s) {
  constexpr int A = Tf<R>::A;
  forward_rows<R>(pool, x, u, s, [=](int64_t n, int64_t i, int64_t j, int64_t ch,
                                     const v16 (&m)[A][A]) {
    v16 o[4][4];
    Tf<R>::out(m, o);
    const v16 b = load(bias + ch), zero = v16{};
    for (int a = 0; a < 2; ++a)
      for (int c = 0; c < 2; ++c) {
        v16 top = max_keeping_nan(o[2 * a][2 * c], o[2 * a][2 * c + 1]);
        v16 bottom = max_keeping_nan(o[2 * a + 1][2 * c], o[2 * a + 1][2 * c + 1]);
        v16 value = max_keeping_nan(top, bottom) + b;
        value = value <= zero ? zero : value;
        store(out + ((n * 2 * s.th + 2 * i + a) * 2 * s.tw + 2 * j + c) * s.co + ch, value);
      }
  });
}

// dM = A dY A^T of image n's tiles; dV = dM U^T; dU += V^T dM (V recomputed from x, cheaper
// than storing it); dx = the tiles B dV B^T added where they overlap.
template <int R>
void backward_image(const float* x, const float* ut, const float* dy, float* dx, float* du,
                    const Dims& s, int64_t n, float* vb, float* dvb, float* mb) {
  constexpr int A = Tf<R>::A;
  const int64_t tiles = s.th * s.tw;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t i = t / s.tw, j = t % s.tw;
    for (int64_t ch = 0; ch < s.c; ch += 16) input_tile<R>(x, s, n, i, j, ch, vb, tiles, t);
    for (int64_t ch = 0; ch < s.co; ch += 16) {
      v16 g[4][4], m[A][A];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          g[a][b] = load(dy + ((n * 4 * s.th + 4 * i + a) * 4 * s.tw + 4 * j + b) * s.co + ch);
      Tf<R>::out_t(g, m);
      for (int p = 0; p < A; ++p)
        for (int q = 0; q < A; ++q) store(mb + ((p * A + q) * tiles + t) * s.co + ch, m[p][q]);
    }
  }
  for (int64_t p = 0; p < A * A; ++p) {
    const float* vp = vb + p * tiles * s.c;
    const float* mp = mb + p * tiles * s.co;
    matmul<false>(mp, s.co, 1, tiles, ut + p * s.co * s.c, s.c, dvb + p * tiles * s.c, s.c,
                  s.co, s.c);
    matmul<true>(vp, 1, s.c, s.c, mp, s.co, du + p * s.c * s.co, s.co, tiles, s.co);
  }
  float* image = dx + n * s.h * s.w * s.c;
  std::fill(image, image + s.h * s.w * s.c, 0.0f);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t i = t / s.tw, j = t % s.tw;
    for (int64_t ch = 0; ch < s.c; ch += 16) {
      v16 v[A][A], d[A][A];
      for (int p = 0; p < A; ++p)
        for (int q = 0; q < A; ++q) v[p][q] = load(dvb + ((p * A + q) * tiles + t) * s.c + ch);
      Tf<R>::in_t(v, d);
      for (int k = 0; k < A; ++k)
        for (int l = 0; l < A; ++l) {
          float* at = image + ((4 * i + k) * s.w + 4 * j + l) * s.c + ch;
          store(at, load(at) + d[k][l]);
        }
    }
  }
}

// The images are cut into a fixed number of consecutive groups, each summing its own dU in
// image order; the groups' sums are added in group order. So the kernel gradient does not
// depend on which thread took which group: a run is repeatable bit for bit (resume relies on
// it), as XLA's own reductions are.
template <int R>
void backward(ffi::ThreadPool& pool, const float* x, const float* ut, const float* dy,
              float* dx, float* du, const Dims& s) {
  constexpr int A = Tf<R>::A;
  const int64_t tiles = s.th * s.tw;
  const int64_t v_size = A * A * tiles * s.c, m_size = A * A * tiles * s.co;
  const int64_t u_size = A * A * s.c * s.co;
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t groups = std::min<int64_t>(s.n, std::max<int64_t>(4, 2 * workers));
  auto scratch = std::make_shared<Scratch>(workers);
  std::vector<float> sums(groups * u_size, 0.0f);
  float* group_sums = sums.data();
  parallel_for(pool, groups, scratch, [=](int64_t group, int worker) {
    std::vector<float>& buffer = scratch->buffers[worker];
    if (buffer.empty()) buffer.resize(2 * v_size + m_size);
    float *vb = buffer.data(), *dvb = vb + v_size, *mb = dvb + v_size;
    for (int64_t n = group * s.n / groups; n < (group + 1) * s.n / groups; ++n)
      backward_image<R>(x, ut, dy, dx, group_sums + group * u_size, s, n, vb, dvb, mb);
  });
  std::copy(group_sums, group_sums + u_size, du);
  for (int64_t group = 1; group < groups; ++group)
    for (int64_t e = 0; e < u_size; ++e) du[e] += group_sums[group * u_size + e];
}

ffi::Error check(const Dims& s, int64_t r) {
  if ((r != 3 && r != 5) || s.c % 16 || s.co % 16 || s.th < 1 || s.tw < 1 ||
      s.h != 4 * s.th + r - 1 || s.w != 4 * s.tw + r - 1)
    return ffi::Error::InvalidArgument("winograd_native: unsupported shapes");
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// Checks the shapes, then runs kernel(std::integral_constant<int, r>) for r = 3 or 5.
template <typename Kernel>
ffi::Error for_kernel_size(const Dims& s, int64_t r, Kernel kernel) {
  if (ffi::Error error = check(s, r); error.failure()) return error;
  if (r == 3) kernel(std::integral_constant<int, 3>{});
  else kernel(std::integral_constant<int, 5>{});
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, F32 x, F32 u, F32Out y, int64_t r) {
  const Dims s = dims_of(x, u.dimensions()[2], r);
  return for_kernel_size(s, r, [&](auto size) {
    forward<decltype(size)::value>(pool, x.typed_data(), u.typed_data(), y->typed_data(), s);
  });
}

ffi::Error ForwardPooled(ffi::ThreadPool pool, F32 x, F32 u, F32 bias, F32Out out, int64_t r) {
  const Dims s = dims_of(x, u.dimensions()[2], r);
  return for_kernel_size(s, r, [&](auto size) {
    forward_pooled<decltype(size)::value>(pool, x.typed_data(), u.typed_data(), bias.typed_data(),
                           out->typed_data(), s);
  });
}

ffi::Error Backward(ffi::ThreadPool pool, F32 x, F32 ut, F32 dy, F32Out dx, F32Out du,
                    int64_t r) {
  const Dims s = dims_of(x, ut.dimensions()[1], r);
  return for_kernel_size(s, r, [&](auto size) {
    backward<decltype(size)::value>(pool, x.typed_data(), ut.typed_data(), dy.typed_data(),
                                    dx->typed_data(), du->typed_data(), s);
  });
}

}  // namespace

// Every handler takes XLA's CPU thread pool first and the kernel size r last.
#define WINOGRAD_HANDLER(symbol, impl, buffers) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,       \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() buffers.Attr<int64_t>("r"))

WINOGRAD_HANDLER(WinogradForward, Forward, .Arg<F32>().Arg<F32>().Ret<F32>());
WINOGRAD_HANDLER(WinogradForwardPooled, ForwardPooled,
                 .Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>());
WINOGRAD_HANDLER(WinogradBackward, Backward,
                 .Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>());
