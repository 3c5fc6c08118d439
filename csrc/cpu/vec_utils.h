// Helpers shared by the CPU kernels: dtype dispatch, fp32 row conversion, elementwise row maps, vector loops and
// reductions, the row partitions used with at::parallel_for.
//
// Vectorization goes through ATen's at::vec::Vectorized<float>, whose width and instructions follow the
// CPU_CAPABILITY macros that fastbert/_ext.py sets from torch's own runtime choice (AVX512, AVX2 or DEFAULT); the
// build directory is keyed on that choice, so a cached build never runs on a CPU that lacks its instructions.
// Threads come from at::parallel_for, i.e. torch's OpenMP pool: torch.set_num_threads applies to these kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace fastbert::cpu {

using Vec = at::vec::Vectorized<float>;
// For the per-vector helpers: GCC's inliner gives up on them once a file instantiates them a dozen times (3 dtypes x
// 2 GELU flavours x 4 kernels) and then calls them per vector, through the PLT, with Vec arguments in memory.
#define FASTBERT_INLINE inline __attribute__((always_inline))
constexpr int64_t kVec = Vec::size();
// Elements per task below which at::parallel_for runs on the calling thread (ATen's own default): waking the
// pool costs more than a few tens of KB of work.
constexpr int64_t kGrainElems = 32768;

// Runs body(T* tag) with T = float, c10::BFloat16 or c10::Half (a null pointer, only its type matters).
template <typename F>
inline void dispatch_dtype(Dtype dtype, const F& body) {
  switch (dtype) {
    case Dtype::kFloat32:
      body(static_cast<float*>(nullptr));
      break;
    case Dtype::kBFloat16:
      body(static_cast<c10::BFloat16*>(nullptr));
      break;
    case Dtype::kFloat16:
      body(static_cast<c10::Half*>(nullptr));
      break;
  }
}

// Rows per parallel task so that each task holds at least kGrainElems elements.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n, 1)); }

// --------------------------------------------------------------------------------------------------------------
// One fp32 vector at a time from / to a row of T, converting in registers: the row kernels read their inputs
// straight from the tensor and write their outputs straight to it; only their intermediate rows live in fp32 L1
// scratch. count <= kVec; lanes past count load as 0 and are not stored.

template <typename T>
FASTBERT_INLINE Vec load_float(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, count);
  } else if (count == kVec) {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count)));
  }
}

// Two fp32 vectors rounded (to nearest even) into one Vectorized<T> of bf16 / fp16, a's lanes first. Where the build
// targets AVX512-BF16 (fastbert/_ext.py adds -mavx512bf16 on CPUs that have it), bf16 takes the one-instruction
// vcvtne2ps2bf16 instead of ATen's integer rounding sequence: the same results except that fp32 denormal inputs
// (|v| < 1.2e-38) become 0, which the instruction always flushes.
template <typename T>
FASTBERT_INLINE at::vec::Vectorized<T> from_float2(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return at::vec::Vectorized<T>((__m512i)_mm512_cvtne2ps_pbh(b, a));
  }
#endif
  return at::vec::convert_from_float<T>(a, b);
}

template <typename T>
FASTBERT_INLINE void store_float(const Vec& v, T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
      if (count == kVec) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
      } else {
        _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << count) - 1), h);
      }
      return;
    }
#endif
    from_float2<T>(v, v).store(p, count);
  }
}

// The next row of K input streams, prefetched one vector's worth at a time from inside a row kernel's last pass,
// which reads only L1 (the row's scratch): the next row's first pass then finds its lines in L1 instead of
// starting each stream with a memory latency. The hardware prefetcher does not bridge that gap on its own
// (measured on a 2-core AVX512 Xeon: add_layer_norm fp32 1024 x 768 ~9% faster; prefetching a whole row at once,
// or into L2, gained nothing, and the backward kernels, whose first pass reads three streams, ran slower with it).
// On the last row of a task the pointers are the current row: a harmless re-touch of L1.
template <typename T, int K>
struct NextRows {
  const T* p[K];
  FASTBERT_INLINE void operator()(int64_t d) const {
    for (int k = 0; k < K; ++k) __builtin_prefetch(p[k] + d, 0, 3);
  }
};

