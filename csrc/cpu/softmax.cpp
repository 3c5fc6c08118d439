// Masked, scaled softmax over attention scores, forward and backward, on CPU.
//
// One pass over memory per direction: a row of scores (n keys) is read once, straight from the tensor, into an
// fp32 L1 row where the scale, the key-padding mask and the row max happen in the same pass; exp and the sum make a
// second pass over L1 and the normalized probabilities are written once in the scores' dtype. The torch
// composition (upcast, scale, masked_fill, softmax, masked_fill, downcast) makes a memory pass per step. The
// backward reads dprobs and probs twice (the second time from L1) and writes dscores once.
//
// Numerics: fp32 throughout, the row max subtracted before exp (logits of +-300 would overflow otherwise), exp
// from vec_math.h's inlined polynomial (~1 ulp; ATen's Sleef exp is a call per vector). Padded keys get exactly
// 0 (the exp times a 0/1 keep row) and a row whose keys are all padding is written as zeros, never NaN; a NaN
// score makes its row NaN, as in torch.
#include <vector>

#include "vec_math.h"

namespace fastbert::cpu {
namespace {

template <bool Masked, typename T>
void fwd_impl(const T* scores, const uint8_t* key_mask, T* probs, int64_t batch, int64_t rows_per_batch, int64_t n,
              float scale) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t rows = batch * rows_per_batch;
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * n);
    float *s = buf.data(), *bias = s + n, *keep = bias + n;
    int64_t mask_batch = -1;
    bool has_key = true;
    const Vec vscale(scale);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      const T* x = scores + off;
      T* o = probs + off;
      if constexpr (Masked) {
        if (r / rows_per_batch != mask_batch) {
          // The additive mask row (0 on real keys, -inf on padding) and the 0/1 keep row of this sequence, built
          // once per run of its rows.
          mask_batch = r / rows_per_batch;
          const uint8_t* m = key_mask + mask_batch * n;
          has_key = false;
          for (int64_t k = 0; k < n; ++k) {
            bias[k] = m[k] ? 0.f : ninf;
            keep[k] = m[k] ? 1.f : 0.f;
            has_key = has_key || m[k];
          }
        }
        if (!has_key) {
          vec_for(n, [&](int64_t d, int64_t c) { store_float(Vec(0.f), o + d, c); });
          continue;
        }
      }
      // Pass 1: s = scores * scale (+ mask bias), and its max.
      const Vec vmax(vec_max(n, [&](int64_t d, int64_t c) {
        Vec v = load_float(x + d, c) * vscale;
        if constexpr (Masked) v = v + Vec::loadu(bias + d, c);
        v.store(s + d, c);
        return v;
      }));
      // Pass 2: e = exp(s - max) (0 on padded keys) into s, and its sum.
      const float sum = vec_sum(n, [&](int64_t d, int64_t c) {
        Vec e = exp_clamped(Vec::loadu(s + d, c) - vmax);
        if constexpr (Masked) e = e * Vec::loadu(keep + d, c);
        e.store(s + d, c);
        return e;
      });
      const Vec inv(1.0f / sum);
      const NextRows<T, 1> prefetch{{x + (r + 1 < r1 ? n : 0)}};
      write_row(o, n, [&](int64_t d, int64_t c) {
        prefetch(d);
        return Vec::loadu(s + d, c) * inv;
      });
    }
  });
}

template <typename T>
void bwd_impl(const T* dprobs, const T* probs, T* dscores, int64_t rows, int64_t n, float scale) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    const Vec vscale(scale);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      const T *dp = dprobs + off, *p = probs + off;
      const Vec dot(vec_sum(n, [&](int64_t d, int64_t c) { return load_float(dp + d, c) * load_float(p + d, c); }));
      T* o = dscores + off;
      write_row(o, n, [&](int64_t d, int64_t c) {
        return load_float(p + d, c) * (load_float(dp + d, c) - dot) * vscale;
      });
    }
  });
}

}  // namespace

void softmax_fwd(Dtype dtype, const void* scores, const uint8_t* key_mask, void* probs, int64_t batch,
                 int64_t rows_per_batch, int64_t n, float scale) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_bool(key_mask != nullptr, [&](auto masked) {
      fwd_impl<decltype(masked)::value>(static_cast<const T*>(scores), key_mask, static_cast<T*>(probs), batch,
                                        rows_per_batch, n, scale);
    });
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
