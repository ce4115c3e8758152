// Fused float32 attention for XLA:CPU, called from jaxlm/cpu_kernels.py through the XLA FFI.
//
// Why it exists: XLA:CPU runs attention as separate batched 64-wide matmuls
// and elementwise passes over T x S arrays; at the reference config that was
// about 500 ms of a 1.8 s train step against PyTorch's 208 ms for SDPA
// (BENCHMARKS.md, "Fourth pass"). Here each (batch, head) is one task: the
// T x S scores live only in a per-task buffer of QT query rows, the softmax is
// fused into the matmuls, and causal attention skips key tiles after a query
// tile's last row.
//
// Letters: B batch, T queries, S keys, N query heads, K key/value heads
// (G = N / K share one), H head dim. Layouts are jaxlm's own, so no transposes
// are needed around the call: q, out [B, T, N, H]; k, v [B, S, K, H];
// mask [B, T, S] (true = visible); lse [B, N, T] is the scaled log-sum-exp of
// each query row, -inf for a row that sees no key. Such a row gets the mean of
// all values and no gradient to its logits, exactly as jax.nn's masked
// softmax gives it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace jaxlm;

constexpr int QT = 64;  // query rows per tile: the causal skip works at this granularity

struct Dims {
  int64_t B, T, S, N, K, H;
};

ffi::Error check_dims(const Dims& d, ffi::AnyBuffer::Dimensions k, ffi::AnyBuffer::Dimensions v,
                      ffi::AnyBuffer::Dimensions mask) {
  if (k.size() != 4 || v.size() != 4 || mask.size() != 3 || k[0] != d.B || k[3] != d.H || v[0] != d.B ||
      v[1] != k[1] || v[2] != k[2] || v[3] != d.H || mask[0] != d.B || mask[1] != d.T || mask[2] != d.S ||
      d.K == 0 || d.N % d.K != 0)
    return ffi::Error::InvalidArgument("jaxlm attention kernel: q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] expected");
  return ffi::Error::Success();
}

// Scales row `s` of the scores, masks it and exponentiates in place; returns
// the row max (scaled) and sum, or max = -inf when no key is visible.
inline void softmax_row(float* s, const bool* visible, int64_t kend, float scale, float* row_max, float* row_sum) {
  const float neg_inf = -INFINITY;
  vf vmax = splat(neg_inf);
  int64_t j = 0;
  for (; j + VL <= kend; j += VL) {
    vf x = visible_lanes(visible + j) ? load(s + j) * scale : splat(neg_inf);
    store(s + j, x);
    vmax = vmax > x ? vmax : x;
  }
  float m = neg_inf;
  for (int l = 0; l < VL; ++l) m = std::max(m, vmax[l]);
  for (; j < kend; ++j) {
    s[j] = visible[j] ? s[j] * scale : neg_inf;
    m = std::max(m, s[j]);
  }
  *row_max = m;
  if (m == neg_inf) {
    *row_sum = 0.0f;
    return;
  }
  vf sum = vf{};
  for (j = 0; j + VL <= kend; j += VL) {
    vf x = load(s + j);
    vf e = x == neg_inf ? vf{} : vexp(x - m);
    store(s + j, e);
    sum += e;
  }
  float total = 0.0f;
  for (int l = 0; l < VL; ++l) total += sum[l];
  for (; j < kend; ++j) {
    s[j] = s[j] == neg_inf ? 0.0f : std::exp(s[j] - m);
    total += s[j];
  }
  *row_sum = total;
}

// P = exp(scale * s - lse) on visible keys, 0 elsewhere (lse is finite here).
inline void probabilities_row(float* s, const bool* visible, int64_t kend, float scale, float lse) {
  int64_t j = 0;
  for (; j + VL <= kend; j += VL)
    store(s + j, visible_lanes(visible + j) ? vexp(load(s + j) * scale - lse) : vf{});
  for (; j < kend; ++j) s[j] = visible[j] ? std::exp(s[j] * scale - lse) : 0.0f;
}

float dot(const float* x, const float* y, int64_t n) {
  vf sum = vf{};
  int64_t i = 0;
  for (; i + VL <= n; i += VL) sum += load(x + i) * load(y + i);
  float total = 0.0f;
  for (int l = 0; l < VL; ++l) total += sum[l];
  for (; i < n; ++i) total += x[i] * y[i];
  return total;
}

