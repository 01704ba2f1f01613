// SPDX-License-Identifier: Apache-2.0
// Decoding attention over a KV cache, written in place: the new keys and values go into their cache slots, then
// each query attends to its row's filled slots only, so a step's cost follows the tokens in the cache, not its
// capacity.
//
// Query row b reads and writes cache row rows[b] (a refilled row of a continuous batch is prefilled alone). A
// cache row holds its tokens in the contiguous slots [start, ...): query t of row b sits in slot slots[b, t]
// and sees the slots start[b] .. slots[b, t] (causal inside a prefill of T tokens). Slots before start (left
// padding) and after the query are never read; a padding query (slot before start) gets zeros.
#include <algorithm>

#include "common.h"

// inputs q [B, N, T, D], k, v [B, Nkv, T, D], k_cache, v_cache [Bc, Nkv, C, D] (written), rows [B] int32,
// slots [B, T] int32, start [B] int32, scale [1]; output o [B, T, N, D] (the layout o_proj reads).
// Returns 1 (MindSpore raises) for a row or slot outside the cache or a cache row given twice, before writing
// anything.
MS_LLM_AOT KvAttend(AOT_ARGS) {
  auto *q = static_cast<const float *>(params[0]);
  auto *k = static_cast<const float *>(params[1]);
  auto *v = static_cast<const float *>(params[2]);
  auto *kc = static_cast<float *>(params[3]);
  auto *vc = static_cast<float *>(params[4]);
  auto *rows = static_cast<const int32_t *>(params[5]);
  auto *slots = static_cast<const int32_t *>(params[6]);
  auto *start = static_cast<const int32_t *>(params[7]);
  float scale = *static_cast<const float *>(params[8]);
  auto *o = static_cast<float *>(params[9]);
  int64_t b = shapes[0][0], n = shapes[0][1], t = shapes[0][2], d = shapes[0][3];
  int64_t nkv = shapes[1][1], rows_c = shapes[3][0], cap = shapes[3][2], rep = n / nkv;
  std::vector<char> used(rows_c, 0);                  // two query rows on one cache row would race
  for (int64_t i = 0; i < b; ++i) {
    if (rows[i] < 0 || rows[i] >= rows_c || start[i] < 0 || used[rows[i]]) return 1;
    used[rows[i]] = 1;
  }
  for (int64_t i = 0; i < b * t; ++i)
    if (slots[i] < 0 || slots[i] >= cap) return 1;
  int64_t work = b * n * t;
  int64_t longest = 0;
  for (int64_t i = 0; i < b * t; ++i) longest = std::max<int64_t>(longest, slots[i] - start[i / t] + 1);
  longest = std::max<int64_t>(longest, 1);
  auto task = [&](int64_t bk) {
    int64_t bi = bk / nkv, hk = bk % nkv, ck = rows[bi] * nkv + hk;
    float *kr = kc + ck * cap * d, *vr = vc + ck * cap * d;
    const int32_t *sl = slots + bi * t;
    for (int64_t i = 0; i < t; ++i) {
      std::copy(k + (bk * t + i) * d, k + (bk * t + i + 1) * d, kr + sl[i] * d);
      std::copy(v + (bk * t + i) * d, v + (bk * t + i + 1) * d, vr + sl[i] * d);
    }
    int64_t k0 = start[bi];
    std::vector<float> p(longest), acc(d);
    for (int64_t r = 0; r < rep; ++r) {
      int64_t h = hk * rep + r;
      for (int64_t i = 0; i < t; ++i) {
        const float *qr = q + ((bi * n + h) * t + i) * d;
        int64_t len = sl[i] - k0 + 1;
        float *orow = o + ((bi * t + i) * n + h) * d;
        if (len <= 0) {                        // a left-padding slot of a prefill: no key, nothing reads it
          std::fill(orow, orow + d, 0.f);
          continue;
        }
        for (int64_t j = 0; j < len; ++j) p[j] = scale * msk::row_dot(qr, kr + (k0 + j) * d, d);
        float mx = msk::row_max(p.data(), len);
        for (int64_t j = 0; j < len; ++j) p[j] = std::exp(p[j] - mx);
        float inv = 1.f / msk::row_sum(p.data(), len);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < len; ++j) {
          const float *vj = vr + (k0 + j) * d;
          float pj = p[j];
          for (int64_t c = 0; c < d; ++c) acc[c] += pj * vj[c];
        }
        for (int64_t c = 0; c < d; ++c) orow[c] = acc[c] * inv;
      }
    }
  };
  if (work * longest * d < (1 << 18)) {          // a few microseconds of work: threads would cost more
    for (int64_t bk = 0; bk < b * nkv; ++bk) task(bk);
  } else {
    msk::parallel_for(b * nkv, task);
  }
  return 0;
}
