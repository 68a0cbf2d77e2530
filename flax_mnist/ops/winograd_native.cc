// Winograd F(4x4, r x r) convolution kernels for CPU, called from XLA as FFI custom calls.
//
// Why hand-written: XLA computes flax_mnist/ops/winograd.py as separate passes (input transform,
// 36 or 64 batched matmuls, output transform), each writing a tile array several times the
// activation's size to memory and reading it back. Here one thread takes a row of tiles (or
// an image) through all of them while its tiles sit in L1/L2. The maths is winograd.py's,
// term for term; the transforms' constants are generated from winograd.transforms() into
// TRANSFORMS_HEADER (flax_mnist/ops/native_build.py) when the kernels are built. Conv2's
// bias, ReLU and 2x2 pool are taken in the output tiles, and the first layer (a one-channel
// direct convolution) writes conv2's input and takes its gradients in conv2's backward pass.
//
// Layouts (row-major, float32, channels a multiple of 16; the caller pads them):
//   x (N, 4*th + r - 1, 4*tw + r - 1, C): the input, padded so that the tiles cover it;
//   u (A*A, C, Co): G w G^T; ut (A*A, Co, C): its transpose per position; A = r + 3;
//   y (N, 4*th, 4*tw, Co): the output; pooled (N, 2*th, 2*tw, Co); positions (uint8) alike.

#include <type_traits>

#include "native_matmul.h"

namespace {

using namespace flax_mnist;

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

typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
inline v16i positions_of(const uint8_t* p) {
  u8x16 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, v16i);
}

// relu(max_pool_2x2(y + bias)), NaN kept, as flax_mnist/ops/pool.py: a 4x4 tile holds four
// whole 2x2 windows. With `positions` (training), also each window's row-major position 0..3
// of its first maximum, or 4 where the pooled value is not > 0 (no gradient passes): the
// backward kernel routes the pooled gradient by it.
template <int R>
void forward_pooled(ffi::ThreadPool& pool, const float* x, const float* u, const float* bias,
                    float* out, uint8_t* positions, const Dims& s) {
  constexpr int A = Tf<R>::A;
  forward_rows<R>(pool, x, u, s, [=](int64_t n, int64_t i, int64_t j, int64_t ch,
                                     const v16 (&m)[A][A]) {
    v16 o[4][4];
    Tf<R>::out(m, o);
    const v16 b = load(bias + ch), zero = v16{};
    for (int a = 0; a < 2; ++a)
      for (int c = 0; c < 2; ++c) {
        const v16 e[4] = {o[2 * a][2 * c] + b, o[2 * a][2 * c + 1] + b,
                          o[2 * a + 1][2 * c] + b, o[2 * a + 1][2 * c + 1] + b};
        const v16 top = max_keeping_nan(e[0], e[1]), bottom = max_keeping_nan(e[2], e[3]);
        const v16 value = max_keeping_nan(top, bottom);
        const int64_t at = ((n * 2 * s.th + 2 * i + a) * 2 * s.tw + 2 * j + c) * s.co + ch;
        store(out + at, value <= zero ? zero : value);
        if (positions) {
          v16i position = v16i{} + 4;
          for (int k = 3; k >= 0; --k) position = e[k] == value ? v16i{} + k : position;
          position = value > zero ? position : v16i{} + 4;
          const u8x16 bytes = __builtin_convertvector(position, u8x16);
          std::memcpy(positions + at, &bytes, sizeof bytes);
        }
      }
  });
}

// The output gradient of tile (i, j) of image n, channels ch..ch+15: read from dy (the
// full-size output's), or from the pooled output's gradient routed to each window's
// recorded position.
struct OutputGradient {
  const float* dy;
  const uint8_t* positions;  // Null for a full-size dy.
  void tile(const Dims& s, int64_t n, int64_t i, int64_t j, int64_t ch, v16 (&g)[4][4]) const {
    if (!positions) {
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          g[a][b] = load(dy + ((n * 4 * s.th + 4 * i + a) * 4 * s.tw + 4 * j + b) * s.co + ch);
      return;
    }
    for (int a = 0; a < 2; ++a)
      for (int c = 0; c < 2; ++c) {
        const int64_t at = ((n * 2 * s.th + 2 * i + a) * 2 * s.tw + 2 * j + c) * s.co + ch;
        const v16 d = load(dy + at);
        const v16i position = positions_of(positions + at);
        for (int k = 0; k < 4; ++k)
          g[2 * a + k / 2][2 * c + k % 2] = position == k ? d : v16{};
      }
  }
};

// The first layer, a one-channel image's convolution, as conv2's kernels' producer:
// image (N, hi, wi), w1 (r*r, C), b1 (C); y1 = relu(conv + b1) (N, h, w, C) in conv2's
// input layout, zero past the valid hi-r+1 x wi-r+1 outputs (conv2's padded tiles).
struct Image {
  const float* pixels;
  int64_t hi, wi;
};

