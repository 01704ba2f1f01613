// SPDX-License-Identifier: Apache-2.0
// y = x W^T for x [M, K] and W [N, K] (the Linear cell's layout), and its backward, on OpenBLAS sgemm.
#include "common.h"

// inputs x [M, K], w [N, K]; output y [M, N]
MS_LLM_AOT LinearFwd(AOT_ARGS) {
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  int m = static_cast<int>(shapes[0][0]), k = static_cast<int>(shapes[0][1]), n = static_cast<int>(shapes[1][0]);
  msk::gemm_rows(false, true, m, n, k, 1.f, x, k, w, k, 0.f, y, n);
  return 0;
}

// inputs x [M, K], w [N, K], dy [M, N]; outputs dx [M, K] = dy W, dw [N, K] = dy^T x
MS_LLM_AOT LinearBwd(AOT_ARGS) {
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *dy = static_cast<const float *>(params[2]);
  auto *dx = static_cast<float *>(params[3]);
  auto *dw = static_cast<float *>(params[4]);
  int m = static_cast<int>(shapes[0][0]), k = static_cast<int>(shapes[0][1]), n = static_cast<int>(shapes[1][0]);
  msk::gemm_rows(false, false, m, k, n, 1.f, dy, n, w, k, 0.f, dx, k);
  msk::gemm_rows(true, false, n, k, m, 1.f, dy, n, x, k, 0.f, dw, k);
  return 0;
}

// The same backward for a frozen weight (LoRA's base layers): dx only, dw left at zero without a GEMM.
MS_LLM_AOT LinearBwdFrozen(AOT_ARGS) {
  auto *w = static_cast<const float *>(params[1]);
  auto *dy = static_cast<const float *>(params[2]);
  auto *dx = static_cast<float *>(params[3]);
  auto *dw = static_cast<float *>(params[4]);
  int m = static_cast<int>(shapes[0][0]), k = static_cast<int>(shapes[0][1]), n = static_cast<int>(shapes[1][0]);
  msk::gemm_rows(false, false, m, k, n, 1.f, dy, n, w, k, 0.f, dx, k);
  std::memset(dw, 0, sizeof(float) * static_cast<size_t>(n) * k);
  return 0;
}

// The lm_head product: y = x W^T computed in fixed panels of kPanel output columns, the last one zero-padded,
// so the logit of token j is bitwise the same whatever the vocabulary size (OpenBLAS's tiles depend on N;
// `ms-llm tokenizer expand` promises unchanged logits for the old tokens). Panels are spread across threads.
MS_LLM_AOT HeadFwd(AOT_ARGS) {
  constexpr int kPanel = 256;
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  int m = static_cast<int>(shapes[0][0]), k = static_cast<int>(shapes[0][1]), n = static_cast<int>(shapes[1][0]);
  int64_t panels = (n + kPanel - 1) / kPanel;
  int64_t rows = m >= 64 * msk::g_threads ? (m + msk::g_threads - 1) / msk::g_threads : m;
  int64_t row_parts = (m + rows - 1) / rows;
  msk::parallel_for(panels * row_parts, [&](int64_t t) {
    int64_t p = t / row_parts, r0 = (t % row_parts) * rows;
    int mr = static_cast<int>(std::min<int64_t>(rows, m - r0));
    int c0 = static_cast<int>(p * kPanel), cols = std::min(kPanel, n - c0);
    const float *xp = x + r0 * k;
    if (cols == kPanel) {
      msk::gemm(false, true, mr, kPanel, k, 1.f, xp, k, w + static_cast<int64_t>(c0) * k, k, 0.f,
                y + r0 * n + c0, n);
      return;
    }
    std::vector<float> wpad(static_cast<size_t>(kPanel) * k, 0.f), out(static_cast<size_t>(mr) * kPanel);
    std::memcpy(wpad.data(), w + static_cast<int64_t>(c0) * k, sizeof(float) * cols * k);
    msk::gemm(false, true, mr, kPanel, k, 1.f, xp, k, wpad.data(), k, 0.f, out.data(), kPanel);
    for (int i = 0; i < mr; ++i) std::memcpy(y + (r0 + i) * n + c0, out.data() + i * kPanel, sizeof(float) * cols);
  });
  return 0;
}
