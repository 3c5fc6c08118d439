// Shared device helpers for fastbert's CUDA kernels: dtype traits, 16-byte vector I/O, warp reductions,
// the counter-based Philox4x32-10 generator and the two dropout element->counter mappings, launch helpers.
//
// Everything here is internal to csrc/cuda; the public surface is launchers.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "launchers.h"

namespace fastbert {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// --------------------------------------------------------------------------------------------------------------
// dtype traits: conversions to and from fp32 (all arithmetic is fp32) and the elements per 16-byte vector.

template <typename T>
struct Dtype;

template <>
struct Dtype<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

template <>
struct Dtype<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Dtype<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  return Dtype<T>::to_float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  return Dtype<T>::from_float(v);
}

// --------------------------------------------------------------------------------------------------------------
// Vector I/O. load_f32<N>(p, out) reads N consecutive elements of T starting at p into fp32 registers; when
// N * sizeof(T) is a multiple of 16 it issues 16-byte loads (p must then be 16-byte aligned: the launchers
// check pointers and widths before they pick a vectorized kernel), otherwise element loads.

template <typename T>
union Pack16 {
  uint4 raw;
  T elem[16 / sizeof(T)];
};

template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float* out) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      Pack16<T> pk;
      pk.raw = reinterpret_cast<const uint4*>(p)[c];
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[c * kPer + j] = to_f32(pk.elem[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f32(p[j]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float* in) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      Pack16<T> pk;
#pragma unroll
      for (int j = 0; j < kPer; ++j) pk.elem[j] = from_f32<T>(in[c * kPer + j]);
      reinterpret_cast<uint4*>(p)[c] = pk.raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = from_f32<T>(in[j]);
  }
}

// N bytes of a uint8 mask (N = 4 or 8 with an aligned pointer, else byte loads); out[j] = (byte != 0).
template <int N>
__device__ __forceinline__ void load_mask(const uint8_t* __restrict__ p, bool* out, bool aligned) {
  if constexpr (N == 8 || N == 4) {
    if (aligned) {
      if constexpr (N == 8) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = ((w.x >> (8 * j)) & 0xffu) != 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) out[4 + j] = ((w.y >> (8 * j)) & 0xffu) != 0;
      } else {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = ((w >> (8 * j)) & 0xffu) != 0;
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = p[j] != 0;
}

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// --------------------------------------------------------------------------------------------------------------
// Warp reductions (butterfly: every lane ends with the result, in a fixed order, so results are deterministic).

struct SumOp {
  static constexpr float kIdentity = 0.0f;
  __device__ __forceinline__ static float apply(float a, float b) { return a + b; }
};

struct MaxOp {
  static constexpr float kIdentity = -INFINITY;
  __device__ __forceinline__ static float apply(float a, float b) { return fmaxf(a, b); }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduce K values over one row group of WPR warps (a block holds GROUPS groups). red: this reduction's
// [GROUPS][WPR][K] shared slots; callers alternate two buffers between consecutive reductions, so one barrier
// per reduction is enough. Every thread of the group gets the result; the order is fixed (deterministic).
template <class Op, int GROUPS, int WPR, int K>
__device__ __forceinline__ void group_reduce(float (&v)[K], float (*red)[WPR][K], int group, int warp_in_group,
                                             int lane) {
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = warp_reduce<Op>(v[i]);
  if constexpr (WPR > 1) {
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < K; ++i) red[group][warp_in_group][i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < K; ++i) {
      float s = red[group][0][i];
#pragma unroll
      for (int w = 1; w < WPR; ++w) s = Op::apply(s, red[group][w][i]);
      v[i] = s;
    }
  }
}

template <int kWidth = 32>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kWidth = 32>
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// --------------------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11; the generator behind curand's Philox4_32_10 and Random123's philox4x32):
// a bijection of a 128-bit counter under a 64-bit key. Stateless, so any element's random bits are computed
// where they are needed and the backward pass regenerates the forward's dropout mask from (seed, position).
// __host__ too: the known-answer test in tests/cuda runs it on the CPU.

struct Philox4 {
  uint32_t v[4];
};

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                          uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < 10; ++r) {  // fully unrolled by nvcc at -O3 (no #pragma: this is host code too)
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 16-bit lane s (0..7) of a Philox output: word s / 2, low half first. Selects instead of r.v[s >> 1] so that a
// run-time s never forces the array into local memory (a compile-time s folds to one word).
__host__ __device__ __forceinline__ uint32_t philox_u16(const Philox4& r, int s) {
  const uint32_t w = (s & 4) ? ((s & 2) ? r.v[3] : r.v[2]) : ((s & 2) ? r.v[1] : r.v[0]);
  return (s & 1) ? (w >> 16) : (w & 0xffffu);
}

// Domain tags (counter word 3) keep the two mappings apart even under the same seed.
constexpr uint32_t kTagRows = 0x524F5753u;       // "ROWS": LayerNorm dropout, (row, col)
constexpr uint32_t kTagAttention = 0x4154544Eu;  // "ATTN": attention-probability dropout, (bh, q, k)

// Row-major dropout (add_layer_norm): element (row, col) keeps iff u16 >= thr16 with
//   r = philox4x32_10(counter = {col >> 3, lo32(row), hi32(row), kTagRows}, key = seed), u16 = philox_u16(r, col & 7).
// Eight consecutive columns share one Philox call (one 16-byte fp16/bf16 vector).
__host__ __device__ __forceinline__ Philox4 rows_philox(uint64_t seed, int64_t row, int64_t col) {
  return philox4x32_10(static_cast<uint32_t>(col >> 3), static_cast<uint32_t>(row),
                       static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32), kTagRows, seed);
}

