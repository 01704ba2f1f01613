// SPDX-License-Identifier: Apache-2.0
// y = x W^T for x [B, S, K] (or [M, K]: one sequence) and W [N, K] (the Linear cell's layout), and its backward,
// on OpenBLAS sgemm. Each sequence is computed on its own (gemm_seq), so its rows do not depend on the batch.
#include "common.h"

namespace {
struct Rows {
  int nseq, s, k;
};

Rows rows_of(int nd, const int64_t *shape) {
  if (nd == 3) return {static_cast<int>(shape[0]), static_cast<int>(shape[1]), static_cast<int>(shape[2])};
  return {1, static_cast<int>(shape[0]), static_cast<int>(shape[1])};
}
}  // namespace

// inputs x [B, S, K], w [N, K]; output y [B, S, N]
MS_LLM_AOT LinearFwd(AOT_ARGS) {
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  Rows r = rows_of(ndims[0], shapes[0]);
  int n = static_cast<int>(shapes[1][0]);
  msk::gemm_seq(true, r.nseq, r.s, n, r.k, 1.f, x, r.k, w, r.k, 0.f, y, n);
  return 0;
}

namespace {
// dx [B, S, K] = dy W; dw [N, K] = dy^T x summed over every row (skipped for a frozen weight)
void linear_bwd(void **params, int *ndims, int64_t **shapes, bool weight_grad) {
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *dy = static_cast<const float *>(params[2]);
  auto *dx = static_cast<float *>(params[3]);
  auto *dw = static_cast<float *>(params[4]);
  Rows r = rows_of(ndims[0], shapes[0]);
  int n = static_cast<int>(shapes[1][0]), m = r.nseq * r.s;
  msk::gemm_seq(false, r.nseq, r.s, r.k, n, 1.f, dy, n, w, r.k, 0.f, dx, r.k);
  if (weight_grad)
    msk::gemm_tn(n, r.k, m, 1.f, dy, n, x, r.k, 0.f, dw, r.k);
  else
    std::memset(dw, 0, sizeof(float) * static_cast<size_t>(n) * r.k);
}
}  // namespace

// inputs x, w, dy; outputs dx, dw
MS_LLM_AOT LinearBwd(AOT_ARGS) {
  linear_bwd(params, ndims, shapes, true);
  return 0;
}

// The same backward for a frozen weight (LoRA's base layers): dx only, dw left at zero without a GEMM.
MS_LLM_AOT LinearBwdFrozen(AOT_ARGS) {
  linear_bwd(params, ndims, shapes, false);
  return 0;
}

// The lm_head product: as LinearFwd, but the last column panel is computed zero-padded to a whole panel, so the
// logit of token j is bitwise the same whatever the vocabulary size (`ms-llm tokenizer expand` keeps the old
// tokens' logits, as MindSpore's MatMul does).
MS_LLM_AOT HeadFwd(AOT_ARGS) {
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  Rows r = rows_of(ndims[0], shapes[0]);
  int n = static_cast<int>(shapes[1][0]), full = n - n % msk::kPanel, rest = n % msk::kPanel;
  if (full) msk::gemm_seq(true, r.nseq, r.s, full, r.k, 1.f, x, r.k, w, r.k, 0.f, y, n);
  if (rest) {
    int m = r.nseq * r.s;
    std::vector<float> wpad(static_cast<size_t>(msk::kPanel) * r.k, 0.f), out(static_cast<size_t>(m) * msk::kPanel);
    std::memcpy(wpad.data(), w + static_cast<int64_t>(full) * r.k, sizeof(float) * rest * r.k);
    msk::gemm_seq(true, r.nseq, r.s, msk::kPanel, r.k, 1.f, x, r.k, wpad.data(), r.k, 0.f, out.data(), msk::kPanel);
    for (int i = 0; i < m; ++i)
      std::memcpy(y + static_cast<int64_t>(i) * n + full, out.data() + static_cast<int64_t>(i) * msk::kPanel,
                  sizeof(float) * rest);
  }
  return 0;
}

// The same forwards under their own names, for the frozen-weight ops: GRAPH_MODE treats two Custom ops with the
// same function as one, and would give a trainable layer the frozen layer's backward (no weight gradient).
MS_LLM_AOT LinearFwdFrozen(AOT_ARGS) { return LinearFwd(nparam, params, ndims, shapes, dtypes, stream, extra); }
MS_LLM_AOT HeadFwdFrozen(AOT_ARGS) { return HeadFwd(nparam, params, ndims, shapes, dtypes, stream, extra); }
