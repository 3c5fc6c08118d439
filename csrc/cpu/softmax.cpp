// Masked, scaled softmax over attention scores, forward and backward, on CPU.
//
// One pass over memory per direction: a row of scores (n keys) is read once into an fp32 L1 row, where the
// scale, the key-padding mask, the max subtraction, exp and the normalization all happen, and the probabilities
// are written once in the scores' dtype. The torch composition (upcast, scale, masked_fill, softmax, masked_fill,
// downcast) makes a memory pass per step.
//
// Numerics: fp32 throughout, the row max subtracted before exp (logits of +-300 would overflow otherwise), exp
// from ATen's vectorized (Sleef, 1-ulp) exp. Padded keys get exactly 0 (exp(-inf) = 0) and a row whose keys are
// all padding is written as zeros, never NaN.
#include <vector>

#include "vec_utils.h"

namespace fastbert::cpu {
namespace {

template <typename T>
void fwd_impl(const T* scores, const uint8_t* key_mask, T* probs, int64_t batch, int64_t rows_per_batch, int64_t n,
              float scale) {
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, batch * rows_per_batch, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(4 * n);
    float *scratch = buf.data(), *s = scratch + n, *bias = s + n, *obuf = bias + n;
    int64_t mask_batch = -1;
    bool has_key = true;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      if (key_mask != nullptr && r / rows_per_batch != mask_batch) {
        // The additive mask row (0 on real keys, -inf on padding) of this sequence, built once per run of its rows.
        mask_batch = r / rows_per_batch;
        const uint8_t* m = key_mask + mask_batch * n;
        has_key = false;
        for (int64_t k = 0; k < n; ++k) {
          bias[k] = m[k] ? 0.f : ninf;
          has_key = has_key || m[k];
        }
      }
      float* o = out_row(probs + off, obuf);
      if (!has_key) {
        std::fill(o, o + n, 0.f);
        store_row(o, probs + off, n);
        continue;
      }
      const float* x = row_as_float(scores + off, scratch, n);
      const Vec vscale(scale);
      if (key_mask != nullptr) {
        vec_for(n, [&](int64_t d, int64_t c) {
          at::vec::fmadd(Vec::loadu(x + d, c), vscale, Vec::loadu(bias + d, c)).store(s + d, c);
        });
      } else {
        vec_for(n, [&](int64_t d, int64_t c) { (Vec::loadu(x + d, c) * vscale).store(s + d, c); });
      }
      const Vec vmax(vec_max(s, n));
      const float sum = vec_sum(n, [&](int64_t d, int64_t c) {
        const Vec e = (Vec::loadu(s + d, c) - vmax).exp();
        e.store(s + d, c);
        return e;
      });
      const Vec inv(1.0f / sum);
      vec_for(n, [&](int64_t d, int64_t c) { (Vec::loadu(s + d, c) * inv).store(o + d, c); });
      store_row(o, probs + off, n);
    }
  });
}

template <typename T>
void bwd_impl(const T* dprobs, const T* probs, T* dscores, int64_t rows, int64_t n, float scale) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * n);
    float *dps = buf.data(), *ps = dps + n, *obuf = ps + n;
    const Vec vscale(scale);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      const float* dp = row_as_float(dprobs + off, dps, n);
      const float* p = row_as_float(probs + off, ps, n);
      const Vec dot(vec_sum(n, [&](int64_t d, int64_t c) { return Vec::loadu(dp + d, c) * Vec::loadu(p + d, c); }));
      float* o = out_row(dscores + off, obuf);
      vec_for(n, [&](int64_t d, int64_t c) {
        (Vec::loadu(p + d, c) * (Vec::loadu(dp + d, c) - dot) * vscale).store(o + d, c);
      });
      store_row(o, dscores + off, n);
    }
  });
}

}  // namespace

void softmax_fwd(Dtype dtype, const void* scores, const uint8_t* key_mask, void* probs, int64_t batch,
                 int64_t rows_per_batch, int64_t n, float scale) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fwd_impl(static_cast<const T*>(scores), key_mask, static_cast<T*>(probs), batch, rows_per_batch, n, scale);
  });
}

void softmax_bwd(Dtype dtype, const void* dprobs, const void* probs, void* dscores, int64_t rows, int64_t n,
                 float scale) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    bwd_impl(static_cast<const T*>(dprobs), static_cast<const T*>(probs), static_cast<T*>(dscores), rows, n, scale);
  });
}

}  // namespace fastbert::cpu
