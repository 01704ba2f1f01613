// SPDX-License-Identifier: Apache-2.0
#include "common.h"

#include <algorithm>
#include <atomic>

namespace msk {

int g_threads = 1;

void parallel_for(int64_t n, const std::function<void(int64_t)> &fn) {
  int workers = static_cast<int>(std::min<int64_t>(g_threads, n));
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  std::atomic<int64_t> next{0};
  auto body = [&]() {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  };
  for (int w = 1; w < workers; ++w) pool.emplace_back(body);
  body();
  for (auto &t : pool) t.join();
}

void gemm_rows(bool ta, bool tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
               float beta, float *c, int ldc) {
  constexpr int kMin = 32;
  if (m >= kMin * g_threads || n < kMin * g_threads) {        // split the rows of C
    int parts = std::max(1, std::min(g_threads, (m + kMin - 1) / kMin));
    int per = (m + parts - 1) / parts;
    parallel_for(parts, [&](int64_t p) {
      int r0 = static_cast<int>(p) * per, rows = std::min(per, m - r0);
      if (rows <= 0) return;
      const float *ap = ta ? a + r0 : a + static_cast<int64_t>(r0) * lda;
      gemm(ta, tb, rows, n, k, alpha, ap, lda, b, ldb, beta, c + static_cast<int64_t>(r0) * ldc, ldc);
    });
    return;
  }
  int parts = std::min(g_threads, (n + kMin - 1) / kMin);      // few rows (decoding): split the columns
  int per = (n + parts - 1) / parts;
  parallel_for(parts, [&](int64_t p) {
    int c0 = static_cast<int>(p) * per, cols = std::min(per, n - c0);
    if (cols <= 0) return;
    const float *bp = tb ? b + static_cast<int64_t>(c0) * ldb : b + c0;
    gemm(ta, tb, m, cols, k, alpha, a, lda, bp, ldb, beta, c + c0, ldc);
  });
}

}  // namespace msk

extern "C" __attribute__((visibility("default"))) void MsLlmSetThreads(int n) {
  msk::g_threads = n < 1 ? 1 : n;
  scipy_openblas_set_num_threads(1);
}

extern "C" __attribute__((visibility("default"))) int MsLlmThreads() { return msk::g_threads; }
