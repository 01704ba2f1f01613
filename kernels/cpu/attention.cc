// SPDX-License-Identifier: Apache-2.0
// Flash attention on CPU: grouped-query attention with an additive mask, computed block by block with an online
// softmax, so no [B, N, Sq, Sk] score tensor exists. Block products run on OpenBLAS sgemm (one thread per task).
//
// Mask: bias [B, 1, Sq, Sk] from ops.mask_bias (0 = attend, float32 lowest = masked); key blocks a whole query
// block may not see are skipped. A query row with no visible key gets what the reference softmax gives it: a
// uniform average over every key (its lse is stored as +inf to mark it).
#include <algorithm>

#include "common.h"

namespace {
constexpr int kBq = 64;    // query rows per block
constexpr int kBk = 128;   // keys per block

struct Dims {
  int64_t b, n, nkv, sq, sk, d;
};

Dims dims_of(int64_t **shapes) {
  return {shapes[0][0], shapes[0][1], shapes[1][1], shapes[0][2], shapes[1][2], shapes[0][3]};
}

bool block_visible(const float *bias_rows, int64_t sk, int mq, int64_t k0, int nk) {
  for (int i = 0; i < mq; ++i) {
    const float *r = bias_rows + i * sk + k0;
    for (int j = 0; j < nk; ++j)
      if (r[j] > msk::kMasked) return true;
  }
  return false;
}
}  // namespace

// inputs q [B, N, Sq, D], k, v [B, Nkv, Sk, D], bias [B, 1, Sq, Sk], scale [1]
// outputs o [B, Sq, N, D] (the layout o_proj reads), lse [B, N, Sq]
MS_LLM_AOT FlashAttnFwd(AOT_ARGS) {
  auto *q = static_cast<const float *>(params[0]);
  auto *k = static_cast<const float *>(params[1]);
  auto *v = static_cast<const float *>(params[2]);
  auto *bias = static_cast<const float *>(params[3]);
  float scale = *static_cast<const float *>(params[4]);
  auto *o = static_cast<float *>(params[5]);
  auto *lse = static_cast<float *>(params[6]);
  Dims t = dims_of(shapes);
  int64_t qblocks = (t.sq + kBq - 1) / kBq, rep = t.n / t.nkv, d = t.d;
  msk::parallel_for(t.b * t.n * qblocks, [&](int64_t task) {
    int64_t qb = task % qblocks, bh = task / qblocks, b = bh / t.n, h = bh % t.n, hk = h / rep;
    int64_t q0 = qb * kBq;
    int mq = static_cast<int>(std::min<int64_t>(kBq, t.sq - q0));
    const float *qp = q + (bh * t.sq + q0) * d;
    const float *kp = k + (b * t.nkv + hk) * t.sk * d, *vp = v + (b * t.nkv + hk) * t.sk * d;
    const float *brow = bias + (b * t.sq + q0) * t.sk;
    std::vector<float> s(kBq * kBk), acc(kBq * d, 0.f), m(kBq, -INFINITY), l(kBq, 0.f);
    for (int64_t k0 = 0; k0 < t.sk; k0 += kBk) {
      int nk = static_cast<int>(std::min<int64_t>(kBk, t.sk - k0));
      if (!block_visible(brow, t.sk, mq, k0, nk)) continue;
      msk::gemm(false, true, mq, nk, d, scale, qp, d, kp + k0 * d, d, 0.f, s.data(), kBk);
      for (int i = 0; i < mq; ++i) {
        float *sr = s.data() + i * kBk;
        const float *br = brow + i * t.sk + k0;
        for (int j = 0; j < nk; ++j) sr[j] += br[j];
        float mx = msk::row_max(sr, nk);
        if (mx <= msk::kMasked) {             // nothing visible in this block for this row
          std::fill(sr, sr + nk, 0.f);
          continue;
        }
        float mnew = std::max(m[i], mx), alpha = std::exp(m[i] - mnew);
        msk::exp_shifted(sr, nk, mnew);
        float sum = msk::row_sum(sr, nk);
        if (alpha != 1.f)
          for (int64_t c = 0; c < d; ++c) acc[i * d + c] *= alpha;
        l[i] = l[i] * alpha + sum;
        m[i] = mnew;
      }
      msk::gemm(false, false, mq, d, nk, 1.f, s.data(), kBk, vp + k0 * d, d, 1.f, acc.data(), d);
    }
    for (int i = 0; i < mq; ++i) {
      float *orow = o + ((b * t.sq + q0 + i) * t.n + h) * d;
      float *lrow = lse + bh * t.sq + q0 + i;
      if (l[i] > 0.f) {
        float inv = 1.f / l[i];
        for (int64_t c = 0; c < d; ++c) orow[c] = acc[i * d + c] * inv;
        *lrow = m[i] + std::log(l[i]);
      } else {                                 // no visible key: uniform over all keys, as the reference
        std::fill(orow, orow + d, 0.f);
        for (int64_t j = 0; j < t.sk; ++j)
          for (int64_t c = 0; c < d; ++c) orow[c] += vp[j * d + c];
        for (int64_t c = 0; c < d; ++c) orow[c] /= static_cast<float>(t.sk);
        *lrow = INFINITY;
      }
    }
  });
  return 0;
}

