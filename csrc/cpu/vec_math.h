// Inline vector math for the GELU kernels: min/max, exp, reciprocal, erf.
//
// Why not ATen's Vec::exp() / Vec::erf(): both call Sleef through the PLT for every vector, erf also divides
// (vdivps), and at::vec::minimum/maximum spend two extra instructions propagating NaN. In a GELU that is most of
// the time: torch's own exact GELU runs oneDNN's JIT kernel, which a Sleef-based loop does not even match. These
// are polynomials the compiler inlines and schedules with the rest of the row loop, at about the same accuracy.
// Every caller multiplies the result by its input u at the end, which is what carries a NaN input to the output.
#pragma once

#include "vec_utils.h"

namespace fastbert::cpu {

// min / max without NaN propagation (a NaN `a` gives `b`; keep the constant second).
FASTBERT_INLINE Vec fast_min(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(a, b);
#else
  return at::vec::minimum(a, b);
#endif
}

FASTBERT_INLINE Vec fast_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// The float whose bit pattern is t's shifted left by 23 (exp_clamped's 2^n). ATen has no bit-cast specialization
// from float to int32 (its generic one goes through memory), so the x86 paths use the cast intrinsics.
FASTBERT_INLINE Vec pow2_from_bits(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
#else
  using IVec = at::vec::Vectorized<int32_t>;
  return at::vec::cast<float>(at::vec::cast<int32_t>(t) << IVec(23));
#endif
}

// exp(x) for x <= 88, relative error ~1 ulp (Cephes expf): n = round(x log2(e)), r = x - n ln2 with ln2 split in
// two (Cody-Waite; the high part has 9 bits, so n * high is exact), exp(r) by a degree-6 polynomial on
// |r| <= ln2 / 2, times 2^n. Rounding uses the 1.5 * 2^23 trick: t = x log2(e) + (1.5 * 2^23 + 127) is that
// constant plus n exactly, so the low 9 bits of t's bit pattern are n + 127 and (bits << 23) is 2^n as a float:
// no round or convert instruction. Inputs below -80 are clamped there (exp(-80) = 1.8e-35, not 0): results and
// their products with O(1) factors stay normal floats (a denormal costs a microcode assist per element on x86).
FASTBERT_INLINE Vec exp_clamped(const Vec& x_in) {
  const Vec magic(12583039.f);  // 1.5 * 2^23 + 127
  const Vec x = fast_max(Vec(-80.f), x_in);  // a NaN x_in stays NaN (the second operand wins)
  const Vec t = at::vec::fmadd(x, Vec(1.44269504088896341f), magic);
  const Vec n = t - magic;
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p = at::vec::fmadd(Vec(1.9875691500e-4f), r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + Vec(1.f));
  return p * pow2_from_bits(t);
}

// 1 / d for finite d with |d| in [2^-126, 2^126]: the hardware estimate refined by Newton steps written as
// r + r (1 - d r), whose residual the FMA computes exactly. A step squares the relative error: AVX512's rcp14
// (2^-14) needs one step to land within half an ulp, AVX2's rcpps (2^-12) two, since after one 1 / 1 would come out
// as 1 - 2^-24 (an ulp off: a tanh-GELU of a large input would miss u by an ulp). Still a fraction of a division.
FASTBERT_INLINE Vec reciprocal(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 dv = d;
  const __m512 r = _mm512_rcp14_ps(dv);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(dv, r, _mm512_set1_ps(1.f)), r);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 dv = d;
  const __m256 one = _mm256_set1_ps(1.f);
  __m256 r = _mm256_rcp_ps(dv);
  r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(dv, r, one), r);
  return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(dv, r, one), r);
#else
  return Vec(1.f) / d;
#endif
}

// erf(x) as x P(x^2) / Q(x^2) on [-4, 4] (degrees 13 / 8; the rational approximation of Eigen and XLA), +-1
// beyond (erf(4) rounds to 1 in fp32). Measured in fp32 against float64: |error| <= 4.5e-7 (near |x| = 3.2, where
// erf is within 1e-5 of +-1); gelu built on it is within 1.4e-6 of float64 on [-10, 10], torch's fp32 gelu 1.2e-6.
FASTBERT_INLINE Vec erf_rational(const Vec& x_in) {
  const Vec x = fast_max(fast_min(x_in, Vec(4.f)), Vec(-4.f));
  const Vec x2 = x * x;
  Vec p = at::vec::fmadd(x2, Vec(-2.72614225801306e-10f), Vec(2.77068142495902e-08f));
  p = at::vec::fmadd(x2, p, Vec(-2.10102402082508e-06f));
  p = at::vec::fmadd(x2, p, Vec(-5.69250639462346e-05f));
  p = at::vec::fmadd(x2, p, Vec(-7.34990630326855e-04f));
  p = at::vec::fmadd(x2, p, Vec(-2.95459980854025e-03f));
  p = at::vec::fmadd(x2, p, Vec(-1.60960333262415e-02f));
  Vec q = at::vec::fmadd(x2, Vec(-1.45660718464996e-05f), Vec(-2.13374055278905e-04f));
  q = at::vec::fmadd(x2, q, Vec(-1.68282697438203e-03f));
  q = at::vec::fmadd(x2, q, Vec(-7.37332916720468e-03f));
  q = at::vec::fmadd(x2, q, Vec(-1.42647390514189e-02f));  // q <= -0.0142: never near 0
  return x * p * reciprocal(q);
}

}  // namespace fastbert::cpu