// Attention dropout: element (bh = b * H + h, query q, key k). With ql = q & 15, kl = k & 15:
//   counter = {(k >> 4) << 5 | (ql & 1) << 4 | ((ql & 7) >> 1) << 2 | ((kl & 7) >> 1), q >> 4, bh, kTagAttention}
//   u16 = philox_u16(philox4x32_10(counter, seed), (ql >> 3) * 4 + (kl >> 3) * 2 + (kl & 1)); keep iff u16 >= thr16.
// Why this shape: in a 16x16 (query, key) block an mma.sync m16n8k16 accumulator puts rows {g, g+8} x columns
// {2t, 2t+1, 2t+8, 2t+9} in lane (g = lane / 4, t = lane % 4); with this mapping those 8 elements are exactly the
// 8 lanes of one Philox call, and the transposed (key-major) layout of the dK/dV kernel needs two calls.
__host__ __device__ __forceinline__ Philox4 attn_philox(uint64_t seed, uint32_t bh, uint32_t qblock, uint32_t kblock,
                                                        uint32_t q_odd, uint32_t q_pair, uint32_t k_pair) {
  return philox4x32_10((kblock << 5) | (q_odd << 4) | (q_pair << 2) | k_pair, qblock, bh, kTagAttention, seed);
}

__host__ __device__ __forceinline__ bool attn_dropout_keep(uint64_t seed, uint32_t thr16, int64_t bh, int64_t q,
                                                           int64_t k) {
  const uint32_t ql = static_cast<uint32_t>(q & 15), kl = static_cast<uint32_t>(k & 15);
  const Philox4 r = attn_philox(seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(q >> 4),
                                static_cast<uint32_t>(k >> 4), ql & 1, (ql & 7) >> 1, (kl & 7) >> 1);
  return philox_u16(r, static_cast<int>((ql >> 3) * 4 + (kl >> 3) * 2 + (kl & 1))) >= thr16;
}

// thr16 = round(p * 65536), clamped to 65535: P(keep) = 1 - thr16 / 65536 (within 2^-17 of 1 - p).
inline uint32_t dropout_threshold16(float p) {
  const double t = std::nearbyint(static_cast<double>(p) * 65536.0);
  return t <= 0.0 ? 0u : (t >= 65535.0 ? 65535u : static_cast<uint32_t>(t));
}

// --------------------------------------------------------------------------------------------------------------
// Host helpers for the launchers.

inline bool valid_dtype(FastbertDType d) {
  return d == FASTBERT_FLOAT32 || d == FASTBERT_FLOAT16 || d == FASTBERT_BFLOAT16;
}

// A parameter dtype must be the activation dtype or fp32 (e.g. fp32 LayerNorm weights under bf16 autocast).
inline bool valid_param_dtype(FastbertDType act, FastbertDType param) {
  return param == act || param == FASTBERT_FLOAT32;
}

// Every non-null pointer 16-byte aligned (the precondition of the vectorized kernels).
inline bool aligned_all(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned16(p)) return false;
  }
  return true;
}

inline bool valid_dropout_p(float p) { return p >= 0.0f && p < 1.0f; }

// Shared memory per block on every arch the kernels run on (sm_80 to sm_90): sm_86 and sm_89 (A10, L4, L40S,
// RTX 30/40) allow 99 KB per block, sm_80 163 KB, sm_90 227 KB. Every dynamic-shared-memory launcher
// static_asserts that its bytes plus kStaticSmemReserve (the kernels' static __shared__ arrays: block_kv_len's
// 128 B) fit kMaxSmemPerBlock, so a config that would fail at launch on an sm_86 part does not compile.
constexpr int kMaxSmemPerBlock = 99 * 1024;
constexpr int kStaticSmemReserve = 1024;

template <int kDynamicBytes>
constexpr bool smem_fits_every_arch() {
  return kDynamicBytes + kStaticSmemReserve <= kMaxSmemPerBlock;
}

// Kernels that use more than 48 KiB of dynamic shared memory must opt in once per device.
template <typename Kernel>
inline cudaError_t set_max_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Calls fn(T{}, TW{}) with the C++ types for (act, param); returns false for an unsupported pair.
template <typename Fn>
inline bool dispatch_act_param(FastbertDType act, FastbertDType param, Fn&& fn) {
  if (!valid_dtype(act) || !valid_param_dtype(act, param)) return false;
  switch (act) {
    case FASTBERT_FLOAT32:
      fn(float{}, float{});
      return true;
    case FASTBERT_FLOAT16:
      if (param == FASTBERT_FLOAT32) fn(__half{}, float{});
      else fn(__half{}, __half{});
      return true;
    case FASTBERT_BFLOAT16:
      if (param == FASTBERT_FLOAT32) fn(__nv_bfloat16{}, float{});
      else fn(__nv_bfloat16{}, __nv_bfloat16{});
      return true;
  }
  return false;
}

template <typename Fn>
inline bool dispatch_act(FastbertDType act, Fn&& fn) {
  switch (act) {
    case FASTBERT_FLOAT32:
      fn(float{});
      return true;
    case FASTBERT_FLOAT16:
      fn(__half{});
      return true;
    case FASTBERT_BFLOAT16:
      fn(__nv_bfloat16{});
      return true;
  }
  return false;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace fastbert