// inputs q, k, v, bias, scale, o [B, Sq, N, D], lse [B, N, Sq], do [B, Sq, N, D]
// outputs dq [B, N, Sq, D], dk, dv [B, Nkv, Sk, D]
MS_LLM_AOT FlashAttnBwd(AOT_ARGS) {
  auto *q = static_cast<const float *>(params[0]);
  auto *k = static_cast<const float *>(params[1]);
  auto *v = static_cast<const float *>(params[2]);
  auto *bias = static_cast<const float *>(params[3]);
  float scale = *static_cast<const float *>(params[4]);
  auto *o = static_cast<const float *>(params[5]);
  auto *lse = static_cast<const float *>(params[6]);
  auto *dout = static_cast<const float *>(params[7]);
  auto *dq = static_cast<float *>(params[8]);
  auto *dk = static_cast<float *>(params[9]);
  auto *dv = static_cast<float *>(params[10]);
  Dims t = dims_of(shapes);
  int64_t rep = t.n / t.nkv, d = t.d, ld = t.n * d;   // ld: row stride of o and do (BSND)
  float uniform = 1.f / static_cast<float>(t.sk);
  msk::parallel_for(t.b * t.nkv, [&](int64_t task) {    // one task owns a kv head: its dk, dv and dq rows
    int64_t b = task / t.nkv, hk = task % t.nkv;
    const float *kp = k + task * t.sk * d, *vp = v + task * t.sk * d;
    float *dkp = dk + task * t.sk * d, *dvp = dv + task * t.sk * d;
    std::fill(dkp, dkp + t.sk * d, 0.f);
    std::fill(dvp, dvp + t.sk * d, 0.f);
    std::vector<float> p(kBq * kBk), dp(kBq * kBk), di(kBq);
    for (int64_t r = 0; r < rep; ++r) {
      int64_t h = hk * rep + r, bh = b * t.n + h;
      for (int64_t q0 = 0; q0 < t.sq; q0 += kBq) {
        int mq = static_cast<int>(std::min<int64_t>(kBq, t.sq - q0));
        const float *qp = q + (bh * t.sq + q0) * d;
        float *dqp = dq + (bh * t.sq + q0) * d;
        const float *op = o + ((b * t.sq + q0) * t.n + h) * d, *dop = dout + ((b * t.sq + q0) * t.n + h) * d;
        const float *lp = lse + bh * t.sq + q0, *brow = bias + (b * t.sq + q0) * t.sk;
        std::fill(dqp, dqp + mq * d, 0.f);
        bool any_flagged = false;
        for (int i = 0; i < mq; ++i) {
          di[i] = msk::row_dot(dop + i * ld, op + i * ld, d);
          any_flagged = any_flagged || std::isinf(lp[i]);
        }
        for (int64_t k0 = 0; k0 < t.sk; k0 += kBk) {
          int nk = static_cast<int>(std::min<int64_t>(kBk, t.sk - k0));
          if (!any_flagged && !block_visible(brow, t.sk, mq, k0, nk)) continue;
          msk::gemm(false, true, mq, nk, d, scale, qp, d, kp + k0 * d, d, 0.f, p.data(), kBk);
          for (int i = 0; i < mq; ++i) {
            float *pr = p.data() + i * kBk;
            const float *br = brow + i * t.sk + k0;
            if (std::isinf(lp[i])) {
              std::fill(pr, pr + nk, uniform);
            } else {
              for (int j = 0; j < nk; ++j) pr[j] += br[j];
              msk::exp_shifted(pr, nk, lp[i]);
            }
          }
          msk::gemm(true, false, nk, d, mq, 1.f, p.data(), kBk, dop, ld, 1.f, dvp + k0 * d, d);
          msk::gemm(false, true, mq, nk, d, 1.f, dop, ld, vp + k0 * d, d, 0.f, dp.data(), kBk);
          for (int i = 0; i < mq; ++i) {
            float *pr = p.data() + i * kBk;
            const float *dpr = dp.data() + i * kBk;
            for (int j = 0; j < nk; ++j) pr[j] = pr[j] * (dpr[j] - di[i]);
          }
          msk::gemm(false, false, mq, d, nk, scale, p.data(), kBk, kp + k0 * d, d, 1.f, dqp, d);
          msk::gemm(true, false, nk, d, mq, scale, p.data(), kBk, qp, d, 1.f, dkp + k0 * d, d);
        }
      }
    }
  });
  return 0;
}
