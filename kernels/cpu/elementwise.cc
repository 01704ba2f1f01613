// SPDX-License-Identifier: Apache-2.0
// RMSNorm, SwiGLU and rotary embedding, forward and backward, in float32; rows split across threads.
#include <algorithm>

#include "common.h"

namespace {
constexpr int64_t kRowsPerTask = 64;

template <typename F>
void for_rows(int64_t rows, F body) {
  int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  msk::parallel_for(tasks, [&](int64_t t) {
    int64_t r1 = std::min(rows, (t + 1) * kRowsPerTask);
    for (int64_t r = t * kRowsPerTask; r < r1; ++r) body(r);
  });
}
}  // namespace

// inputs x [M, H], w [H], eps [1]; outputs y [M, H] = x * rstd * w, rstd [M]
MS_LLM_AOT RmsNormFwd(AOT_ARGS) {
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  float eps = *static_cast<const float *>(params[2]);
  auto *y = static_cast<float *>(params[3]);
  auto *rstd = static_cast<float *>(params[4]);
  int64_t h = shapes[0][ndims[0] - 1], rows = msk::numel(ndims[0], shapes[0]) / h;
  for_rows(rows, [&](int64_t r) {
    const float *xr = x + r * h;
    float *yr = y + r * h;
    float ss = msk::row_dot(xr, xr, h);
    float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
    rstd[r] = inv;
    for (int64_t j = 0; j < h; ++j) yr[j] = xr[j] * inv * w[j];
  });
  return 0;
}

// inputs x [M, H], w [H], rstd [M], dy [M, H]; outputs dx [M, H], dw [H]
MS_LLM_AOT RmsNormBwd(AOT_ARGS) {
  auto *x = static_cast<const float *>(params[0]);
  auto *w = static_cast<const float *>(params[1]);
  auto *rstd = static_cast<const float *>(params[2]);
  auto *dy = static_cast<const float *>(params[3]);
  auto *dx = static_cast<float *>(params[4]);
  auto *dw = static_cast<float *>(params[5]);
  int64_t h = shapes[0][ndims[0] - 1], rows = msk::numel(ndims[0], shapes[0]) / h;
  int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  std::vector<float> partial(static_cast<size_t>(tasks * h), 0.f);   // per-task dw, summed in task order
  msk::parallel_for(tasks, [&](int64_t t) {
    float *pw = partial.data() + t * h;
    int64_t r1 = std::min(rows, (t + 1) * kRowsPerTask);
    for (int64_t r = t * kRowsPerTask; r < r1; ++r) {
      const float *xr = x + r * h, *gr = dy + r * h;
      float inv = rstd[r], dot = 0.f;
      for (int64_t j = 0; j < h; ++j) dot += gr[j] * w[j] * xr[j];
      float c = dot * inv * inv * inv / static_cast<float>(h);
      float *dr = dx + r * h;
      for (int64_t j = 0; j < h; ++j) {
        dr[j] = gr[j] * w[j] * inv - xr[j] * c;
        pw[j] += gr[j] * xr[j] * inv;
      }
    }
  });
  std::fill(dw, dw + h, 0.f);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t j = 0; j < h; ++j) dw[j] += partial[t * h + j];
  return 0;
}

// inputs gate, up [N]; output y = silu(gate) * up
MS_LLM_AOT SwigluFwd(AOT_ARGS) {
  auto *g = static_cast<const float *>(params[0]);
  auto *u = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[2]);
  int64_t n = msk::numel(ndims[0], shapes[0]), chunk = 16384;
  msk::parallel_for((n + chunk - 1) / chunk, [&](int64_t t) {
    int64_t i1 = std::min(n, (t + 1) * chunk);
    for (int64_t i = t * chunk; i < i1; ++i) {
      float s = 1.f / (1.f + msk::fast_exp(-g[i]));
      y[i] = g[i] * s * u[i];
    }
  });
  return 0;
}

// inputs gate, up, dy; outputs dgate, dup
MS_LLM_AOT SwigluBwd(AOT_ARGS) {
  auto *g = static_cast<const float *>(params[0]);
  auto *u = static_cast<const float *>(params[1]);
  auto *dy = static_cast<const float *>(params[2]);
  auto *dg = static_cast<float *>(params[3]);
  auto *du = static_cast<float *>(params[4]);
  int64_t n = msk::numel(ndims[0], shapes[0]), chunk = 16384;
  msk::parallel_for((n + chunk - 1) / chunk, [&](int64_t t) {
    int64_t i1 = std::min(n, (t + 1) * chunk);
    for (int64_t i = t * chunk; i < i1; ++i) {
      float s = 1.f / (1.f + msk::fast_exp(-g[i]));
      float silu = g[i] * s;
      du[i] = dy[i] * silu;
      dg[i] = dy[i] * u[i] * (s + silu * (1.f - s));
    }
  });
  return 0;
}

namespace {
// y = x * cos + rotate_half(x) * sin (sign = +1), or its transpose applied to dy (sign = -1), on [B, N, S, D]
// with cos/sin [B, 1, S, D].
void rope(const float *x, const float *cos, const float *sin, float *y, const int64_t *shape, float sign) {
  int64_t b = shape[0], n = shape[1], s = shape[2], d = shape[3], half = d / 2;
  msk::parallel_for(b * n, [&](int64_t bn) {
    int64_t bi = bn / n;
    for (int64_t i = 0; i < s; ++i) {
      const float *xr = x + (bn * s + i) * d;
      const float *c = cos + (bi * s + i) * d, *sn = sin + (bi * s + i) * d;
      float *yr = y + (bn * s + i) * d;
      if (sign > 0) {
        for (int64_t j = 0; j < half; ++j) {
          yr[j] = xr[j] * c[j] - xr[j + half] * sn[j];
          yr[j + half] = xr[j + half] * c[j + half] + xr[j] * sn[j + half];
        }
      } else {
        for (int64_t j = 0; j < half; ++j) {
          yr[j] = xr[j] * c[j] + xr[j + half] * sn[j + half];
          yr[j + half] = xr[j + half] * c[j + half] - xr[j] * sn[j];
        }
      }
    }
  });
}
}  // namespace

// inputs x [B, N, S, D], cos, sin [B, 1, S, D]; output y [B, N, S, D]
MS_LLM_AOT RopeFwd(AOT_ARGS) {
  rope(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
       static_cast<const float *>(params[2]), static_cast<float *>(params[3]), shapes[0], 1.f);
  return 0;
}

// inputs cos, sin [B, 1, S, D], dy [B, N, S, D]; output dx [B, N, S, D]
MS_LLM_AOT RopeBwd(AOT_ARGS) {
  rope(static_cast<const float *>(params[2]), static_cast<const float *>(params[0]),
       static_cast<const float *>(params[1]), static_cast<float *>(params[3]), shapes[2], -1.f);
  return 0;
}
