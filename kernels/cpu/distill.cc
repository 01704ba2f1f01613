// SPDX-License-Identifier: Apache-2.0
// Fused lm_head + distillation loss: for student hidden states h [B, S, H] with its output embedding W [V, H],
// and teacher hidden states ht [B, S, Ht] with the teacher's output embedding Wt [V, Ht] (the same vocabulary),
// per position
//     div = D(P, Q)   P = softmax(ht Wt^T / tau), Q = softmax(h W^T / tau)
//     ce  = -log softmax(h W^T)[target]
// with D forward KL(P || Q), reverse KL(Q || P) or the generalized JSD (b KL(P || M) + (1 - b) KL(Q || M),
// M = b P + (1 - b) Q). Both [chunk, V] logit blocks exist one chunk at a time, forward and backward (the
// backward recomputes them), so neither model's [B, S, V] logits, probabilities or gradients exist whole.
// Chunks are pieces of one sequence from its own row 0, as in xent.cc (batch-invariant rows).
#include <algorithm>

#include "common.h"

namespace {
constexpr int64_t kChunk = msk::kLogitChunk;
constexpr float kTiny = 1e-30f;
enum Kind { kForwardKl = 0, kReverseKl = 1, kJsd = 2 };

struct Args {
  float tau, inv_tau, b;
  int kind;
  int64_t hd, htd, vocab;
};

Args read_args(const float *p, int64_t **shapes, int *ndims) {
  Args a;
  a.tau = p[0];
  a.inv_tau = 1.f / p[0];
  a.kind = static_cast<int>(p[1]);
  a.b = p[2];
  a.hd = shapes[0][ndims[0] - 1];
  a.htd = shapes[2][ndims[2] - 1];
  a.vocab = shapes[1][0];
  return a;
}

// zs = h W^T (student, temperature 1) and zt = ht Wt^T / tau (teacher, at tau) for rows [r0, r0 + rows).
void chunk_logits(const float *h, const float *w, const float *ht, const float *wt, const Args &a, int64_t r0,
                  int rows, float *zs, float *zt) {
  int v = static_cast<int>(a.vocab), hd = static_cast<int>(a.hd), htd = static_cast<int>(a.htd);
  msk::gemm_seq(true, 1, rows, v, hd, 1.f, h + r0 * a.hd, hd, w, hd, 0.f, zs, v);
  msk::gemm_seq(true, 1, rows, v, htd, a.inv_tau, ht + r0 * a.htd, htd, wt, htd, 0.f, zt, v);
}

// log sum_j exp(scale * z_j) for a row, with its max taken first.
float log_sum_exp(const float *z, int64_t n, float scale) {
  float mx = msk::row_max(z, n) * scale, s = 0.f;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += msk::fast_exp(z[j + l] * scale - mx);
  s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += msk::fast_exp(z[j] * scale - mx);
  return mx + std::log(s);
}
}  // namespace

// inputs h [B, S, H] (or [T, H]), w [V, H], ht [B, S, Ht], wt [V, Ht], targets [B, S] int32, params [3] =
// (tau > 0, kind 0 forward KL | 1 reverse KL | 2 JSD, jsd beta); outputs div [B, S], ce [B, S] (0 where the
// target is outside [0, V)), stats [B, S, 3] = the log-normalizers of the student at 1, the student at tau
// and the teacher at tau (the backward reads them).
MS_LLM_AOT LinearDistillFwd(AOT_ARGS) {
  auto *h = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *ht = static_cast<const float *>(params[2]);
  auto *wt = static_cast<const float *>(params[3]);
  auto *tgt = static_cast<const int32_t *>(params[4]);
  Args a = read_args(static_cast<const float *>(params[5]), shapes, ndims);
  auto *div = static_cast<float *>(params[6]);
  auto *ce = static_cast<float *>(params[7]);
  auto *stats = static_cast<float *>(params[8]);
  int64_t v = a.vocab;
  std::vector<float> bs(static_cast<size_t>(kChunk * v)), bt(static_cast<size_t>(kChunk * v));
  msk::for_logit_chunks(ndims[0], shapes[0], [&](int64_t r0, int rows) {
    chunk_logits(h, w, ht, wt, a, r0, rows, bs.data(), bt.data());
    msk::split_rows(rows, [&](int i) {
      const float *zs = bs.data() + i * v, *zt = bt.data() + i * v;
      int32_t y = tgt[r0 + i];
      float lse1 = log_sum_exp(zs, v, 1.f), lses = log_sum_exp(zs, v, a.inv_tau), lset = log_sum_exp(zt, v, 1.f);
      double d = 0.0;                                  // a row's divergence sums V small terms
      for (int64_t j = 0; j < v; ++j) {
        float logq = zs[j] * a.inv_tau - lses, logp = zt[j] - lset;
        float p = msk::fast_exp(logp), q = msk::fast_exp(logq);
        if (a.kind == kForwardKl) {
          d += p * (logp - logq);
        } else if (a.kind == kReverseKl) {
          d += q * (logq - logp);
        } else {
          float logm = std::log(std::max(a.b * p + (1.f - a.b) * q, kTiny));
          d += a.b * p * (logp - logm) + (1.f - a.b) * q * (logq - logm);
        }
      }
      float *st = stats + (r0 + i) * 3;
      st[0] = lse1;
      st[1] = lses;
      st[2] = lset;
      div[r0 + i] = static_cast<float>(d);
      ce[r0 + i] = (y >= 0 && y < v) ? lse1 - zs[y] : 0.f;
    });
  });
  return 0;
}

