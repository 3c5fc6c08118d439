// LayerNorm of one fp32 row, forward and backward; used by add_layer_norm (layer_norm.cpp) and by
// bias_gelu_layer_norm (bias_gelu.cpp).
//
// Both directions take the row's first pass from the caller, fused with whatever produces the normalized input z
// (residual add and dropout, or GELU): the caller reads its inputs from memory once, writes z to an fp32 scratch
// row in L1 and hands over the sums of that same pass. What is left here runs over L1 only, plus one write of the
// result in the tensor's dtype.
#pragma once

#include "vec_utils.h"

namespace fastbert::cpu {

// out = (z - mean) * rstd * w + b over one row of n values, given sum(z) (from the pass that wrote z); returns
// mean and rstd through the references. The variance is two-pass, sum((z - mean)^2), over z already in L1: the
// one-pass E[z^2] - E[z]^2 cancels catastrophically when |mean| >> std (e.g. a residual stream with a mean of 20).
// prefetch(d) runs at each vector of the normalization pass (see NextRows).
template <typename T, typename Prefetch>
FASTBERT_INLINE void ln_row_fwd(const float* z, float sum_z, const float* w, const float* b, T* out, int64_t n,
                                float eps, float& mean, float& rstd, const Prefetch& prefetch) {
  const float inv_n = 1.0f / static_cast<float>(n);
  const float m = sum_z * inv_n;
  const Vec vm(m);
  const float var = vec_sum(n, [&](int64_t d, int64_t c) {
                      const Vec t = Vec::loadu(z + d, c) - vm;
                      return t * t;
                    }) *
                    inv_n;
  const float r = 1.0f / std::sqrt(var + eps);
  const Vec vr(r);
  write_row(out, n, [&](int64_t d, int64_t c) {
    prefetch(d);
    const Vec xhat = (Vec::loadu(z + d, c) - vm) * vr;
    return at::vec::fmadd(xhat, Vec::loadu(w + d, c), Vec::loadu(b + d, c));
  });
  mean = m;
  rstd = r;
}

// Backward of one row given the forward's mean and rstd:
//   xhat = (z - mean) * rstd, g = dy * w,  dz = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// in two passes. LnRowBwd::sums is the first: `z_at(d, count)` returns the row's z vector at column d (the caller
// computes it from its inputs and keeps it, e.g. in a scratch row, for the second pass); the sums of g and g * xhat
// come out of it, and the parameter gradients accumulate into this row block's partial sums: dw += dy * xhat,
// db += dy. The caller then runs its own second pass with dz().
struct LnRowBwd {
  Vec vm, vr, mean_g, mean_gx;

  LnRowBwd(float mean, float rstd) : vm(mean), vr(rstd), mean_g(0.f), mean_gx(0.f) {}

  template <typename T, typename ZAt>
  FASTBERT_INLINE void sums(int64_t n, const ZAt& z_at, const T* dy, const float* w, float* dw_acc, float* db_acc) {
    float sum_g = 0.f, sum_gx = 0.f;
    vec_sum2(
        n,
        [&](int64_t d, int64_t c, Vec& s, Vec& t) {
          const Vec dyv = load_float(dy + d, c);
          const Vec xhat = (z_at(d, c) - vm) * vr;
          const Vec g = dyv * Vec::loadu(w + d, c);
          s = g;
          t = g * xhat;
          at::vec::fmadd(dyv, xhat, Vec::loadu(dw_acc + d, c)).store(dw_acc + d, c);
          (Vec::loadu(db_acc + d, c) + dyv).store(db_acc + d, c);
        },
        sum_g, sum_gx);
    const float inv_n = 1.0f / static_cast<float>(n);
    mean_g = Vec(sum_g * inv_n);
    mean_gx = Vec(sum_gx * inv_n);
  }

  // dz at one vector of the row, from z, dy and w there.
  FASTBERT_INLINE Vec dz(const Vec& z, const Vec& dy, const Vec& w) const {
    const Vec xhat = (z - vm) * vr;
    return vr * (dy * w - mean_g - xhat * mean_gx);
  }
};

}  // namespace fastbert::cpu