template <int R>
void conv1_forward(ffi::ThreadPool& pool, const Image& image, const float* w1, const float* b1,
                   float* y1, const Dims& s) {
  const int64_t oh = image.hi - R + 1, ow = image.wi - R + 1;
  parallel_for(pool, s.n * s.h, std::make_shared<int>(0), [=](int64_t row, int) {
    const int64_t n = row / s.h, i = row % s.h;
    float* out = y1 + row * s.w * s.c;
    if (i >= oh) {
      std::fill(out, out + s.w * s.c, 0.0f);
      return;
    }
    const float* rows = image.pixels + (n * image.hi + i) * image.wi;
    for (int64_t ch = 0; ch < s.c; ch += 16) {
      v16 w[R * R];
      for (int k = 0; k < R * R; ++k) w[k] = load(w1 + k * s.c + ch);
      const v16 b = load(b1 + ch), zero = v16{};
      for (int64_t j = 0; j < ow; ++j) {
        v16 acc = b;
        for (int k = 0; k < R; ++k)
          for (int l = 0; l < R; ++l) acc += splat(rows[k * image.wi + j + l]) * w[k * R + l];
        store(out + j * s.c + ch, acc <= zero ? zero : acc);  // NaN kept.
      }
      for (int64_t j = ow; j < s.w; ++j) store(out + j * s.c + ch, zero);
    }
  });
}

// The first layer's gradients from image n's input gradient of conv2 (dx1, h x w x C): its
// ReLU passes dx1 where y1 > 0; db1 += that, dw1[k][l] += the pixels it saw times that.
template <int R>
void conv1_backward_image(const Image& image, const float* y1, const float* dx1, float* dw1,
                          float* db1, const Dims& s, int64_t n) {
  const int64_t oh = image.hi - R + 1, ow = image.wi - R + 1;
  const float* pixels = image.pixels + n * image.hi * image.wi;
  for (int64_t ch = 0; ch < s.c; ch += 16) {
    v16 dw[R * R] = {}, db = {};
    for (int64_t i = 0; i < oh; ++i)
      for (int64_t j = 0; j < ow; ++j) {
        const int64_t at = (i * s.w + j) * s.c + ch;
        const v16 g = load(y1 + n * s.h * s.w * s.c + at) > v16{} ? load(dx1 + at) : v16{};
        db += g;
        for (int k = 0; k < R; ++k)
          for (int l = 0; l < R; ++l)
            dw[k * R + l] += splat(pixels[(i + k) * image.wi + j + l]) * g;
      }
    for (int k = 0; k < R * R; ++k) store(dw1 + k * s.c + ch, load(dw1 + k * s.c + ch) + dw[k]);
    store(db1 + ch, load(db1 + ch) + db);
  }
}

// dM = A dY A^T of image n's tiles; dV = dM U^T; dU += V^T dM (V recomputed from x, cheaper
// than storing it); dx = the tiles B dV B^T added where they overlap.
template <int R>
void backward_image(const float* x, const float* ut, const OutputGradient& dy, float* image,
                    float* du, const Dims& s, int64_t n, float* vb, float* dvb, float* mb) {
  constexpr int A = Tf<R>::A;
  const int64_t tiles = s.th * s.tw;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t i = t / s.tw, j = t % s.tw;
    for (int64_t ch = 0; ch < s.c; ch += 16) input_tile<R>(x, s, n, i, j, ch, vb, tiles, t);
    for (int64_t ch = 0; ch < s.co; ch += 16) {
      v16 g[4][4], m[A][A];
      dy.tile(s, n, i, j, ch, g);
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
// it), as XLA's own reductions are. With the first layer fused (`image`), dx is not
// written: each image's stays in scratch for that layer's gradients, summed as dU is.
struct Gradients {
  float* dx;  // (N, h, w, C), or null with `image`.
  float* du;
  const Image* image;  // The first layer fused: its image, and where dw1 and db1 go.
  float* dw1;
  float* db1;
};

template <int R>
void backward(ffi::ThreadPool& pool, const float* x, const float* ut, OutputGradient dy,
              const Gradients& out, const Dims& s) {
  constexpr int A = Tf<R>::A;
  const int64_t tiles = s.th * s.tw, image_size = s.h * s.w * s.c;
  const int64_t v_size = A * A * tiles * s.c, m_size = A * A * tiles * s.co;
  const int64_t u_size = A * A * s.c * s.co, w1_size = out.image ? (R * R + 1) * s.c : 0;
  const int64_t sum_size = u_size + w1_size;
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t groups = std::min<int64_t>(s.n, std::max<int64_t>(4, 2 * workers));
  auto scratch = std::make_shared<Scratch>(workers);
  std::vector<float> sums(groups * sum_size, 0.0f);
  float* group_sums = sums.data();
  const Image* image = out.image;
  float* dx = out.dx;
  parallel_for(pool, groups, scratch, [=](int64_t group, int worker) {
    std::vector<float>& buffer = scratch->buffers[worker];
    if (buffer.empty()) buffer.resize(2 * v_size + m_size + (image ? image_size : 0));
    float *vb = buffer.data(), *dvb = vb + v_size, *mb = dvb + v_size, *dx1 = mb + m_size;
    float* sum = group_sums + group * sum_size;
    for (int64_t n = group * s.n / groups; n < (group + 1) * s.n / groups; ++n) {
      backward_image<R>(x, ut, dy, image ? dx1 : dx + n * image_size, sum, s, n, vb, dvb, mb);
      if (image) {
        float* dw1 = sum + u_size;
        conv1_backward_image<R>(*image, x, dx1, dw1, dw1 + R * R * s.c, s, n);
      }
    }
  });
  for (int64_t group = 1; group < groups; ++group)
    for (int64_t e = 0; e < sum_size; ++e) group_sums[e] += group_sums[group * sum_size + e];
  std::copy(group_sums, group_sums + u_size, out.du);
  if (image) {
    std::copy(group_sums + u_size, group_sums + u_size + R * R * s.c, out.dw1);
    std::copy(group_sums + u_size + R * R * s.c, group_sums + sum_size, out.db1);
  }
}

ffi::Error check(const Dims& s, int64_t r) {
  if ((r != 3 && r != 5) || s.c % 16 || s.co % 16 || s.th < 1 || s.tw < 1 ||
      s.h != 4 * s.th + r - 1 || s.w != 4 * s.tw + r - 1)
    return ffi::Error::InvalidArgument("winograd_native: unsupported shapes");
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
using U8 = ffi::Buffer<ffi::U8>;
using U8Out = ffi::ResultBuffer<ffi::U8>;

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
                                          out->typed_data(), nullptr, s);
  });
}

