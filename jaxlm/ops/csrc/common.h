// Shared pieces of jaxlm's CPU kernels (attention.cc, norm.cc): vector types,
// register-blocked matmul, and a parallel loop on XLA's intra-op thread pool.
//
// Compiled on first use with -march=native (jaxlm/cpu_kernels.py), so the
// vector width follows the machine: 16 floats with AVX-512, 8 with AVX2, 4
// otherwise.

#ifndef JAXLM_CSRC_COMMON_H_
#define JAXLM_CSRC_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxlm {

#if defined(__AVX512F__)
constexpr int VL = 16, NV = 4;  // 6 x 4 accumulators of 32 registers
#elif defined(__AVX2__)
constexpr int VL = 8, NV = 2;   // 6 x 2 accumulators of 16 registers
#else
constexpr int VL = 4, NV = 4;
#endif
constexpr int MR = 6;   // rows of C per micro-kernel

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vf_u __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint8_t vb_u __attribute__((vector_size(VL), aligned(1)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
inline vf splat(float x) { return x - vf{}; }  // x - 0 is exact, so this compiles to one broadcast
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// All-ones lanes where the mask byte is true.
inline vi visible_lanes(const bool* m) {
  return __builtin_convertvector(*reinterpret_cast<const vb_u*>(m), vi) != 0;
}
// Row stride of the T x S scratch: a whole number of vectors, but not a power
// of two, so the rows of a panel do not all land in the same few L1 sets.
inline int64_t padded_stride(int64_t S) { return round_up(std::max<int64_t>(S, 1), VL) + VL; }

// Per-thread scratch, kept between calls: fresh multi-megabyte buffers cost page faults each time.
inline float* scratch(int slot, size_t size) {
  static thread_local std::vector<float> buffers[4];
  if (buffers[slot].size() < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

// exp on a vector: 2^n * p(f), f in [-ln2/2, ln2/2], degree-6 Taylor (< 2 ulp).
inline vf vexp(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  vf f = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  vf p = splat(1.0f / 720);
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)bits;
}

// C[i, c] (+)= sum_p A[i * ar + p * ac] * B[p * ldb + c] for i < R, c < W * VL.
template <int R, int W>
inline void micro(int64_t depth, const float* A, int64_t ar, int64_t ac, const float* B, int64_t ldb,
                  float* C, int64_t ldc, bool accumulate) {
  vf c[R][W];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < W; ++j) c[i][j] = accumulate ? load(C + i * ldc + j * VL) : vf{};
  for (int64_t p = 0; p < depth; ++p) {
    vf b[W];
    for (int j = 0; j < W; ++j) b[j] = load(B + p * ldb + j * VL);
    for (int i = 0; i < R; ++i) {
      vf a = splat(A[i * ar + p * ac]);
      for (int j = 0; j < W; ++j) c[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < W; ++j) store(C + i * ldc + j * VL, c[i][j]);
}

template <int W>
inline void row_panels(int64_t M, int64_t depth, const float* A, int64_t ar, int64_t ac, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) micro<MR, W>(depth, A + i * ar, ar, ac, B, ldb, C + i * ldc, ldc, accumulate);
  const float* a = A + i * ar;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: micro<5, W>(depth, a, ar, ac, B, ldb, c, ldc, accumulate); break;
    case 4: micro<4, W>(depth, a, ar, ac, B, ldb, c, ldc, accumulate); break;
    case 3: micro<3, W>(depth, a, ar, ac, B, ldb, c, ldc, accumulate); break;
    case 2: micro<2, W>(depth, a, ar, ac, B, ldb, c, ldc, accumulate); break;
    case 1: micro<1, W>(depth, a, ar, ac, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// C (M x N, row stride ldc) (+)= A (M x depth, strides ar, ac) . B (depth x N, row stride ldb).
inline void gemm(int64_t M, int64_t N, int64_t depth, const float* A, int64_t ar, int64_t ac, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t c0 = 0;
  for (; c0 + NV * VL <= N; c0 += NV * VL) row_panels<NV>(M, depth, A, ar, ac, B + c0, ldb, C + c0, ldc, accumulate);
  for (; c0 + VL <= N; c0 += VL) row_panels<1>(M, depth, A, ar, ac, B + c0, ldb, C + c0, ldc, accumulate);
  if (c0 == N) return;
  for (int64_t i = 0; i < M; ++i)  // fewer than VL columns left (head dims below the vector width)
    for (int64_t c = c0; c < N; ++c) {
      float sum = accumulate ? C[i * ldc + c] : 0.0f;
      for (int64_t p = 0; p < depth; ++p) sum += A[i * ar + p * ac] * B[p * ldb + c];
      C[i * ldc + c] = sum;
    }
}

// Runs f(0..n-1) on the calling thread and the XLA intra-op pool. Tasks take
// indices from a shared counter, so a pool thread that starts late (busy with
// another XLA op) finds nothing left and touches nothing but the shared state.
inline void parallel_for(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    std::function<void(int64_t)> f;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->f = std::move(f);
  auto run = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.n;) {
      s.f(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, run] { run(*state); });
  run(*state);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// A binding extended by `count` (at least 1) float32 arguments or results.
template <int count, typename Binding>
auto f32_args(Binding&& binding) {
  // Bindings can be neither copied nor moved: each step must return a fresh prvalue.
  if constexpr (count == 1) return std::move(binding).template Arg<ffi::Buffer<ffi::F32>>();
  else return f32_args<count - 1>(std::move(binding).template Arg<ffi::Buffer<ffi::F32>>());
}
template <int count, typename Binding>
auto f32_results(Binding&& binding) {
  if constexpr (count == 1) return std::move(binding).template Ret<ffi::Buffer<ffi::F32>>();
  else return f32_results<count - 1>(std::move(binding).template Ret<ffi::Buffer<ffi::F32>>());
}
// Ffi::Bind() with XLA's intra-op thread pool, which every jaxlm kernel takes first.
inline auto bind() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); }

// out[i] = sum over t < tasks of partial[t * stride + i], for i < n: the
// column sums (bias and scale gradients) that each task kept for its rows.
inline void sum_partials(const float* partial, int64_t tasks, int64_t stride, int64_t n, float* out) {
  std::fill(out, out + n, 0.0f);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < n; ++i) out[i] += partial[t * stride + i];
}

}  // namespace jaxlm

#endif  // JAXLM_CSRC_COMMON_H_
