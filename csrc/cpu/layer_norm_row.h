// LayerNorm of one fp32 row, forward and backward; used by add_layer_norm (layer_norm.cpp) and by
// bias_gelu_layer_norm (bias_gelu.cpp).
#pragma once

#include "vec_utils.h"

namespace fastbert::cpu {

// out = (z - mean) * rstd * w + b over one row of n values; returns mean and rstd through the references.
// The variance is two-pass, sum((z - mean)^2), over z already in L1: the one-pass E[z^2] - E[z]^2 cancels
// catastrophically when |mean| >> std (e.g. a residual stream with a mean of 20).
inline void ln_row_fwd(const float* z, const float* w, const float* b, float* out, int64_t n, float eps, float& mean,
                       float& rstd) {
  const float inv_n = 1.0f / static_cast<float>(n);
  const float m = vec_sum(n, [&](int64_t d, int64_t c) { return Vec::loadu(z + d, c); }) * inv_n;
  const Vec vm(m);
  const float var = vec_sum(n, [&](int64_t d, int64_t c) {
                      const Vec t = Vec::loadu(z + d, c) - vm;
                      return t * t;
                    }) *
                    inv_n;
  const float r = 1.0f / std::sqrt(var + eps);
  const Vec vr(r);
  vec_for(n, [&](int64_t d, int64_t c) {
    const Vec xhat = (Vec::loadu(z + d, c) - vm) * vr;
    at::vec::fmadd(xhat, Vec::loadu(w + d, c), Vec::loadu(b + d, c)).store(out + d, c);
  });
  mean = m;
  rstd = r;
}

// Backward of one row given the forward's z, mean and rstd:
//   xhat = (z - mean) * rstd, g = dy * w,  dz = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// and the parameter gradients accumulate into this row block's partial sums: dw += dy * xhat, db += dy.
// dz may alias z (each element is read before it is written).
inline void ln_row_bwd(const float* z, const float* dy, const float* w, float mean, float rstd, float* dz,
                       float* dw_acc, float* db_acc, int64_t n) {
  const Vec vm(mean), vr(rstd);
  float sum_g = 0.f, sum_gx = 0.f;
  vec_sum2(
      n,
      [&](int64_t d, int64_t c, Vec& s, Vec& t) {
        const Vec g = Vec::loadu(dy + d, c) * Vec::loadu(w + d, c);
        s = g;
        t = g * ((Vec::loadu(z + d, c) - vm) * vr);
      },
      sum_g, sum_gx);
  const float inv_n = 1.0f / static_cast<float>(n);
  const Vec mean_g(sum_g * inv_n), mean_gx(sum_gx * inv_n);
  vec_for(n, [&](int64_t d, int64_t c) {
    const Vec dyv = Vec::loadu(dy + d, c);
    const Vec xhat = (Vec::loadu(z + d, c) - vm) * vr;
    const Vec g = dyv * Vec::loadu(w + d, c);
    (vr * (g - mean_g - xhat * mean_gx)).store(dz + d, c);
    at::vec::fmadd(dyv, xhat, Vec::loadu(dw_acc + d, c)).store(dw_acc + d, c);
    (Vec::loadu(db_acc + d, c) + dyv).store(db_acc + d, c);
  });
}

}  // namespace fastbert::cpu
