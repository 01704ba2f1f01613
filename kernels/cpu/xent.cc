// SPDX-License-Identifier: Apache-2.0
// Fused lm_head + log-softmax: log p(target) for hidden states [T, H] and an output embedding W [V, H], computed
// in chunks of rows so the [T, V] logits never exist whole (only one [chunk, V] block at a time, forward and
// backward). The chunk GEMMs use every BLAS thread; the row softmax work is split across threads.
#include <algorithm>

#include "common.h"

namespace {
constexpr int64_t kChunk = 256;

// logits = scale * h W^T for rows [r0, r0 + rows) into buf [rows, V]; returns nothing, rows reduced by caller.
void chunk_logits(const float *h, const float *w, float scale, int64_t r0, int rows, int64_t hd, int64_t vocab,
                  float *buf) {
  msk::gemm_rows(false, true, rows, static_cast<int>(vocab), static_cast<int>(hd), scale, h + r0 * hd,
            static_cast<int>(hd), w, static_cast<int>(hd), 0.f, buf, static_cast<int>(vocab));
}

template <typename F>
void split_rows(int rows, F body) {
  msk::parallel_for((rows + 15) / 16, [&](int64_t t) {
    int i1 = std::min<int>(rows, static_cast<int>(t + 1) * 16);
    for (int i = static_cast<int>(t) * 16; i < i1; ++i) body(i);
  });
}
}  // namespace

// inputs h [T, H], w [V, H], targets [T] int32, scale [1]; outputs logp [T] = log softmax(scale h W^T)[target],
// lse [T]. A target outside [0, V) gives logp 0 (callers mask those rows).
MS_LLM_AOT LinearXentFwd(AOT_ARGS) {
  auto *h = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *tgt = static_cast<const int32_t *>(params[2]);
  float scale = *static_cast<const float *>(params[3]);
  auto *logp = static_cast<float *>(params[4]);
  auto *lse = static_cast<float *>(params[5]);
  int64_t t = shapes[0][0], hd = shapes[0][1], vocab = shapes[1][0];
  std::vector<float> buf(static_cast<size_t>(std::min(kChunk, t) * vocab));
  for (int64_t r0 = 0; r0 < t; r0 += kChunk) {
    int rows = static_cast<int>(std::min(kChunk, t - r0));
    chunk_logits(h, w, scale, r0, rows, hd, vocab, buf.data());
    split_rows(rows, [&](int i) {
      const float *z = buf.data() + i * vocab;
      float mx = -INFINITY, sum = 0.f;
      for (int64_t j = 0; j < vocab; ++j) mx = std::max(mx, z[j]);
      for (int64_t j = 0; j < vocab; ++j) sum += std::exp(z[j] - mx);
      float l = mx + std::log(sum);
      int32_t y = tgt[r0 + i];
      lse[r0 + i] = l;
      logp[r0 + i] = (y >= 0 && y < vocab) ? z[y] - l : 0.f;
    });
  }
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
  int64_t t = shapes[0][0], hd = shapes[0][1], vocab = shapes[1][0];
  std::vector<float> buf(static_cast<size_t>(std::min(kChunk, t) * vocab));
  std::fill(dw, dw + vocab * hd, 0.f);
  for (int64_t r0 = 0; r0 < t; r0 += kChunk) {
    int rows = static_cast<int>(std::min(kChunk, t - r0));
    chunk_logits(h, w, scale, r0, rows, hd, vocab, buf.data());
    split_rows(rows, [&](int i) {             // G = d logp / d(h W^T) = scale * g * (onehot(y) - softmax)
      float *z = buf.data() + i * vocab;
      float g = dlogp[r0 + i] * scale, l = lse[r0 + i];
      for (int64_t j = 0; j < vocab; ++j) z[j] = -g * std::exp(z[j] - l);
      int32_t y = tgt[r0 + i];
      if (y >= 0 && y < vocab) z[y] += g;
      else std::fill(z, z + vocab, 0.f);
    });
    msk::gemm_rows(false, false, rows, static_cast<int>(hd), static_cast<int>(vocab), 1.f, buf.data(),
              static_cast<int>(vocab), w, static_cast<int>(hd), 0.f, dh + r0 * hd, static_cast<int>(hd));
    msk::gemm_rows(true, false, static_cast<int>(vocab), static_cast<int>(hd), rows, 1.f, buf.data(),
              static_cast<int>(vocab), h + r0 * hd, static_cast<int>(hd), 1.f, dw, static_cast<int>(hd));
  }
  return 0;
}
