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
// softmax gives it. Self-attention can also pass the fused projection's output
// qkv [B, T, N + 2K, H] as it is and get d_qkv back in the same layout, which
// saves splitting it in the forward pass and concatenating in the backward.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace {

using namespace jaxlm;

constexpr int QT = 32;  // query rows per tile: the causal skip works at this granularity

struct Dims {
  int64_t B, T, S, N, K, H;
};

// Where rows live: position (b, t) of q starts at q + (b * T + t) * q_row, its
// head n at + n * H; likewise k and v with S and kv_row. The same for gradients.
template <typename T>
struct Rows {
  T *q, *k, *v;
  int64_t q_row, kv_row;
};
using Layout = Rows<const float>;
using GradLayout = Rows<float>;

// qkv [B, T, N + 2K, H]: the fused projection's output, heads q, then k, then v.
template <typename T>
Rows<T> packed_rows(T* qkv, const Dims& d) {
  const int64_t row = (d.N + 2 * d.K) * d.H;
  return {qkv, qkv + d.N * d.H, qkv + (d.N + d.K) * d.H, row, row};
}

ffi::Error bad_input(const char* expected) {
  return ffi::Error::InvalidArgument(std::string("jaxlm attention kernel: expected ") + expected);
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

// H x Sp copy of keys or values (b, :, kh, :), transposed, zero past S. Blocks
// of VL keys are read into L1 first, so each store fills a whole vector.
void pack_transposed(const float* x, int64_t row, const Dims& d, int64_t b, int64_t kh, int64_t Sp, float* out) {
  const float* rows = x + b * d.S * row + kh * d.H;
  int64_t j0 = 0;
  for (; j0 + VL <= d.S; j0 += VL)
    for (int64_t h = 0; h < d.H; ++h) {
      vf column;
      for (int l = 0; l < VL; ++l) column[l] = rows[(j0 + l) * row + h];
      store(out + h * Sp + j0, column);
    }
  for (int64_t h = 0; h < d.H; ++h) {
    for (int64_t j = j0; j < d.S; ++j) out[h * Sp + j] = rows[j * row + h];
    std::fill(out + h * Sp + d.S, out + (h + 1) * Sp, 0.0f);
  }
}

void forward(ffi::ThreadPool& pool, const Dims& d, const Layout& in, const bool* M, float* O, float* L, bool causal) {
  const int64_t G = d.N / d.K, Sp = padded_stride(d.S), o_row = d.N * d.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  parallel_for(pool, d.B * d.N, [=](int64_t item) {
    const int64_t b = item / d.N, n = item % d.N, kh = n / G;
    float* kt = scratch(0, d.H * Sp);
    float* scores = scratch(1, QT * Sp);
    std::vector<float> mean;
    pack_transposed(in.k, in.kv_row, d, b, kh, Sp, kt);
    const float* v_b = in.v + b * d.S * in.kv_row + kh * d.H;
    for (int64_t t0 = 0; t0 < d.T; t0 += QT) {
      const int64_t rows = std::min<int64_t>(QT, d.T - t0);
      const int64_t kend = causal ? std::min(d.S, t0 + rows) : d.S;
      const float* q_t = in.q + (b * d.T + t0) * in.q_row + n * d.H;
      float* o_t = O + (b * d.T + t0) * o_row + n * d.H;
      gemm(rows, round_up(kend, VL), d.H, q_t, in.q_row, 1, kt, Sp, scores, Sp, false);
      float row_max[QT], row_sum[QT];
      for (int64_t r = 0; r < rows; ++r)
        softmax_row(scores + r * Sp, M + (b * d.T + t0 + r) * d.S, kend, scale, row_max + r, row_sum + r);
      gemm(rows, d.H, kend, scores, Sp, 1, v_b, in.kv_row, o_t, o_row, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* o = o_t + r * o_row;
        float* l = L + (b * d.N + n) * d.T + t0 + r;
        if (row_max[r] == -INFINITY) {  // sees no key: the mean of all values, as jax.nn gives
          if (mean.empty()) {
            mean.assign(d.H, 0.0f);
            for (int64_t j = 0; j < d.S; ++j)
              for (int64_t h = 0; h < d.H; ++h) mean[h] += v_b[j * in.kv_row + h] / d.S;
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
}

void backward(ffi::ThreadPool& pool, const Dims& d, const Layout& in, const bool* M, const float* O,
              const float* L, const float* dO, const GradLayout& out, bool causal) {
  const int64_t G = d.N / d.K, Sp = padded_stride(d.S), o_row = d.N * d.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  // One task per (batch, key/value head): it owns that head's dK and dV rows.
  parallel_for(pool, d.B * d.K, [=](int64_t item) {
    const int64_t b = item / d.K, kh = item % d.K;
    float *kt = scratch(0, d.H * Sp), *vt = scratch(1, d.H * Sp);
    float *probs = scratch(2, 2 * QT * Sp), *d_scores = probs + QT * Sp;
    // The products accumulate straight into this task's rows of dK and dV.
    float* dk = out.k + b * d.S * out.kv_row + kh * d.H;
    float* dv = out.v + b * d.S * out.kv_row + kh * d.H;
    for (int64_t j = 0; j < d.S; ++j) {
      std::fill(dk + j * out.kv_row, dk + j * out.kv_row + d.H, 0.0f);
      std::fill(dv + j * out.kv_row, dv + j * out.kv_row + d.H, 0.0f);
    }
    std::vector<float> d_out_unseen(d.H, 0.0f);
    pack_transposed(in.k, in.kv_row, d, b, kh, Sp, kt);
    pack_transposed(in.v, in.kv_row, d, b, kh, Sp, vt);
    const float* k_b = in.k + b * d.S * in.kv_row + kh * d.H;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      for (int64_t t0 = 0; t0 < d.T; t0 += QT) {
        const int64_t rows = std::min<int64_t>(QT, d.T - t0);
        const int64_t kend = causal ? std::min(d.S, t0 + rows) : d.S, kpad = round_up(kend, VL);
        const float* q_t = in.q + (b * d.T + t0) * in.q_row + n * d.H;
        const int64_t o_offset = (b * d.T + t0) * o_row + n * d.H;
        gemm(rows, kpad, d.H, q_t, in.q_row, 1, kt, Sp, probs, Sp, false);
        gemm(rows, kpad, d.H, dO + o_offset, o_row, 1, vt, Sp, d_scores, Sp, false);
        for (int64_t r = 0; r < rows; ++r) {
          float* p = probs + r * Sp;
          float* ds = d_scores + r * Sp;
          const float* d_o = dO + o_offset + r * o_row;
          const float row_lse = L[(b * d.N + n) * d.T + t0 + r];
          if (row_lse == -INFINITY) {  // sees no key: uniform weights over all S, no logit gradient
            for (int64_t h = 0; h < d.H; ++h) d_out_unseen[h] += d_o[h];
            std::fill(p, p + kend, 0.0f);
            std::fill(ds, ds + kend, 0.0f);
            continue;
          }
          probabilities_row(p, M + (b * d.T + t0 + r) * d.S, kend, scale, row_lse);
          const float row_dot = dot(d_o, O + o_offset + r * o_row, d.H);
          // The scale is folded in here so dQ = dS K and dK = dS^T q need no extra pass.
          for (int64_t j = 0; j < kend; ++j) ds[j] = p[j] * (ds[j] - row_dot) * scale;
        }
        gemm(rows, d.H, kend, d_scores, Sp, 1, k_b, in.kv_row,
             out.q + (b * d.T + t0) * out.q_row + n * d.H, out.q_row, false);
        gemm(kend, d.H, rows, d_scores, 1, Sp, q_t, in.q_row, dk, out.kv_row, true);
        gemm(kend, d.H, rows, probs, 1, Sp, dO + o_offset, o_row, dv, out.kv_row, true);
      }
    }
    if (std::any_of(d_out_unseen.begin(), d_out_unseen.end(), [](float x) { return x != 0.0f; }))
      for (int64_t j = 0; j < d.S; ++j)
        for (int64_t h = 0; h < d.H; ++h) dv[j * out.kv_row + h] += d_out_unseen[h] / d.S;
  });
}

using F32 = ffi::Buffer<ffi::F32>;
using Pred = ffi::Buffer<ffi::PRED>;

// Separate q [B,T,N,H], k and v [B,S,K,H].
ffi::Error separate_dims(const F32& q, const F32& k, const F32& v, const Pred& mask, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3)
    return bad_input("q [B,T,N,H], k and v [B,S,K,H], mask [B,T,S]");
  *d = Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
  if (kd[0] != d->B || kd[3] != d->H || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] ||
      md[0] != d->B || md[1] != d->T || md[2] != d->S || d->K == 0 || d->N % d->K != 0)
    return bad_input("q [B,T,N,H], k and v [B,S,K,H] with N a multiple of K, mask [B,T,S]");
  return ffi::Error::Success();
}

// Packed qkv [B,T,N+2K,H] for self-attention.
ffi::Error packed_dims(const F32& qkv, const Pred& mask, int64_t num_heads, Dims* d) {
  auto xd = qkv.dimensions(), md = mask.dimensions();
  if (xd.size() != 4 || md.size() != 3) return bad_input("qkv [B,T,N+2K,H], mask [B,T,T]");
  const int64_t kv_heads = (xd[2] - num_heads) / 2;
  *d = Dims{xd[0], xd[1], xd[1], num_heads, kv_heads, xd[3]};
  if (kv_heads <= 0 || num_heads + 2 * kv_heads != xd[2] || num_heads % kv_heads != 0 || md[0] != d->B ||
      md[1] != d->T || md[2] != d->T)
    return bad_input("qkv [B,T,N+2K,H] with N (num_heads) a multiple of K, mask [B,T,T]");
  return ffi::Error::Success();
}

ffi::Error forward_separate(ffi::ThreadPool pool, F32 q, F32 k, F32 v, Pred mask, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse, bool causal) {
  Dims d;
  if (auto err = separate_dims(q, k, v, mask, &d); err.failure()) return err;
  Layout in{q.typed_data(), k.typed_data(), v.typed_data(), d.N * d.H, d.K * d.H};
  forward(pool, d, in, mask.typed_data(), out->typed_data(), lse->typed_data(), causal);
  return ffi::Error::Success();
}

ffi::Error backward_separate(ffi::ThreadPool pool, F32 q, F32 k, F32 v, Pred mask, F32 out, F32 lse, F32 d_out,
                             ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                             ffi::ResultBuffer<ffi::F32> d_v, bool causal) {
  Dims d;
  if (auto err = separate_dims(q, k, v, mask, &d); err.failure()) return err;
  Layout in{q.typed_data(), k.typed_data(), v.typed_data(), d.N * d.H, d.K * d.H};
  GradLayout grads{d_q->typed_data(), d_k->typed_data(), d_v->typed_data(), d.N * d.H, d.K * d.H};
  backward(pool, d, in, mask.typed_data(), out.typed_data(), lse.typed_data(), d_out.typed_data(), grads, causal);
  return ffi::Error::Success();
}

ffi::Error forward_packed(ffi::ThreadPool pool, F32 qkv, Pred mask, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> lse, bool causal, int64_t num_heads) {
  Dims d;
  if (auto err = packed_dims(qkv, mask, num_heads, &d); err.failure()) return err;
  forward(pool, d, packed_rows<const float>(qkv.typed_data(), d), mask.typed_data(), out->typed_data(),
          lse->typed_data(), causal);
  return ffi::Error::Success();
}

ffi::Error backward_packed(ffi::ThreadPool pool, F32 qkv, Pred mask, F32 out, F32 lse, F32 d_out,
                           ffi::ResultBuffer<ffi::F32> d_qkv, bool causal, int64_t num_heads) {
  Dims d;
  if (auto err = packed_dims(qkv, mask, num_heads, &d); err.failure()) return err;
  backward(pool, d, packed_rows<const float>(qkv.typed_data(), d), mask.typed_data(), out.typed_data(),
           lse.typed_data(), d_out.typed_data(), packed_rows(d_qkv->typed_data(), d), causal);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmAttentionForward, forward_separate,
                              f32_results<2>(f32_args<3>(bind()).Arg<Pred>()).Attr<bool>("causal"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmAttentionBackward, backward_separate,
                              f32_results<3>(f32_args<3>(f32_args<3>(bind()).Arg<Pred>())).Attr<bool>("causal"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmPackedAttentionForward, forward_packed,
                              f32_results<2>(f32_args<1>(bind()).Arg<Pred>())
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("num_heads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmPackedAttentionBackward, backward_packed,
                              f32_results<1>(f32_args<3>(f32_args<1>(bind()).Arg<Pred>()))
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("num_heads"));
