// Float32 dense layers (y = x w + b and its gradients) for XLA:CPU, through
// OpenBLAS (the scipy-openblas32 wheel), called from jaxlm/cpu_kernels.py.
//
// Why it exists: at the reference model's shapes (4096 x 384 x 1536 and
// friends) XLA:CPU's matmuls ran at 260-300 GFLOP/s on 2 cores, OpenBLAS at
// 320-380 and MKL (PyTorch) at 360-400, and matmuls are 70% of the step
// (BENCHMARKS.md, "Fourth pass"). OpenBLAS runs single-threaded here; the
// rows (or weight-gradient columns) are split across XLA's own thread pool,
// which scales better than either library's threading on two cores.
//
// x, dx [M, K]; w, dw [K, N]; bias, dbias [N]; y, dy [M, N].

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace jaxlm;

using Sgemm = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
Sgemm sgemm = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS's enum values

// [begin, end) of part `i` of `n` split into `parts` nearly equal pieces.
inline std::pair<int64_t, int64_t> part(int64_t i, int64_t parts, int64_t n) {
  return {n * i / parts, n * (i + 1) / parts};
}

inline int64_t num_parts(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

ffi::Error check(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w) {
  if (sgemm == nullptr) return ffi::Error::Internal("jaxlm dense kernel: OpenBLAS was not loaded");
  if (x.size() != 2 || w.size() != 2 || x[1] != w[0])
    return ffi::Error::InvalidArgument("jaxlm dense kernel: x [M,K] and w [K,N] expected");
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y) {
  if (auto err = check(x.dimensions(), w.dimensions()); err.failure()) return err;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1], parts = num_parts(pool, M);
  const float *X = x.typed_data(), *W = w.typed_data(), *Bs = bias.typed_data();
  float* Y = y->typed_data();
  parallel_for(pool, parts, [=](int64_t i) {
    auto [m0, m1] = part(i, parts, M);
    for (int64_t m = m0; m < m1; ++m) std::copy(Bs, Bs + N, Y + m * N);
    sgemm(kRowMajor, kNoTrans, kNoTrans, m1 - m0, N, K, 1.0f, X + m0 * K, K, W, N, 1.0f, Y + m0 * N, N);
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                    ffi::ResultBuffer<ffi::F32> dbias) {
  if (auto err = check(x.dimensions(), w.dimensions()); err.failure()) return err;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  const float *X = x.typed_data(), *W = w.typed_data(), *dY = dy.typed_data();
  float *dX = dx->typed_data(), *dW = dw->typed_data(), *dB = dbias->typed_data();
  // dx = dy w^T, split by rows, each part also summing its rows of dy for dbias.
  const int64_t parts = num_parts(pool, M);
  std::vector<float> partial(parts * N, 0.0f);
  float* P = partial.data();
  parallel_for(pool, parts, [=](int64_t i) {
    auto [m0, m1] = part(i, parts, M);
    sgemm(kRowMajor, kNoTrans, kTrans, m1 - m0, K, N, 1.0f, dY + m0 * N, N, W, N, 0.0f, dX + m0 * K, K);
    for (int64_t m = m0; m < m1; ++m) {
      int64_t n = 0;
      for (; n + VL <= N; n += VL) store(P + i * N + n, load(P + i * N + n) + load(dY + m * N + n));
      for (; n < N; ++n) P[i * N + n] += dY[m * N + n];
    }
  });
  sum_partials(P, parts, N, N, dB);
  // dw = x^T dy, split along the longer of its two sides.
  const bool split_rows = K >= N;
  const int64_t w_parts = num_parts(pool, split_rows ? K : N);
  parallel_for(pool, w_parts, [=](int64_t i) {
    auto [a, b] = part(i, w_parts, split_rows ? K : N);
    if (split_rows)
      sgemm(kRowMajor, kTrans, kNoTrans, b - a, N, M, 1.0f, X + a, K, dY, N, 0.0f, dW + a * N, N);
    else
      sgemm(kRowMajor, kTrans, kNoTrans, K, b - a, M, 1.0f, X, K, dY + a, N, 0.0f, dW + a, N);
  });
  return ffi::Error::Success();
}

}  // namespace

// Called once from Python with scipy_cblas_sgemm's address.
extern "C" void JaxlmSetSgemm(void* fn) { sgemm = reinterpret_cast<Sgemm>(fn); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmDenseForward, forward, f32_results<1>(f32_args<3>(bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmDenseBackward, backward, f32_results<3>(f32_args<3>(bind())));