// H x Sp copy of keys or values [b, :, kh, :], transposed, zero past S. Blocks
// of VL keys are read into L1 first, so each store fills a whole vector.
void pack_transposed(const float* x, const Dims& d, int64_t b, int64_t kh, int64_t Sp, float* out) {
  const int64_t stride = d.K * d.H;
  const float* rows = x + (b * d.S * d.K + kh) * d.H;
  int64_t j0 = 0;
  for (; j0 + VL <= d.S; j0 += VL)
    for (int64_t h = 0; h < d.H; ++h) {
      vf column;
      for (int l = 0; l < VL; ++l) column[l] = rows[(j0 + l) * stride + h];
      store(out + h * Sp + j0, column);
    }
  for (int64_t h = 0; h < d.H; ++h) {
    for (int64_t j = j0; j < d.S; ++j) out[h * Sp + j] = rows[j * stride + h];
    std::fill(out + h * Sp + d.S, out + (h + 1) * Sp, 0.0f);
  }
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   bool causal) {
  auto qd = q.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("jaxlm attention kernel: q must be [B,T,N,H]");
  Dims d{qd[0], qd[1], k.dimensions()[1], qd[2], k.dimensions()[2], qd[3]};
  if (auto err = check_dims(d, k.dimensions(), v.dimensions(), mask.dimensions()); err.failure()) return err;
  const float* Q = q.typed_data();
  const float* Kp = k.typed_data();
  const float* V = v.typed_data();
  const bool* M = mask.typed_data();
  float* O = out->typed_data();
  float* L = lse->typed_data();
  const int64_t G = d.N / d.K, Sp = padded_stride(d.S);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  parallel_for(pool, d.B * d.N, [=](int64_t item) {
    const int64_t b = item / d.N, n = item % d.N, kh = n / G;
    float* kt = scratch(0, d.H * Sp);
    float* scores = scratch(1, QT * Sp);
    std::vector<float> mean;
    pack_transposed(Kp, d, b, kh, Sp, kt);
    const float* v_b = V + (b * d.S * d.K + kh) * d.H;
    for (int64_t t0 = 0; t0 < d.T; t0 += QT) {
      const int64_t rows = std::min<int64_t>(QT, d.T - t0);
      const int64_t kend = causal ? std::min(d.S, t0 + rows) : d.S;
      const float* q_t = Q + ((b * d.T + t0) * d.N + n) * d.H;
      float* o_t = O + ((b * d.T + t0) * d.N + n) * d.H;
      gemm(rows, round_up(kend, VL), d.H, q_t, d.N * d.H, 1, kt, Sp, scores, Sp, false);
      float row_max[QT], row_sum[QT];
      for (int64_t r = 0; r < rows; ++r)
        softmax_row(scores + r * Sp, M + (b * d.T + t0 + r) * d.S, kend, scale, row_max + r, row_sum + r);
      gemm(rows, d.H, kend, scores, Sp, 1, v_b, d.K * d.H, o_t, d.N * d.H, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* o = o_t + r * d.N * d.H;
        float* l = L + (b * d.N + n) * d.T + t0 + r;
        if (row_max[r] == -INFINITY) {  // sees no key: the mean of all values, as jax.nn gives
          if (mean.empty()) {
            mean.assign(d.H, 0.0f);
            for (int64_t j = 0; j < d.S; ++j)
              for (int64_t h = 0; h < d.H; ++h) mean[h] += v_b[j * d.K * d.H + h] / d.S;
          }
          std::copy(mean.begin(), mean.end(), o);
          *l = -INFINITY;
          continue;
        }
        const float inv = 1.0f / row_sum[r];
        for (int64_t h = 0; h < d.H; ++h) o[h] *= inv;
        *l = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                    ffi::ResultBuffer<ffi::F32> d_v, bool causal) {
  auto qd = q.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("jaxlm attention kernel: q must be [B,T,N,H]");
  Dims d{qd[0], qd[1], k.dimensions()[1], qd[2], k.dimensions()[2], qd[3]};
  if (auto err = check_dims(d, k.dimensions(), v.dimensions(), mask.dimensions()); err.failure()) return err;
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data(), *O = out.typed_data();
  const float *L = lse.typed_data(), *dO = d_out.typed_data();
  const bool* M = mask.typed_data();
  float *dQ = d_q->typed_data(), *dK = d_k->typed_data(), *dV = d_v->typed_data();
  const int64_t G = d.N / d.K, Sp = padded_stride(d.S);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  // One task per (batch, key/value head): it owns that head's dK and dV rows.
  parallel_for(pool, d.B * d.K, [=](int64_t item) {
    const int64_t b = item / d.K, kh = item % d.K;
    float *kt = scratch(0, d.H * Sp), *vt = scratch(1, d.H * Sp);
    float *probs = scratch(2, 2 * QT * Sp), *d_scores = probs + QT * Sp;
    // This task owns rows [b, :, kh, :] of dK and dV, so the products accumulate there directly.
    float* dk = dK + (b * d.S * d.K + kh) * d.H;
    float* dv = dV + (b * d.S * d.K + kh) * d.H;
    const int64_t ldk = d.K * d.H;
    for (int64_t j = 0; j < d.S; ++j) {
      std::fill(dk + j * ldk, dk + j * ldk + d.H, 0.0f);
      std::fill(dv + j * ldk, dv + j * ldk + d.H, 0.0f);
    }
    std::vector<float> d_out_unseen(d.H, 0.0f);
    pack_transposed(Kp, d, b, kh, Sp, kt);
    pack_transposed(V, d, b, kh, Sp, vt);
    const float* k_b = Kp + (b * d.S * d.K + kh) * d.H;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      for (int64_t t0 = 0; t0 < d.T; t0 += QT) {
        const int64_t rows = std::min<int64_t>(QT, d.T - t0);
        const int64_t kend = causal ? std::min(d.S, t0 + rows) : d.S, kpad = round_up(kend, VL);
        const int64_t offset = ((b * d.T + t0) * d.N + n) * d.H, ld = d.N * d.H;
        gemm(rows, kpad, d.H, Q + offset, ld, 1, kt, Sp, probs, Sp, false);
        gemm(rows, kpad, d.H, dO + offset, ld, 1, vt, Sp, d_scores, Sp, false);
        for (int64_t r = 0; r < rows; ++r) {
          float* p = probs + r * Sp;
          float* ds = d_scores + r * Sp;
          const float* d_o = dO + offset + r * ld;
          const float row_lse = L[(b * d.N + n) * d.T + t0 + r];
          if (row_lse == -INFINITY) {  // sees no key: uniform weights over all S, no logit gradient
            for (int64_t h = 0; h < d.H; ++h) d_out_unseen[h] += d_o[h];
            std::fill(p, p + kend, 0.0f);
            std::fill(ds, ds + kend, 0.0f);
            continue;
          }
          probabilities_row(p, M + (b * d.T + t0 + r) * d.S, kend, scale, row_lse);
          const float row_dot = dot(d_o, O + offset + r * ld, d.H);
          // The scale is folded in here so dQ = dS K and dK = dS^T q need no extra pass.
          for (int64_t j = 0; j < kend; ++j) ds[j] = p[j] * (ds[j] - row_dot) * scale;
        }
        gemm(rows, d.H, kend, d_scores, Sp, 1, k_b, d.K * d.H, dQ + offset, ld, false);
        gemm(kend, d.H, rows, d_scores, 1, Sp, Q + offset, ld, dk, ldk, true);
        gemm(kend, d.H, rows, probs, 1, Sp, dO + offset, ld, dv, ldk, true);
      }
    }
    if (std::any_of(d_out_unseen.begin(), d_out_unseen.end(), [](float x) { return x != 0.0f; }))
      for (int64_t j = 0; j < d.S; ++j)
        for (int64_t h = 0; h < d.H; ++h) dv[j * ldk + h] += d_out_unseen[h] / d.S;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmAttentionForward, forward,
                              f32_results<2>(f32_args<3>(bind()).Arg<ffi::Buffer<ffi::PRED>>()).Attr<bool>("causal"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmAttentionBackward, backward,
                              f32_results<3>(f32_args<3>(f32_args<3>(bind()).Arg<ffi::Buffer<ffi::PRED>>()))
                                  .Attr<bool>("causal"));