// inputs h, w, ht, wt, targets, params, stats [T, 3], ddiv [T], dce [T]; outputs dh [T, H], dw [V, H].
// With g_j = the gradient of D w.r.t. the student's logits at tau (dense case of losses/distill.py:
// g_j = hb_j - q_j sum_b hb_b, hb = -p (forward KL), q (log q - log p + 1) (reverse KL), (1 - b) q (log q - log m)
// (JSD)), the gradient w.r.t. the logits z = h W^T is ddiv g_j / tau + dce (softmax(z)_j - [j = target]).
MS_LLM_AOT LinearDistillBwd(AOT_ARGS) {
  auto *h = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *ht = static_cast<const float *>(params[2]);
  auto *wt = static_cast<const float *>(params[3]);
  auto *tgt = static_cast<const int32_t *>(params[4]);
  Args a = read_args(static_cast<const float *>(params[5]), shapes, ndims);
  auto *stats = static_cast<const float *>(params[6]);
  auto *ddiv = static_cast<const float *>(params[7]);
  auto *dce = static_cast<const float *>(params[8]);
  auto *dh = static_cast<float *>(params[9]);
  auto *dw = static_cast<float *>(params[10]);
  int64_t v = a.vocab;
  std::vector<float> bs(static_cast<size_t>(kChunk * v)), bt(static_cast<size_t>(kChunk * v));
  std::fill(dw, dw + v * a.hd, 0.f);
  msk::for_logit_chunks(ndims[0], shapes[0], [&](int64_t r0, int rows) {
    chunk_logits(h, w, ht, wt, a, r0, rows, bs.data(), bt.data());
    msk::split_rows(rows, [&](int i) {
      float *zs = bs.data() + i * v, *zt = bt.data() + i * v;
      const float *st = stats + (r0 + i) * 3;
      float lse1 = st[0], lses = st[1], lset = st[2];
      float gd = ddiv[r0 + i] * a.inv_tau, gc = dce[r0 + i];
      int32_t y = tgt[r0 + i];
      if (!(y >= 0 && y < v)) gc = 0.f;
      double total = 0.0;
      for (int64_t j = 0; j < v; ++j) {               // zt <- hb
        float logq = zs[j] * a.inv_tau - lses, logp = zt[j] - lset;
        float p = msk::fast_exp(logp), q = msk::fast_exp(logq), hb;
        if (a.kind == kForwardKl) {
          hb = -p;
        } else if (a.kind == kReverseKl) {
          hb = q * (logq - logp + 1.f);
        } else {
          float logm = std::log(std::max(a.b * p + (1.f - a.b) * q, kTiny));
          hb = (1.f - a.b) * q * (logq - logm);
        }
        zt[j] = hb;
        total += hb;
      }
      float tot = static_cast<float>(total);
      for (int64_t j = 0; j < v; ++j) {               // zs <- d loss / d z
        float q = msk::fast_exp(zs[j] * a.inv_tau - lses), s1 = msk::fast_exp(zs[j] - lse1);
        zs[j] = gd * (zt[j] - q * tot) + gc * s1;
      }
      if (gc != 0.f) zs[y] -= gc;
    });
    int hd = static_cast<int>(a.hd), vv = static_cast<int>(v);
    msk::gemm_seq(false, 1, rows, hd, vv, 1.f, bs.data(), vv, w, hd, 0.f, dh + r0 * a.hd, hd);
    msk::gemm_tn(vv, hd, rows, 1.f, bs.data(), vv, h + r0 * a.hd, hd, 1.f, dw, hd);
  });
  return 0;
}