ffi::Error ForwardPooledTrain(ffi::ThreadPool pool, F32 x, F32 u, F32 bias, F32Out out,
                              U8Out positions, int64_t r) {
  const Dims s = dims_of(x, u.dimensions()[2], r);
  return for_kernel_size(s, r, [&](auto size) {
    forward_pooled<decltype(size)::value>(pool, x.typed_data(), u.typed_data(), bias.typed_data(),
                                          out->typed_data(), positions->typed_data(), s);
  });
}

ffi::Error Backward(ffi::ThreadPool pool, F32 x, F32 ut, F32 dy, F32Out dx, F32Out du,
                    int64_t r) {
  const Dims s = dims_of(x, ut.dimensions()[1], r);
  return for_kernel_size(s, r, [&](auto size) {
    backward<decltype(size)::value>(pool, x.typed_data(), ut.typed_data(),
                                    {dy.typed_data(), nullptr},
                                    {dx->typed_data(), du->typed_data(), nullptr, nullptr, nullptr},
                                    s);
  });
}

ffi::Error BackwardPooled(ffi::ThreadPool pool, F32 x, F32 ut, U8 positions, F32 dpooled,
                          F32Out dx, F32Out du, int64_t r) {
  const Dims s = dims_of(x, ut.dimensions()[1], r);
  return for_kernel_size(s, r, [&](auto size) {
    backward<decltype(size)::value>(pool, x.typed_data(), ut.typed_data(),
                                    {dpooled.typed_data(), positions.typed_data()},
                                    {dx->typed_data(), du->typed_data(), nullptr, nullptr, nullptr},
                                    s);
  });
}

Image image_of(const F32& image) {
  auto d = image.dimensions();
  return {image.typed_data(), d[1], d[2]};
}

ffi::Error Conv1(ffi::ThreadPool pool, F32 image, F32 w1, F32 b1, F32Out y1, int64_t r) {
  const Dims s = dims_of(*y1, 16, r);
  const Image pixels = image_of(image);
  return for_kernel_size(s, r, [&](auto size) {
    conv1_forward<decltype(size)::value>(pool, pixels, w1.typed_data(), b1.typed_data(),
                                         y1->typed_data(), s);
  });
}

// Conv2's gradient from the pooled gradient, with the first layer's: dx1 is never written.
ffi::Error BackwardPair(ffi::ThreadPool pool, F32 x, F32 ut, U8 positions, F32 dpooled,
                        F32 image, F32Out du, F32Out dw1, F32Out db1, int64_t r) {
  const Dims s = dims_of(x, ut.dimensions()[1], r);
  const Image pixels = image_of(image);
  return for_kernel_size(s, r, [&](auto size) {
    backward<decltype(size)::value>(pool, x.typed_data(), ut.typed_data(),
                                    {dpooled.typed_data(), positions.typed_data()},
                                    {nullptr, du->typed_data(), &pixels, dw1->typed_data(),
                                     db1->typed_data()},
                                    s);
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
WINOGRAD_HANDLER(WinogradForwardPooledTrain, ForwardPooledTrain,
                 .Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<U8>());
WINOGRAD_HANDLER(WinogradBackwardPooled, BackwardPooled,
                 .Arg<F32>().Arg<F32>().Arg<U8>().Arg<F32>().Ret<F32>().Ret<F32>());
WINOGRAD_HANDLER(WinogradConv1, Conv1, .Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>());
WINOGRAD_HANDLER(WinogradBackwardPair, BackwardPair,
                 .Arg<F32>().Arg<F32>().Arg<U8>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>()
                     .Ret<F32>());
WINOGRAD_HANDLER(WinogradBackward, Backward,
                 .Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>());
