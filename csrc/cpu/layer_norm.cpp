// Fused residual-add + dropout + LayerNorm, forward and backward, on CPU.
//
// Forward, per row: one pass reads x and residual, forms z = dropout(x) + residual in fp32 in an L1 scratch row
// and sums it; the variance pass and the normalization run over that row, and the output is written once in x's
// dtype. The torch composition reads x and residual, writes z, reads z back and writes the output; here x and
// residual are read once and only the output is written. z is never rounded to x's dtype, so bf16/fp16 results
// are closer to the float64 reference than the composition.
//
// Backward, per row: the first pass recomputes z from x and residual (cheaper than saving it: one add against
// rows being read anyway) while it reads dout and accumulates the LayerNorm sums and the parameter gradients; the
// second writes dz. Without dropout dx and dresidual are both dz, so it is written once (dresidual == nullptr:
// the caller uses dx for both); with dropout, dresidual = dz and dx = dz * mask. dweight/dbias accumulate into
// per-row-block partial sums (deterministic; see BlockColumnSums).
#include <vector>

#include "dropout.h"
#include "layer_norm_row.h"

namespace fastbert::cpu {
namespace {

// z = dropout(x) + residual at one vector of a row, in fp32; keep: the row's dropout scales.
template <bool HasResidual, bool HasDropout, typename T>
FASTBERT_INLINE Vec pre_norm(const T* x, const T* residual, const float* keep, int64_t d, int64_t c) {
  Vec v = load_float(x + d, c);
  if constexpr (HasDropout) v = v * Vec::loadu(keep + d, c);
  if constexpr (HasResidual) v = v + load_float(residual + d, c);
  return v;
}

template <bool HasResidual, bool HasDropout, typename T>
void fwd_impl(const T* x, const T* residual, const float* w, const float* b, T* out, float* mean, float* rstd,
              int64_t rows, int64_t n, float eps, const Dropout& drop) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(2 * n);
    float *z = buf.data(), *keep = z + n;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      const T* xr = x + off;
      const T* rr = HasResidual ? residual + off : nullptr;
      if constexpr (HasDropout) drop.scale_row(r, n, keep);
      const float sum = vec_sum(n, [&](int64_t d, int64_t c) {
        const Vec v = pre_norm<HasResidual, HasDropout>(xr, rr, keep, d, c);
        v.store(z + d, c);
        return v;
      });
      const int64_t next = r + 1 < r1 ? off + n : off;
      if constexpr (HasResidual) {
        ln_row_fwd(z, sum, w, b, out + off, n, eps, mean[r], rstd[r], NextRows<T, 2>{{x + next, residual + next}});
      } else {
        ln_row_fwd(z, sum, w, b, out + off, n, eps, mean[r], rstd[r], NextRows<T, 1>{{x + next}});
      }
    }
  });
}

template <bool HasResidual, bool HasDropout, typename T>
void bwd_impl(const T* dout, const T* x, const T* residual, const float* w, const float* mean, const float* rstd,
              T* dx, T* dres, float* dw, float* db, int64_t rows, int64_t n, const Dropout& drop) {
  BlockColumnSums grads(rows, n, 2);  // dweight, dbias
  grads.for_each_row(2, [&](int64_t r, float* acc, float* scratch) {
    float *dw_acc = acc, *db_acc = acc + n;
    float *z = scratch, *keep = scratch + n;
    const int64_t off = r * n;
    const T *xr = x + off, *dy = dout + off;
    const T* rr = HasResidual ? residual + off : nullptr;
    if constexpr (HasDropout) drop.scale_row(r, n, keep);
    LnRowBwd ln(mean[r], rstd[r]);
    ln.sums(
        n,
        [&](int64_t d, int64_t c) {
          const Vec v = pre_norm<HasResidual, HasDropout>(xr, rr, keep, d, c);
          v.store(z + d, c);
          return v;
        },
        dy, w, dw_acc, db_acc);
    T* dxr = dx + off;
    T* dresr = dres != nullptr ? dres + off : nullptr;
    write_row(dxr, n, [&](int64_t d, int64_t c) {
      const Vec dz = ln.dz(Vec::loadu(z + d, c), load_float(dy + d, c), Vec::loadu(w + d, c));
      if (dresr != nullptr) store_float(dz, dresr + d, c);
      if constexpr (HasDropout) {
        return dz * Vec::loadu(keep + d, c);
      } else {
        return dz;
      }
    });
  });
  grads.finish({dw, db});
}

}  // namespace

void add_layer_norm_fwd(Dtype dtype, const void* x, const void* residual, const float* weight, const float* bias,
                        void* out, float* mean, float* rstd, int64_t rows, int64_t n, float eps, float dropout_p,
                        uint64_t seed) {
  const Dropout drop{dropout_p, seed};
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_bool(residual != nullptr, [&](auto has_residual) {
      dispatch_bool(drop.active(), [&](auto has_dropout) {
        fwd_impl<decltype(has_residual)::value, decltype(has_dropout)::value>(
            static_cast<const T*>(x), static_cast<const T*>(residual), weight, bias, static_cast<T*>(out), mean, rstd,
            rows, n, eps, drop);
      });
    });
  });
}

void add_layer_norm_bwd(Dtype dtype, const void* dout, const void* x, const void* residual, const float* weight,
                        const float* mean, const float* rstd, void* dx, void* dresidual, float* dweight, float* dbias,
                        int64_t rows, int64_t n, float dropout_p, uint64_t seed) {
  const Dropout drop{dropout_p, seed};
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_bool(residual != nullptr, [&](auto has_residual) {
      dispatch_bool(drop.active(), [&](auto has_dropout) {
        bwd_impl<decltype(has_residual)::value, decltype(has_dropout)::value>(
            static_cast<const T*>(dout), static_cast<const T*>(x), static_cast<const T*>(residual), weight, mean, rstd,
            static_cast<T*>(dx), static_cast<T*>(dresidual), dweight, dbias, rows, n, drop);
      });
    });
  });
}

}  // namespace fastbert::cpu
