// SPDX-License-Identifier: Apache-2.0
// Shared helpers for the CPU kernels: the MindSpore aot entry signature, a small thread pool loop, and the
// BLAS entry points (OpenBLAS from the scipy-openblas32 wheel, symbols prefixed "scipy_").
#pragma once
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

// The same product with the rows of C split across the threads (each slice one single-threaded sgemm).
void gemm_rows(bool ta, bool tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
               float beta, float *c, int ldc);

}  // namespace msk
