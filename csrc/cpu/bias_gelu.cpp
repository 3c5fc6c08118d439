// Bias + GELU, and bias + GELU + LayerNorm (the MLM head transform), forward and backward, on CPU.
//
// GELU is evaluated in fp32 on u = x + bias. The add is never materialized nor rounded to x's dtype (the torch
// composition writes x + bias to memory in x's dtype and reads it back), and in bias_gelu_layer_norm the GELU
// output stays in an fp32 L1 row between the activation and the normalization.
//
// Exact GELU is u Phi(u) = u (1 + erf(u / sqrt(2))) / 2 with the rational erf of vec_math.h (its fp32 error is
// torch's fp32 gelu error), and gelu' = Phi(u) + u phi(u) takes one inlined exp for the normal PDF. The tanh
// approximation is written as u * sigmoid(2a), a = sqrt(2/pi) (u + 0.044715 u^3), which equals
// 0.5 u (1 + tanh(a)); with e = exp(-2a) and s = 1 / (1 + e), the derivative's 1 - tanh(a)^2 = 4 s (1 - s) =
// 4 e s^2 has no cancellation as s -> 1, unlike 1 - tanh^2 computed from tanh.
#include <type_traits>
#include <vector>

#include "layer_norm_row.h"
#include "vec_math.h"

namespace fastbert::cpu {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kTanhCubic = 0.044715f;
// exp(80) = 5.5e34: 1 + e stays finite and e * s * s stays a normal float, so no inf * 0 when a -> -inf.
constexpr float kMaxExpArg = 80.f;

// gelu(u). Same instruction sequence for y as gelu_and_grad below, so the backward's recomputed y is bitwise the
// forward's (the saved LayerNorm statistics describe exactly it).
template <bool Tanh>
FASTBERT_INLINE Vec gelu(const Vec& u) {
  if constexpr (Tanh) {
    const Vec a = Vec(kSqrt2OverPi) * u * at::vec::fmadd(Vec(kTanhCubic), u * u, Vec(1.f));
    const Vec e = exp_clamped(fast_min(Vec(-2.f) * a, Vec(kMaxExpArg)));
    return u * reciprocal(Vec(1.f) + e);
  } else {
    return u * at::vec::fmadd(Vec(0.5f), erf_rational(u * Vec(kSqrtHalf)), Vec(0.5f));
  }
}

// y = gelu(u) and g = gelu'(u) together.
template <bool Tanh>
FASTBERT_INLINE void gelu_and_grad(const Vec& u, Vec& y, Vec& g) {
  if constexpr (Tanh) {
    const Vec u2 = u * u;
    const Vec a = Vec(kSqrt2OverPi) * u * at::vec::fmadd(Vec(kTanhCubic), u2, Vec(1.f));
    const Vec da = Vec(kSqrt2OverPi) * at::vec::fmadd(Vec(3.f * kTanhCubic), u2, Vec(1.f));
    const Vec e = exp_clamped(fast_min(Vec(-2.f) * a, Vec(kMaxExpArg)));
    const Vec s = reciprocal(Vec(1.f) + e);
    y = u * s;
    // d/du [u s(2a)] = s + u * 2 s (1 - s) * da, with s (1 - s) = e s^2.
    g = at::vec::fmadd(Vec(2.f) * u * (e * s * s), da, s);
  } else {
    const Vec cdf = at::vec::fmadd(Vec(0.5f), erf_rational(u * Vec(kSqrtHalf)), Vec(0.5f));
    const Vec pdf = exp_clamped(Vec(-0.5f) * u * u) * Vec(kInvSqrt2Pi);
    y = u * cdf;
    g = at::vec::fmadd(u, pdf, cdf);
  }
}

template <typename T, bool Tanh>
void fwd_impl(const T* x, const float* bias, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      map_row(x + r * n, out + r * n, n, [&](int64_t d, int64_t c, const Vec& xv) {
        return gelu<Tanh>(xv + Vec::loadu(bias + d, c));
      });
    }
  });
}

// dx = dout * gelu'(x + bias), and with WithDbias the bias gradient (the column sums of dx, fp32) from the same pass:
// per-row-block partial sums (BlockColumnSums: deterministic at any thread count) of dx before its rounding to T,
// instead of a second pass over the written dx.
template <typename T, bool Tanh, bool WithDbias>
void bwd_impl(const T* dout, const T* x, const float* bias, T* dx, float* dbias, int64_t rows, int64_t n) {
  const auto row = [&](int64_t r, float* acc) {
    const int64_t off = r * n;
    map2_row(x + off, dout + off, dx + off, n, [&](int64_t d, int64_t c, const Vec& xv, const Vec& dyv) {
      Vec y, g;
      gelu_and_grad<Tanh>(xv + Vec::loadu(bias + d, c), y, g);
      const Vec dz = dyv * g;
      if constexpr (WithDbias) (Vec::loadu(acc + d, c) + dz).store(acc + d, c);
      return dz;
    });
  };
  if constexpr (!WithDbias) {
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row(r, nullptr);
    });
  } else {
    BlockColumnSums sums(rows, n, 1);
    sums.for_each_row(0, [&](int64_t r, float* acc, float*) { row(r, acc); });
    sums.finish({dbias});
  }
}

