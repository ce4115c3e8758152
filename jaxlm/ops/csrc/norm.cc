// LayerNorm and RMSNorm over the last axis, float32, for XLA:CPU (jaxlm/cpu_kernels.py).
//
// Why it exists: XLA:CPU split each norm's forward and backward into several
// fusions, and sent the row and column reductions to YNNPACK; the 13 norms of
// the reference model took about 290 ms of a 1.8 s step against PyTorch's
// 31 ms for LayerNorm (BENCHMARKS.md, "Fourth pass"). Here each block of rows
// is read once per pass while it sits in L1.
//
// x, y, dx [M, D]; scale, bias, dscale, dbias [D]; mean, rstd [M] are the
// residuals (mean is 0 for RMSNorm, which skips the centering; jaxlm gives it
// a zero bias).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace jaxlm;

constexpr int64_t ROWS_PER_TASK = 64;

float sum(const float* x, int64_t n) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + VL <= n; i += VL) acc += load(x + i);
  float total = 0.0f;
  for (int l = 0; l < VL; ++l) total += acc[l];
  for (; i < n; ++i) total += x[i];
  return total;
}

float centered_square_sum(const float* x, float center, int64_t n) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    vf c = load(x + i) - center;
    acc += c * c;
  }
  float total = 0.0f;
  for (int l = 0; l < VL; ++l) total += acc[l];
  for (; i < n; ++i) total += (x[i] - center) * (x[i] - center);
  return total;
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> rstd, bool rms, float eps) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || scale.dimensions().size() != 1 || scale.dimensions()[0] != xd[1] ||
      bias.dimensions().size() != 1 || bias.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("jaxlm norm kernel: x [M,D], scale [D], bias [D] expected");
  const int64_t M = xd[0], D = xd[1];
  const float *X = x.typed_data(), *W = scale.typed_data(), *Bs = bias.typed_data();
  float *Y = y->typed_data(), *Mean = mean->typed_data(), *Rstd = rstd->typed_data();
  parallel_for(pool, (M + ROWS_PER_TASK - 1) / ROWS_PER_TASK, [=](int64_t task) {
    for (int64_t r = task * ROWS_PER_TASK; r < std::min(M, (task + 1) * ROWS_PER_TASK); ++r) {
      const float* xr = X + r * D;
      float* yr = Y + r * D;
      const float mu = rms ? 0.0f : sum(xr, D) / D;
      const float rs = 1.0f / std::sqrt(centered_square_sum(xr, mu, D) / D + eps);
      Mean[r] = mu;
      Rstd[r] = rs;
      int64_t i = 0;
      for (; i + VL <= D; i += VL) store(yr + i, (load(xr + i) - mu) * rs * load(W + i) + load(Bs + i));
      for (; i < D; ++i) yr[i] = (xr[i] - mu) * rs * W[i] + Bs[i];
    }
  });
  return ffi::Error::Success();
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy scale (no mean(g) term
// for RMSNorm); dscale and dbias are column sums, each task keeping its own.
ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, bool rms) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || scale.dimensions().size() != 1 || scale.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("jaxlm norm kernel: x [M,D], scale [D] expected");
  const int64_t M = xd[0], D = xd[1], tasks = (M + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  const float *X = x.typed_data(), *W = scale.typed_data(), *Mean = mean.typed_data();
  const float *Rstd = rstd.typed_data(), *dY = dy.typed_data();
  float* dX = dx->typed_data();
  std::vector<float> partial(2 * tasks * D, 0.0f);  // per task: dscale, then dbias
  float* P = partial.data();
  parallel_for(pool, tasks, [=](int64_t task) {
    float* ds = P + 2 * task * D;
    float* db = ds + D;
    float* g = scratch(0, D);
    float* xhat = scratch(1, D);
    for (int64_t r = task * ROWS_PER_TASK; r < std::min(M, (task + 1) * ROWS_PER_TASK); ++r) {
      const float *xr = X + r * D, *dyr = dY + r * D;
      const float mu = Mean[r], rs = Rstd[r];
      vf g_sum = vf{}, gx_sum = vf{};
      int64_t i = 0;
      for (; i + VL <= D; i += VL) {
        vf xh = (load(xr + i) - mu) * rs, dyv = load(dyr + i), gv = dyv * load(W + i);
        store(xhat + i, xh);
        store(g + i, gv);
        store(ds + i, load(ds + i) + dyv * xh);
        store(db + i, load(db + i) + dyv);
        g_sum += gv;
        gx_sum += gv * xh;
      }
      float g_total = 0.0f, gx_total = 0.0f;
      for (int l = 0; l < VL; ++l) g_total += g_sum[l], gx_total += gx_sum[l];
      for (; i < D; ++i) {
        xhat[i] = (xr[i] - mu) * rs;
        g[i] = dyr[i] * W[i];
        ds[i] += dyr[i] * xhat[i];
        db[i] += dyr[i];
        g_total += g[i];
        gx_total += g[i] * xhat[i];
      }
      const float g_mean = rms ? 0.0f : g_total / D, gx_mean = gx_total / D;
      float* dxr = dX + r * D;
      for (i = 0; i + VL <= D; i += VL) store(dxr + i, (load(g + i) - g_mean - load(xhat + i) * gx_mean) * rs);
      for (; i < D; ++i) dxr[i] = (g[i] - g_mean - xhat[i] * gx_mean) * rs;
    }
  });
  sum_partials(P, tasks, 2 * D, D, dscale->typed_data());
  sum_partials(P + D, tasks, 2 * D, D, dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmNormForward, forward,
                              f32_results<3>(f32_args<3>(bind())).Attr<bool>("rms").Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmNormBackward, backward, f32_results<3>(f32_args<5>(bind())).Attr<bool>("rms"));
