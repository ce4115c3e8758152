// Bias add and tanh-approximate GELU (GPT-2's "gelu_new") for XLA:CPU (jaxlm/cpu_kernels.py).
//
// Why it exists: XLA:CPU ran this in three fusions forward and backward at
// about 5 GB/s, plus a separate column reduction for the bias gradient; the
// reference model spent about 165 ms of its step there (BENCHMARKS.md, "Fourth
// pass"). Here the forward reads x once and writes y; the backward reads x and
// dy once, writes dx and sums the bias gradient on the way.
//
// x, y, dy, dx [M, F] (x is the matmul output before the bias); bias, dbias [F].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace jaxlm;

constexpr int64_t ROWS_PER_TASK = 16;
constexpr float kSqrt2OverPi = 0.7978845608028654f, kCubic = 0.044715f;

// tanh(u) = 1 - 2 / (exp(2u) + 1); vexp clamps, so large |u| gives exactly +-1.
inline vf vtanh(vf u) { return 1.0f - 2.0f / (vexp(2.0f * u) + 1.0f); }
inline float stanh(float u) { return 1.0f - 2.0f / (std::exp(std::min(2.0f * u, 88.0f)) + 1.0f); }

// The tanh argument sqrt(2/pi) (v + c v^3), and d gelu / dv = 0.5 (1 + t) + 0.5 v (1 - t^2)
// sqrt(2/pi) (1 + 3 c v^2) given t = tanh of it; for a vector or a scalar.
template <typename T>
inline T tanh_argument(T v) { return kSqrt2OverPi * (v + kCubic * v * v * v); }
template <typename T>
inline T slope(T v, T t) {
  return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * v * v);
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || bias.dimensions().size() != 1 || bias.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("jaxlm gelu kernel: x [M,F], bias [F] expected");
  const int64_t M = xd[0], F = xd[1];
  const float *X = x.typed_data(), *Bs = bias.typed_data();
  float* Y = y->typed_data();
  parallel_for(pool, (M + ROWS_PER_TASK - 1) / ROWS_PER_TASK, [=](int64_t task) {
    for (int64_t r = task * ROWS_PER_TASK; r < std::min(M, (task + 1) * ROWS_PER_TASK); ++r) {
      const float* xr = X + r * F;
      float* yr = Y + r * F;
      int64_t i = 0;
      for (; i + VL <= F; i += VL) {
        vf v = load(xr + i) + load(Bs + i);
        store(yr + i, 0.5f * v * (1.0f + vtanh(tanh_argument(v))));
      }
      for (; i < F; ++i) {
        float v = xr[i] + Bs[i];
        yr[i] = 0.5f * v * (1.0f + stanh(tanh_argument(v)));
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dbias) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || bias.dimensions().size() != 1 || bias.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("jaxlm gelu kernel: x [M,F], bias [F] expected");
  const int64_t M = xd[0], F = xd[1], tasks = (M + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  const float *X = x.typed_data(), *Bs = bias.typed_data(), *dY = dy.typed_data();
  float* dX = dx->typed_data();
  std::vector<float> partial(tasks * F, 0.0f);  // each task's share of dbias
  float* P = partial.data();
  parallel_for(pool, tasks, [=](int64_t task) {
    float* db = P + task * F;
    for (int64_t r = task * ROWS_PER_TASK; r < std::min(M, (task + 1) * ROWS_PER_TASK); ++r) {
      const float *xr = X + r * F, *dyr = dY + r * F;
      float* dxr = dX + r * F;
      int64_t i = 0;
      for (; i + VL <= F; i += VL) {
        vf v = load(xr + i) + load(Bs + i);
        vf grad = load(dyr + i) * slope(v, vtanh(tanh_argument(v)));
        store(dxr + i, grad);
        store(db + i, load(db + i) + grad);
      }
      for (; i < F; ++i) {
        float v = xr[i] + Bs[i];
        float grad = dyr[i] * slope(v, stanh(tanh_argument(v)));
        dxr[i] = grad;
        db[i] += grad;
      }
    }
  });
  sum_partials(P, tasks, F, F, dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmBiasGeluForward, forward, f32_results<1>(f32_args<2>(bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmBiasGeluBackward, backward, f32_results<2>(f32_args<3>(bind())));
