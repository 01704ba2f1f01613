// SPDX-License-Identifier: Apache-2.0
// Shared helpers for the CPU kernels: the MindSpore aot entry signature, a small thread pool loop, and the
// BLAS entry points (OpenBLAS from the scipy-openblas32 wheel, symbols prefixed "scipy_").
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#include "cblas.h"

#define MS_LLM_AOT extern "C" __attribute__((visibility("default"))) int
#define AOT_ARGS int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra

namespace msk {

// Threads a kernel may use (set once from Python through MsLlmSetThreads; defaults to 1).
extern int g_threads;

// Masked attention scores equal float32's lowest value (ops.mask_bias); anything below half of it is masked.
constexpr float kMasked = -1.7e38f;

inline int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

// Runs fn(i) for i in [0, n) on up to g_threads threads (the calling thread included), tasks taken in order.
// OpenBLAS itself is kept at one thread: every parallel split is ours, so concurrent kernels stay safe and a
// result does not depend on how many threads computed it.
void parallel_for(int64_t n, const std::function<void(int64_t)> &fn);

// Row-major sgemm: C[m,n] = alpha * op(A) op(B) + beta * C.
inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                 int ldb, float beta, float *c, int ldc) {
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha,
                    a, lda, b, ldb, beta, c, ldc);
}

// exp(x) in float32 without calls or branches, so loops over it vectorize: Cody-Waite range reduction and
// Cephes' degree-6 polynomial (about 2 ulp from expf). Exactly 0 below -87.33 (masked scores sit near
// float32's lowest value), large but finite above 88.37 (softmax arguments are never positive).
inline float fast_exp(float x) {
  constexpr float kHi = 88.3762626647949f, kLo = -87.3365447504019f;
  float xc = std::min(std::max(x, kLo), kHi);
  constexpr float kRound = 12582912.f;              // 1.5 * 2^23: adding and subtracting it rounds to nearest
  float n = (xc * 1.44269504088896341f + kRound) - kRound;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kLo ? 0.f : p * scale;
}

// z[j] = exp(z[j] - shift), vectorized.
inline void exp_shifted(float *z, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) z[j] = fast_exp(z[j] - shift);
}

// Sum and max of a row with eight independent lanes (vectorizes without reassociating flags).
inline float row_sum(const float *z, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += z[j + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += z[j];
  return s;
}

inline float row_max(const float *z, int64_t n) {
  float acc[8];
  for (int l = 0; l < 8; ++l) acc[l] = -INFINITY;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] = std::max(acc[l], z[j + l]);
  float m = acc[0];
  for (int l = 1; l < 8; ++l) m = m > acc[l] ? m : acc[l];
  for (; j < n; ++j) m = m > z[j] ? m : z[j];
  return m;
}

// Dot product of two rows, eight lanes.
inline float row_dot(const float *a, const float *b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * b[j + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Rows of vocabulary-sized logits the fused lm_head kernels (xent.cc, distill.cc) hold at a time.
constexpr int64_t kLogitChunk = 256;

// The chunks of a [B, S] (or [T]) batch of rows: body(first row, rows) for pieces of at most kLogitChunk rows,
// each inside one sequence and starting from the sequence's own row 0 (batch-invariant rows, see gemm_seq).
template <typename F>
void for_logit_chunks(int nd, const int64_t *shape, F body) {
  int64_t seqs = nd == 3 ? shape[0] : 1, s = nd == 3 ? shape[1] : shape[0];
  for (int64_t q = 0; q < seqs; ++q)
    for (int64_t i = 0; i < s; i += kLogitChunk) body(q * s + i, static_cast<int>(std::min(kLogitChunk, s - i)));
}

// body(i) for the rows of one chunk, 16 rows per task across threads.
template <typename F>
void split_rows(int rows, F body) {
  parallel_for((rows + 15) / 16, [&](int64_t t) {
    int i1 = std::min<int>(rows, static_cast<int>(t + 1) * 16);
    for (int i = static_cast<int>(t) * 16; i < i1; ++i) body(i);
  });
}

// Output columns go to sgemm in panels of this many (see gemm_seq).
constexpr int kPanel = 256;

// C[q*s + i, :] = alpha * A[q*s + i, :] op(B) + beta * C for nseq sequences of s rows: batch-invariant rows.
void gemm_seq(bool tb, int nseq, int s, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
              float beta, float *c, int ldc);

// C[m, n] = alpha * A^T B + beta * C, A stored [k, m]: weight gradients, rows split across threads.
void gemm_tn(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c,
             int ldc);

}  // namespace msk