template <typename T, bool Tanh>
void ln_fwd_impl(const T* x, const float* bias, const float* w, const float* lnb, T* out, float* mean, float* rstd,
                 int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(n);
    float* y = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      const T* xr = x + off;
      const float sum = vec_sum(n, [&](int64_t d, int64_t c) {
        const Vec yv = gelu<Tanh>(load_float(xr + d, c) + Vec::loadu(bias + d, c));
        yv.store(y + d, c);
        return yv;
      });
      const NextRows<T, 1> prefetch{{x + (r + 1 < r1 ? off + n : off)}};
      ln_row_fwd(y, sum, w, lnb, out + off, n, eps, mean[r], rstd[r], prefetch);
    }
  });
}

// With WithDbias, the GELU bias's gradient (the column sums of dx) accumulates as a third per-block sum beside
// dweight and dln_bias, from the same pass.
template <typename T, bool Tanh, bool WithDbias>
void ln_bwd_impl(const T* dout, const T* x, const float* bias, const float* w, const float* mean, const float* rstd,
                 T* dx, float* dw, float* db, float* dbias, int64_t rows, int64_t n) {
  BlockColumnSums grads(rows, n, WithDbias ? 3 : 2);  // dweight, dln_bias (, dbias)
  grads.for_each_row(2, [&](int64_t r, float* acc, float* scratch) {
    float *dw_acc = acc, *db_acc = acc + n, *dbias_acc = acc + 2 * n;
    float *y = scratch, *g = scratch + n;
    const int64_t off = r * n;
    const T *xr = x + off, *dy = dout + off;
    // Recompute y = gelu(x + bias) exactly as the forward did (fp32, same instructions), so the saved mean and rstd
    // describe it; keep gelu' for the chain rule.
    LnRowBwd ln(mean[r], rstd[r]);
    ln.sums(
        n,
        [&](int64_t d, int64_t c) {
          Vec yv, gv;
          gelu_and_grad<Tanh>(load_float(xr + d, c) + Vec::loadu(bias + d, c), yv, gv);
          yv.store(y + d, c);
          gv.store(g + d, c);
          return yv;
        },
        dy, w, dw_acc, db_acc);
    T* dxr = dx + off;
    write_row(dxr, n, [&](int64_t d, int64_t c) {
      const Vec dyn = ln.dz(Vec::loadu(y + d, c), load_float(dy + d, c), Vec::loadu(w + d, c));  // dL/dy
      const Vec dxv = dyn * Vec::loadu(g + d, c);
      if constexpr (WithDbias) (Vec::loadu(dbias_acc + d, c) + dxv).store(dbias_acc + d, c);
      return dxv;
    });
  });
  if constexpr (WithDbias) {
    grads.finish({dw, db, dbias});
  } else {
    grads.finish({dw, db});
  }
}

}  // namespace

void bias_gelu_fwd(Dtype dtype, const void* x, const float* bias, void* out, int64_t rows, int64_t n,
                   bool tanh_approx) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_bool(tanh_approx, [&](auto tanh_tag) {
      fwd_impl<T, decltype(tanh_tag)::value>(static_cast<const T*>(x), bias, static_cast<T*>(out), rows, n);
    });
  });
}

void bias_gelu_bwd(Dtype dtype, const void* dout, const void* x, const float* bias, void* dx, float* dbias,
                   int64_t rows, int64_t n, bool tanh_approx) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_bool(tanh_approx, [&](auto tanh_tag) {
      dispatch_bool(dbias != nullptr, [&](auto dbias_tag) {
        bwd_impl<T, decltype(tanh_tag)::value, decltype(dbias_tag)::value>(
            static_cast<const T*>(dout), static_cast<const T*>(x), bias, static_cast<T*>(dx), dbias, rows, n);
      });
    });
  });
}

void bias_gelu_layer_norm_fwd(Dtype dtype, const void* x, const float* bias, const float* weight,
                              const float* ln_bias, void* out, float* mean, float* rstd, int64_t rows, int64_t n,
                              float eps, bool tanh_approx) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_bool(tanh_approx, [&](auto tanh_tag) {
      ln_fwd_impl<T, decltype(tanh_tag)::value>(static_cast<const T*>(x), bias, weight, ln_bias,
                                                static_cast<T*>(out), mean, rstd, rows, n, eps);
    });
  });
}

void bias_gelu_layer_norm_bwd(Dtype dtype, const void* dout, const void* x, const float* bias, const float* weight,
                              const float* mean, const float* rstd, void* dx, float* dweight, float* dln_bias,
                              float* dbias, int64_t rows, int64_t n, bool tanh_approx) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_bool(tanh_approx, [&](auto tanh_tag) {
      dispatch_bool(dbias != nullptr, [&](auto dbias_tag) {
        ln_bwd_impl<T, decltype(tanh_tag)::value, decltype(dbias_tag)::value>(
            static_cast<const T*>(dout), static_cast<const T*>(x), bias, weight, mean, rstd, static_cast<T*>(dx),
            dweight, dln_bias, dbias, rows, n);
      });
    });
  });
}

}  // namespace fastbert::cpu