// Runs body(std::bool_constant<flag>{}): turns a runtime flag into a template parameter, so that loop-invariant
// branches (a residual or not, dropout or not) are resolved at compile time instead of in every vector step.
template <typename F>
inline void dispatch_bool(bool flag, const F& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// --------------------------------------------------------------------------------------------------------------
// Vector loops. `f(d, count)` handles the chunk starting at element d; count == kVec except for the tail, so
// after inlining the full chunks use unmasked loads and stores (Vec::loadu(p, count) branches on count).

template <typename F>
inline void vec_for(int64_t n, const F& f) {
  int64_t d = 0;
  for (; d + kVec <= n; d += kVec) f(d, kVec);
  if (d < n) f(d, n - d);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The 8 lanes of h folded with op (_mm_add_ps or _mm_max_ps), halving the width each step in a fixed order; the
// scalar loop through memory it replaces costs ~20 cycles per call, which short rows (attention rows of 128 keys:
// 8 vectors) pay once or twice per row.
template <typename Op>
FASTBERT_INLINE float fold_lanes(__m256 h, const Op& op) {
  __m128 q = op(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = op(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(op(q, _mm_movehdup_ps(q)));
}

// A Vec's lanes as 8: the two halves combined with op (AVX512), or the Vec itself (AVX2).
template <typename Op256>
FASTBERT_INLINE __m256 halve(const Vec& v, const Op256& op) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  return op(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
#else
  (void)op;
  return v;
#endif
}
#endif

// Sum of a vector's lanes in a fixed order (deterministic).
FASTBERT_INLINE float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return fold_lanes(halve(v, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); }),
                    [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
#else
  float lanes[kVec];
  v.store(lanes);
  float total = 0.f;
  for (int64_t i = 0; i < kVec; ++i) total += lanes[i];
  return total;
#endif
}

// Sum over the row of the vector f(d, count) returns (lanes past count are ignored). Four accumulators hide the
// add latency; the final horizontal sum runs in a fixed order, so the result is deterministic.
template <typename F>
inline float vec_sum(int64_t n, const F& f) {
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t d = 0;
  for (; d + 4 * kVec <= n; d += 4 * kVec) {
    a0 += f(d, kVec);
    a1 += f(d + kVec, kVec);
    a2 += f(d + 2 * kVec, kVec);
    a3 += f(d + 3 * kVec, kVec);
  }
  for (; d + kVec <= n; d += kVec) a0 += f(d, kVec);
  if (d < n) a1 += Vec::set(Vec(0.f), f(d, n - d), n - d);
  return hsum((a0 + a1) + (a2 + a3));
}

// Two sums in one pass (e.g. sum(g) and sum(g * xhat) in the LayerNorm backward): f(d, count, s, t) sets s, t.
template <typename F>
inline void vec_sum2(int64_t n, const F& f, float& sum_s, float& sum_t) {
  Vec s0(0.f), s1(0.f), t0(0.f), t1(0.f);
  int64_t d = 0;
  for (; d + 2 * kVec <= n; d += 2 * kVec) {
    Vec s, t;
    f(d, kVec, s, t);
    s0 += s;
    t0 += t;
    f(d + kVec, kVec, s, t);
    s1 += s;
    t1 += t;
  }
  for (; d < n; d += kVec) {
    const int64_t count = std::min<int64_t>(kVec, n - d);
    Vec s, t;
    f(d, count, s, t);
    s0 += Vec::set(Vec(0.f), s, count);
    t0 += Vec::set(Vec(0.f), t, count);
  }
  sum_s = hsum(s0 + s1);
  sum_t = hsum(t0 + t1);
}

// Max of a vector's lanes, NaN if any lane is NaN.
FASTBERT_INLINE float hmax(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // max_ps drops a NaN in its first operand: NaN lanes are looked for first.
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  const bool has_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0;
#else
  const __m256 x = v;
  const bool has_nan = _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0;
#endif
  if (has_nan) return std::numeric_limits<float>::quiet_NaN();
  return fold_lanes(halve(v, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); }),
                    [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
#else
  float lanes[kVec];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kVec; ++i) m = std::isnan(lanes[i]) ? lanes[i] : (lanes[i] > m ? lanes[i] : m);
  return m;
#endif
}

// Max over the row of the vector f(d, count) returns (lanes past count are ignored); NaN-propagating, like torch's
// max (at::vec::maximum, not the bare max instruction, which drops a NaN in its first operand).
template <typename F>
inline float vec_max(int64_t n, const F& f) {
  const Vec ninf(-std::numeric_limits<float>::infinity());
  Vec m0 = ninf, m1 = ninf;
  int64_t d = 0;
  for (; d + 2 * kVec <= n; d += 2 * kVec) {
    m0 = at::vec::maximum(m0, f(d, kVec));
    m1 = at::vec::maximum(m1, f(d + kVec, kVec));
  }
  if (d + kVec <= n) {
    m0 = at::vec::maximum(m0, f(d, kVec));
    d += kVec;
  }
  if (d < n) m1 = at::vec::maximum(m1, Vec::set(ninf, f(d, n - d), n - d));
  return hmax(at::vec::maximum(m0, m1));
}

// dst[d .. d + count) = f(d, count) over one row of n values: f returns fp32 Vecs, called once per vector in
// column order. For bf16 / fp16 two vectors are converted and stored together as one Vectorized<T> (the conversion
// rounds a full register either way, so converting one vector at a time does the work twice).
template <typename T, typename F>
FASTBERT_INLINE void write_row(T* dst, int64_t n, const F& f) {
  int64_t d = 0;
  if constexpr (!std::is_same_v<T, float>) {
    for (; d + 2 * kVec <= n; d += 2 * kVec) {
      const Vec a = f(d, kVec);
      const Vec b = f(d + kVec, kVec);
      from_float2<T>(a, b).store(dst + d);
    }
  }
  for (; d + kVec <= n; d += kVec) store_float(f(d, kVec), dst + d, kVec);
  if (d < n) store_float(f(d, n - d), dst + d, n - d);
}

// Elementwise maps over one row, dst[c] = f(d, count, x[c]) or f(d, count, x[c], y[c]), where f maps fp32 Vecs:
// d is the column of the vector's first lane and count its number of valid lanes (f loads per-column parameters
// with it). For bf16 / fp16 the conversions happen in registers, one Vectorized<T> (2 * kVec lanes) per step,
// instead of converting the row into and out of fp32 scratch rows: two L1 passes fewer, which is most of what an
// elementwise bf16 kernel spends besides its arithmetic. The tail goes through a small fp32 buffer.
template <typename T, typename F>
FASTBERT_INLINE void map_row(const T* x, T* dst, int64_t n, const F& f) {
  if constexpr (std::is_same_v<T, float>) {
    vec_for(n, [&](int64_t d, int64_t c) { f(d, c, Vec::loadu(x + d, c)).store(dst + d, c); });
  } else {
    using RVec = at::vec::Vectorized<T>;
    static_assert(RVec::size() == 2 * kVec, "a reduced-precision vector must hold two fp32 vectors");
    int64_t d = 0;
    for (; d + 2 * kVec <= n; d += 2 * kVec) {
      auto [a, b] = at::vec::convert_to_float<T>(RVec::loadu(x + d));
      from_float2<T>(f(d, kVec, a), f(d + kVec, kVec, b)).store(dst + d);
    }
    float buf[2 * kVec];
    const int64_t rest = n - d;
    for (int64_t i = 0; i < rest; ++i) buf[i] = static_cast<float>(x[d + i]);
    for (int64_t e = 0; e < rest; e += kVec) {
      const int64_t c = std::min<int64_t>(kVec, rest - e);
      f(d + e, c, Vec::loadu(buf + e, c)).store(buf + e, c);
    }
    for (int64_t i = 0; i < rest; ++i) dst[d + i] = static_cast<T>(buf[i]);
  }
}

template <typename T, typename F>
FASTBERT_INLINE void map2_row(const T* x, const T* y, T* dst, int64_t n, const F& f) {
  if constexpr (std::is_same_v<T, float>) {
    vec_for(n, [&](int64_t d, int64_t c) { f(d, c, Vec::loadu(x + d, c), Vec::loadu(y + d, c)).store(dst + d, c); });
  } else {
    using RVec = at::vec::Vectorized<T>;
    int64_t d = 0;
    for (; d + 2 * kVec <= n; d += 2 * kVec) {
      auto [xa, xb] = at::vec::convert_to_float<T>(RVec::loadu(x + d));
      auto [ya, yb] = at::vec::convert_to_float<T>(RVec::loadu(y + d));
      from_float2<T>(f(d, kVec, xa, ya), f(d + kVec, kVec, xb, yb)).store(dst + d);
    }
    float xbuf[2 * kVec], ybuf[2 * kVec];
    const int64_t rest = n - d;
    for (int64_t i = 0; i < rest; ++i) {
      xbuf[i] = static_cast<float>(x[d + i]);
      ybuf[i] = static_cast<float>(y[d + i]);
    }
    for (int64_t e = 0; e < rest; e += kVec) {
      const int64_t c = std::min<int64_t>(kVec, rest - e);
      f(d + e, c, Vec::loadu(xbuf + e, c), Vec::loadu(ybuf + e, c)).store(xbuf + e, c);
    }
    for (int64_t i = 0; i < rest; ++i) dst[d + i] = static_cast<T>(xbuf[i]);
  }
}

// --------------------------------------------------------------------------------------------------------------
// Row blocks for kernels that sum over rows (parameter gradients). The boundaries depend on `rows` only, never on
// the thread count, and the per-block partial sums are added in block order: deterministic results.

constexpr int64_t kMaxRowBlocks = 32;

struct RowBlocks {
  int64_t rows, count;
  explicit RowBlocks(int64_t rows_) : rows(rows_), count(std::min(rows_, kMaxRowBlocks)) {}
  int64_t begin(int64_t b) const { return b * rows / count; }
  int64_t end(int64_t b) const { return (b + 1) * rows / count; }
  // Blocks per parallel task: small problems run on one thread.
  int64_t grain(int64_t n) const {
    const int64_t rows_per_block = std::max<int64_t>(1, rows / std::max<int64_t>(count, 1));
    return std::max<int64_t>(1, row_grain(n) / rows_per_block);
  }
};

// out[c] = sum over blocks b of partial[b * stride + c] (stride: n when the blocks' rows are adjacent), in block
// order, accumulated in double: the cross-block sum adds no fp32 rounding of its own, so a parameter gradient
// carries only its blocks' (short) fp32 sums' errors.
inline void sum_blocks(const float* partial, int64_t blocks, int64_t n, float* out, int64_t stride) {
  std::vector<double> acc(n, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* row = partial + b * stride;
    for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<double>(row[c]);  // vectorized by the compiler
  }
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<float>(acc[c]);
}

// Column sums over `rows` rows of n values, `sums` of them side by side (a LayerNorm backward's dweight and dbias,
// a GELU bias's gradient), as per-row-block partial sums (RowBlocks: deterministic at any thread count).
// for_each_row runs body(r, acc, scratch) on every row, in parallel over row blocks, with the accumulators of the
// row's block (acc + j * n: sum j) and a per-task scratch of scratch_rows * n floats; finish() adds the blocks in
// order into the outputs.
class BlockColumnSums {
 public:
  BlockColumnSums(int64_t rows, int64_t n, int64_t sums)
      : blocks_(rows), n_(n), sums_(sums), partial_(blocks_.count * sums * n, 0.f) {}

  template <typename F>
  void for_each_row(int64_t scratch_rows, const F& body) {
    at::parallel_for(0, blocks_.count, blocks_.grain(n_), [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(scratch_rows * n_);
      for (int64_t blk = b0; blk < b1; ++blk) {
        float* acc = partial_.data() + blk * sums_ * n_;
        for (int64_t r = blocks_.begin(blk); r < blocks_.end(blk); ++r) body(r, acc, scratch.data());
      }
    });
  }

  // outs: sums_ pointers to fp32 (n,) results, in accumulator order.
  void finish(std::initializer_list<float*> outs) const {
    int64_t j = 0;
    for (float* out : outs) sum_blocks(partial_.data() + j++ * n_, blocks_.count, n_, out, sums_ * n_);
  }

 private:
  RowBlocks blocks_;
  int64_t n_, sums_;
  std::vector<float> partial_;  // per block: sums_ rows of n
};

}  // namespace fastbert::cpu
