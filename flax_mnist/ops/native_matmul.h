// Vectors of 16 floats, a register-blocked matmul and a parallel loop on XLA's CPU thread
// pool: the building blocks of winograd_native.cc (hand-written: see that file).

#ifndef FLAX_MNIST_NATIVE_MATMUL_H_
#define FLAX_MNIST_NATIVE_MATMUL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace flax_mnist {

namespace ffi = xla::ffi;

// 16 floats: one AVX-512 register, two AVX2 ones; GCC and Clang vector extensions.
typedef float v16 __attribute__((vector_size(64)));
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }

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

struct Scratch {
  std::vector<std::vector<float>> buffers;  // Per worker.
  explicit Scratch(int workers) : buffers(workers) {}
};

}  // namespace flax_mnist

#endif  // FLAX_MNIST_NATIVE_MATMUL_H_
