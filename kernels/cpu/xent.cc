// SPDX-License-Identifier: Apache-2.0
// Fused lm_head + log-softmax: log p(target) for hidden states [B, S, H] and an output embedding W [V, H],
// computed in chunks of rows so the [B, S, V] logits never exist whole (one [chunk, V] block at a time, forward
// and backward). A chunk is a piece of one sequence, from the sequence's own row 0 (batch-invariant rows, see
// gemm_seq); the row softmax work is split across threads.
#include <algorithm>

#include "common.h"

namespace {
constexpr int64_t kChunk = msk::kLogitChunk;

// logits = scale * h W^T for rows [r0, r0 + rows) into buf [rows, V].
void chunk_logits(const float *h, const float *w, float scale, int64_t r0, int rows, int64_t hd, int64_t vocab,
                  float *buf) {
  msk::gemm_seq(true, 1, rows, static_cast<int>(vocab), static_cast<int>(hd), scale, h + r0 * hd,
                static_cast<int>(hd), w, static_cast<int>(hd), 0.f, buf, static_cast<int>(vocab));
}
}  // namespace

// inputs h [B, S, H] (or [T, H]), w [V, H], targets [B, S] int32, scale [1]; outputs logp [B, S] =
// log softmax(scale h W^T)[target], lse [B, S]. A target outside [0, V) gives logp 0 (callers mask those rows).
MS_LLM_AOT LinearXentFwd(AOT_ARGS) {
  auto *h = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *tgt = static_cast<const int32_t *>(params[2]);
  float scale = *static_cast<const float *>(params[3]);
  auto *logp = static_cast<float *>(params[4]);
  auto *lse = static_cast<float *>(params[5]);
  int64_t hd = shapes[0][ndims[0] - 1], vocab = shapes[1][0];
  std::vector<float> buf(static_cast<size_t>(kChunk * vocab));
  msk::for_logit_chunks(ndims[0], shapes[0], [&](int64_t r0, int rows) {
    chunk_logits(h, w, scale, r0, rows, hd, vocab, buf.data());
    msk::split_rows(rows, [&](int i) {
      float *z = buf.data() + i * vocab;
      int32_t y = tgt[r0 + i];
      float zy = (y >= 0 && y < vocab) ? z[y] : 0.f;
      float mx = msk::row_max(z, vocab);
      msk::exp_shifted(z, vocab, mx);                 // the row is not needed after this
      float l = mx + std::log(msk::row_sum(z, vocab));
      lse[r0 + i] = l;
      logp[r0 + i] = (y >= 0 && y < vocab) ? zy - l : 0.f;
    });
  });
  return 0;
}

// inputs h, w, targets, scale, lse [T], dlogp [T]; outputs dh [T, H], dw [V, H]
MS_LLM_AOT LinearXentBwd(AOT_ARGS) {
  auto *h = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *tgt = static_cast<const int32_t *>(params[2]);
  float scale = *static_cast<const float *>(params[3]);
  auto *lse = static_cast<const float *>(params[4]);
  auto *dlogp = static_cast<const float *>(params[5]);
  auto *dh = static_cast<float *>(params[6]);
  auto *dw = static_cast<float *>(params[7]);
  int64_t hd = shapes[0][ndims[0] - 1], vocab = shapes[1][0];
  std::vector<float> buf(static_cast<size_t>(kChunk * vocab));
  std::fill(dw, dw + vocab * hd, 0.f);
  msk::for_logit_chunks(ndims[0], shapes[0], [&](int64_t r0, int rows) {
    chunk_logits(h, w, scale, r0, rows, hd, vocab, buf.data());
    msk::split_rows(rows, [&](int i) {             // G = d logp / d(h W^T) = scale * g * (onehot(y) - softmax)
      float *z = buf.data() + i * vocab;
      float g = dlogp[r0 + i] * scale, l = lse[r0 + i];
      msk::exp_shifted(z, vocab, l);
      for (int64_t j = 0; j < vocab; ++j) z[j] *= -g;
      int32_t y = tgt[r0 + i];
      if (y >= 0 && y < vocab) z[y] += g;
      else std::fill(z, z + vocab, 0.f);
    });
    msk::gemm_seq(false, 1, rows, static_cast<int>(hd), static_cast<int>(vocab), 1.f, buf.data(),
                  static_cast<int>(vocab), w, static_cast<int>(hd), 0.f, dh + r0 * hd, static_cast<int>(hd));
    msk::gemm_tn(static_cast<int>(vocab), static_cast<int>(hd), rows, 1.f, buf.data(), static_cast<int>(vocab),
                 h + r0 * hd, static_cast<int>(hd), 1.f, dw, static_cast<int>(hd));
  });
  return 0;
}
