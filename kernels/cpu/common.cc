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

// Batch invariance: a row of C must come out bitwise the same whatever else is in the batch, so that a batch
// equals its accumulated micro-batches and data-parallel ranks equal one process. OpenBLAS computes a row
// differently depending on where it sits in its tiles (measured: slices of a product differ unless they
// start and end on the kernel's tile grid), so each sequence gets its own calls, from its own row 0, and
// the columns go in fixed panels: an element then depends on the sequence length, the width and its own
// position only, never on the batch size.
void gemm_seq(bool tb, int nseq, int s, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
              float beta, float *c, int ldc) {
  int panels = (n + kPanel - 1) / kPanel;
  parallel_for(static_cast<int64_t>(nseq) * panels, [&](int64_t t) {
    int q = static_cast<int>(t / panels), c0 = static_cast<int>(t % panels) * kPanel;
    int cols = std::min(kPanel, n - c0);
    const float *bp = tb ? b + static_cast<int64_t>(c0) * ldb : b + c0;
    gemm(false, tb, s, cols, k, alpha, a + static_cast<int64_t>(q) * s * lda, lda, bp, ldb, beta,
         c + static_cast<int64_t>(q) * s * ldc + c0, ldc);
  });
}

// C = A^T B with A [k, m]: a weight's gradient (a sum over every row of the batch); its rows are split across
// threads in panels.
void gemm_tn(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c,
             int ldc) {
  int panels = (m + kPanel - 1) / kPanel;
  parallel_for(panels, [&](int64_t p) {
    int r0 = static_cast<int>(p) * kPanel, rows = std::min(kPanel, m - r0);
    gemm(true, false, rows, n, k, alpha, a + r0, lda, b, ldb, beta, c + static_cast<int64_t>(r0) * ldc, ldc);
  });
}

}  // namespace msk

extern "C" __attribute__((visibility("default"))) void MsLlmSetThreads(int n) {
  msk::g_threads = n < 1 ? 1 : n;
  scipy_openblas_set_num_threads(1);
}

extern "C" __attribute__((visibility("default"))) int MsLlmThreads() { return msk::g_threads; }
