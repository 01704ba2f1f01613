// SPDX-License-Identifier: Apache-2.0
// y = x W^T for x [B, S, K] (or [M, K]: one sequence) and W [N, K] (the Linear cell's layout), and its backward,
// on OpenBLAS sgemm. Each sequence is computed on its own (gemm_seq), so its rows do not depend on the batch.
#include "common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

// Decoding's products: y = x W^T for a few rows of one token each (x [B, 1, K]). sgemm would be called per row
// (each row its own sequence, to stay batch-invariant) and read all of W once per row; here W streams once for
// every row, in blocks of kNr weight rows against kMr input rows held in registers. Each output is one 8-lane
// fused multiply-add accumulation over K in a fixed order, reduced the same way in every block shape, so a row
// is bitwise the same whatever else is in the batch (and whatever the vocabulary size, for the lm_head).
namespace {
constexpr int kMr = 4, kNr = 3;

#if defined(__AVX2__) && defined(__FMA__)   // (AVX-512 measured no faster on a Zen 4 machine)
constexpr int kLanes = 8;
using Lanes = __m256;
inline Lanes lanes_zero() { return _mm256_setzero_ps(); }
inline Lanes lanes_fma(const float *a, const float *b, Lanes acc) {
  return _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), acc);
}
inline float lanes_sum(Lanes v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
#else
constexpr int kLanes = 8;
struct Lanes {
  float v[8];
};
inline Lanes lanes_zero() { return Lanes{{0, 0, 0, 0, 0, 0, 0, 0}}; }
inline Lanes lanes_fma(const float *a, const float *b, Lanes acc) {
  for (int l = 0; l < 8; ++l) acc.v[l] = std::fma(a[l], b[l], acc.v[l]);
  return acc;
}
inline float lanes_sum(Lanes t) {
  return ((t.v[0] + t.v[1]) + (t.v[2] + t.v[3])) + ((t.v[4] + t.v[5]) + (t.v[6] + t.v[7]));
}
#endif

template <int MR, int NR>
void rows_block(const float *x, const float *w, float *y, int k, int n) {
  Lanes acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = lanes_zero();
  int k8 = k - k % kLanes;
  for (int c = 0; c < k8; c += kLanes)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = lanes_fma(x + i * k + c, w + j * k + c, acc[i][j]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float tail = 0.f;
      for (int c = k8; c < k; ++c) tail = std::fma(x[i * k + c], w[j * k + c], tail);
      y[i * n + j] = lanes_sum(acc[i][j]) + tail;
    }
}

template <int NR>
void rows_panel(const float *x, const float *w, float *y, int m, int k, int n) {
  int i = 0;
  for (; i + kMr <= m; i += kMr) rows_block<kMr, NR>(x + i * k, w, y + i * n, k, n);
  switch (m - i) {
    case 3: rows_block<3, NR>(x + i * k, w, y + i * n, k, n); break;
    case 2: rows_block<2, NR>(x + i * k, w, y + i * n, k, n); break;
    case 1: rows_block<1, NR>(x + i * k, w, y + i * n, k, n); break;
    default: break;
  }
}
}  // namespace

namespace {
struct Product {
  const float *w;
  int n;
  float *y;
};

// y_p = x W_p^T for every product p, x [m, k]: the kNr-row blocks of all the weights form one list of tasks.
void rows_products(const float *x, int m, int k, const Product *ps, int np) {
  std::vector<int> first(np + 1, 0);                 // first block of each product
  for (int p = 0; p < np; ++p) first[p + 1] = first[p] + (ps[p].n + kNr - 1) / kNr;
  int blocks = first[np];
  int64_t work = 0;
  for (int p = 0; p < np; ++p) work += static_cast<int64_t>(m) * ps[p].n * k;
  int per_task = work >= (1 << 19) ? std::max(1, blocks / (8 * std::max(1, msk::g_threads))) : blocks;
  int tasks = (blocks + per_task - 1) / per_task;
  msk::parallel_for(tasks, [&](int64_t t) {
    int b1 = std::min(blocks, static_cast<int>(t + 1) * per_task);
    int p = 0;
    for (int b = static_cast<int>(t) * per_task; b < b1; ++b) {
      while (b >= first[p + 1]) ++p;
      const Product &q = ps[p];
      int j = (b - first[p]) * kNr;
      const float *wj = q.w + static_cast<int64_t>(j) * k;
      switch (std::min(kNr, q.n - j)) {
        case 3: rows_panel<3>(x, wj, q.y + j, m, k, q.n); break;
        case 2: rows_panel<2>(x, wj, q.y + j, m, k, q.n); break;
        default: rows_panel<1>(x, wj, q.y + j, m, k, q.n); break;
      }
    }
  });
}

int rows_of_x(int nd, const int64_t *shape, int k) { return static_cast<int>(msk::numel(nd, shape) / k); }
}  // namespace

// inputs x [B, 1, K] (or [M, K]), w [N, K]; output y [B, 1, N]
MS_LLM_AOT LinearRowsFwd(AOT_ARGS) {
  int k = static_cast<int>(shapes[0][ndims[0] - 1]);
  Product p{static_cast<const float *>(params[1]), static_cast<int>(shapes[1][0]), static_cast<float *>(params[2])};
  rows_products(static_cast<const float *>(params[0]), rows_of_x(ndims[0], shapes[0], k), k, &p, 1);
  return 0;
}

MS_LLM_AOT LinearRowsFwdFrozen(AOT_ARGS) { return LinearRowsFwd(nparam, params, ndims, shapes, dtypes, stream, extra); }

// A decoding step's q, k and v projections in one call: inputs x [B, 1, K], wq, wk, wv; outputs x W^T for each,
// bitwise what three LinearRowsFwd calls give.
MS_LLM_AOT LinearRows3Fwd(AOT_ARGS) {
  int k = static_cast<int>(shapes[0][ndims[0] - 1]);
  Product ps[3];
  for (int i = 0; i < 3; ++i)
    ps[i] = {static_cast<const float *>(params[1 + i]), static_cast<int>(shapes[1 + i][0]),
             static_cast<float *>(params[4 + i])};
  rows_products(static_cast<const float *>(params[0]), rows_of_x(ndims[0], shapes[0], k), k, ps, 3);
  return 0;
}

// A decoding step's gate and up projections and SwiGLU in one call: inputs x [B, 1, K], w_gate, w_up [I, K];
// output silu(x Wg^T) * (x Wu^T) [B, 1, I], bitwise what LinearRowsFwd twice and SwigluFwd give.
MS_LLM_AOT SwigluRowsFwd(AOT_ARGS) {
  int k = static_cast<int>(shapes[0][ndims[0] - 1]), n = static_cast<int>(shapes[1][0]);
  int m = rows_of_x(ndims[0], shapes[0], k);
  std::vector<float> g(static_cast<size_t>(m) * n), u(static_cast<size_t>(m) * n);
  Product ps[2] = {{static_cast<const float *>(params[1]), n, g.data()},
                   {static_cast<const float *>(params[2]), n, u.data()}};
  rows_products(static_cast<const float *>(params[0]), m, k, ps, 2);
  auto *y = static_cast<float *>(params[3]);
  for (size_t i = 0; i < g.size(); ++i) {
    float s = 1.f / (1.f + msk::fast_exp(-g[i]));
    y[i] = g[i] * s * u[i];
  }
  return 0;
}
