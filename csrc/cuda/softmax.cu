// Masked, scaled softmax over attention scores (B, H, Tq, Tk), forward and backward.
//
// Numerics: fp32; logits t = scale * s (or -inf on a padded key), m = max(t), p = exp2((t - m) * log2 e) / sum.
// A row whose keys are all padding has m = -inf: it is shifted by 0 instead (exp2(-inf) = 0), its sum is 0 and
// the row is written as zeros. Rows up to 8192 keys stay in registers (one warp per row up to 1024 keys, one
// block per row beyond); longer rows, odd widths and misaligned pointers take the chunked kernels (an online
// max/sum pass, then a write pass).
#include "common.cuh"

namespace fastbert {
namespace cuda {
namespace {

struct SoftmaxParams {
  void* out;             // fwd: probs; bwd: dscores
  const void* in;        // fwd: scores; bwd: dprobs
  const void* probs;     // bwd only
  const uint8_t* mask;   // fwd only, nullable
  int64_t mask_stride_b;
  int64_t rows_per_batch;  // H * Tq
  int64_t rows;
  int N;  // Tk
  float scale;
  bool mask_vec_ok;  // mask pointer and stride allow VEC-byte mask loads
};

constexpr int kGenericThreads = 256;

template <typename T, int GROUPS, int WPR, int E, int VEC>
__global__ void __launch_bounds__(GROUPS * WPR * 32, 1) softmax_fwd_kernel(const SoftmaxParams p) {
  constexpr int kTpr = WPR * 32, kIters = E / VEC;
  __shared__ float red[2][GROUPS][WPR][1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp / WPR, wig = warp % WPR, tid = wig * 32 + lane;
  const int N = p.N, nvec = N / VEC;
  const float scale_log2 = p.scale * kLog2e;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * GROUPS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * GROUPS) {
    const int64_t row = base + group;
    const bool row_ok = row < p.rows;
    const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + (row / p.rows_per_batch) * p.mask_stride_b;
    float t[kIters][VEC];
    float m[1] = {-INFINITY};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * kTpr;
      if (row_ok && c < nvec) {
        load_f32<VEC>(static_cast<const T*>(p.in) + row * N + c * VEC, t[it]);
        bool keep[VEC];
        if (mrow != nullptr) load_mask<VEC>(mrow + c * VEC, keep, p.mask_vec_ok);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          t[it][j] = (mrow == nullptr || keep[j]) ? t[it][j] * scale_log2 : -INFINITY;
          m[0] = fmaxf(m[0], t[it][j]);
        }
      }
    }
    group_reduce<MaxOp, GROUPS, WPR>(m, red[0], group, wig, lane);
    const float shift = m[0] == -INFINITY ? 0.0f : m[0];
    float s[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (row_ok && tid + it * kTpr < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          t[it][j] = exp2f(t[it][j] - shift);
          s[0] += t[it][j];
        }
      }
    }
    group_reduce<SumOp, GROUPS, WPR>(s, red[1], group, wig, lane);
    const float inv = s[0] > 0.0f ? 1.0f / s[0] : 0.0f;
    if (row_ok) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int c = tid + it * kTpr;
        if (c < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) t[it][j] *= inv;
          store_f32<VEC>(static_cast<T*>(p.out) + row * N + c * VEC, t[it]);
        }
      }
    }
  }
}

template <typename T, int GROUPS, int WPR, int E, int VEC>
__global__ void __launch_bounds__(GROUPS * WPR * 32, 1) softmax_bwd_kernel(const SoftmaxParams p) {
  constexpr int kTpr = WPR * 32, kIters = E / VEC;
  __shared__ float red[2][GROUPS][WPR][1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp / WPR, wig = warp % WPR, tid = wig * 32 + lane;
  const int N = p.N, nvec = N / VEC;
  int parity = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * GROUPS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * GROUPS, parity ^= 1) {
    const int64_t row = base + group;
    const bool row_ok = row < p.rows;
    float pr[kIters][VEC], dp[kIters][VEC];
    float dot[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * kTpr;
      if (row_ok && c < nvec) {
        load_f32<VEC>(static_cast<const T*>(p.probs) + row * N + c * VEC, pr[it]);
        load_f32<VEC>(static_cast<const T*>(p.in) + row * N + c * VEC, dp[it]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot[0] = fmaf(pr[it][j], dp[it][j], dot[0]);
      }
    }
    group_reduce<SumOp, GROUPS, WPR>(dot, red[parity], group, wig, lane);
    if (row_ok) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int c = tid + it * kTpr;
        if (c < nvec) {
          float g[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) g[j] = p.scale * pr[it][j] * (dp[it][j] - dot[0]);
          store_f32<VEC>(static_cast<T*>(p.out) + row * N + c * VEC, g);
        }
      }
    }
  }
}

// Chunked forward: pass 1 keeps a running (max, sum) per thread, merged across the block; pass 2 writes.
template <typename T>
__global__ void __launch_bounds__(kGenericThreads, 4) softmax_fwd_generic_kernel(const SoftmaxParams p) {
  constexpr int kWarps = kGenericThreads / 32;
  __shared__ float red[2][1][kWarps][1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int N = p.N;
  const float scale_log2 = p.scale * kLog2e;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* in = static_cast<const T*>(p.in) + row * N;
    const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + (row / p.rows_per_batch) * p.mask_stride_b;
    float m = -INFINITY, s = 0.0f;
    for (int c = threadIdx.x; c < N; c += kGenericThreads) {
      if (mrow != nullptr && mrow[c] == 0) continue;
      const float t = to_f32(in[c]) * scale_log2;
      if (t > m) {
        s = s * exp2f(m - t) + 1.0f;  // m = -inf on the first key: exp2(-inf) = 0
        m = t;
      } else {
        s += exp2f(t - m);
      }
    }
    float mm[1] = {m};
    group_reduce<MaxOp, 1, kWarps>(mm, red[0], 0, warp, lane);
    const float shift = mm[0] == -INFINITY ? 0.0f : mm[0];
    float ss[1] = {m == -INFINITY ? 0.0f : s * exp2f(m - shift)};
    group_reduce<SumOp, 1, kWarps>(ss, red[1], 0, warp, lane);
    const float inv = ss[0] > 0.0f ? 1.0f / ss[0] : 0.0f;
    T* out = static_cast<T*>(p.out) + row * N;
    for (int c = threadIdx.x; c < N; c += kGenericThreads) {
      const bool keep = mrow == nullptr || mrow[c] != 0;
      const float prob = keep ? exp2f(to_f32(in[c]) * scale_log2 - shift) * inv : 0.0f;
      out[c] = from_f32<T>(prob);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGenericThreads, 4) softmax_bwd_generic_kernel(const SoftmaxParams p) {
  constexpr int kWarps = kGenericThreads / 32;
  __shared__ float red[2][1][kWarps][1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int N = p.N;
  int parity = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, parity ^= 1) {
    const T* pr = static_cast<const T*>(p.probs) + row * N;
    const T* dp = static_cast<const T*>(p.in) + row * N;
    float dot[1] = {0.0f};
    for (int c = threadIdx.x; c < N; c += kGenericThreads) dot[0] = fmaf(to_f32(pr[c]), to_f32(dp[c]), dot[0]);
    group_reduce<SumOp, 1, kWarps>(dot, red[parity], 0, warp, lane);
    T* out = static_cast<T*>(p.out) + row * N;
    for (int c = threadIdx.x; c < N; c += kGenericThreads) {
      out[c] = from_f32<T>(p.scale * to_f32(pr[c]) * (to_f32(dp[c]) - dot[0]));
    }
  }
}

template <typename Kernel>
void launch_rows(Kernel kernel, int64_t blocks, int threads, const SoftmaxParams& p, cudaStream_t stream) {
  const int64_t grid = blocks < (1 << 20) ? blocks : (1 << 20);
  kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(p);
}

template <typename T, bool kBwd>
void launch_softmax(const SoftmaxParams& p, bool vec_ok, cudaStream_t stream) {
  constexpr int V = Dtype<T>::kVec;
  const int N = p.N;
  if (vec_ok && N <= 32 * 8) {
    launch_rows(kBwd ? softmax_bwd_kernel<T, 4, 1, 8, V> : softmax_fwd_kernel<T, 4, 1, 8, V>, ceil_div(p.rows, 4),
                128, p, stream);
  } else if (vec_ok && N <= 32 * 32) {
    launch_rows(kBwd ? softmax_bwd_kernel<T, 4, 1, 32, V> : softmax_fwd_kernel<T, 4, 1, 32, V>, ceil_div(p.rows, 4),
                128, p, stream);
  } else if (vec_ok && N <= 256 * 32) {
    launch_rows(kBwd ? softmax_bwd_kernel<T, 1, 8, 32, V> : softmax_fwd_kernel<T, 1, 8, 32, V>, p.rows, 256, p,
                stream);
  } else {
    launch_rows(kBwd ? softmax_bwd_generic_kernel<T> : softmax_fwd_generic_kernel<T>, p.rows, kGenericThreads, p,
                stream);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastbert

using namespace fastbert::cuda;

extern "C" cudaError_t fastbert_softmax_fwd(void* probs, const void* scores, const uint8_t* key_padding_mask,
                                            int64_t mask_stride_b, int64_t batch, int64_t nheads, int64_t seqlen_q,
                                            int64_t seqlen_k, float scale, FastbertDType dtype, cudaStream_t stream) {
  if (batch < 0 || nheads < 0 || seqlen_q < 0 || seqlen_k < 0 || seqlen_k > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  if (!valid_dtype(dtype) || !std::isfinite(scale)) return cudaErrorInvalidValue;
  const int64_t rows = batch * nheads * seqlen_q;
  if (rows == 0 || seqlen_k == 0) return cudaSuccess;
  if (probs == nullptr || scores == nullptr) return cudaErrorInvalidValue;
  if (key_padding_mask != nullptr && mask_stride_b < seqlen_k) return cudaErrorInvalidValue;
  SoftmaxParams p{};
  p.out = probs;
  p.in = scores;
  p.mask = key_padding_mask;
  p.mask_stride_b = mask_stride_b;
  p.rows_per_batch = nheads * seqlen_q;
  p.rows = rows;
  p.N = static_cast<int>(seqlen_k);
  p.scale = scale;
  const bool vec_ok = aligned_all({probs, scores});
  dispatch_act(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int V = Dtype<T>::kVec;
    p.mask_vec_ok = reinterpret_cast<uintptr_t>(key_padding_mask) % V == 0 && mask_stride_b % V == 0;
    launch_softmax<T, false>(p, vec_ok && seqlen_k % V == 0, stream);
  });
  return cudaGetLastError();
}

extern "C" cudaError_t fastbert_softmax_bwd(void* dscores, const void* dprobs, const void* probs, int64_t rows,
                                            int64_t seqlen_k, float scale, FastbertDType dtype, cudaStream_t stream) {
  if (rows < 0 || seqlen_k < 0 || seqlen_k > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if (!valid_dtype(dtype) || !std::isfinite(scale)) return cudaErrorInvalidValue;
  if (rows == 0 || seqlen_k == 0) return cudaSuccess;
  if (dscores == nullptr || dprobs == nullptr || probs == nullptr) return cudaErrorInvalidValue;
  SoftmaxParams p{};
  p.out = dscores;
  p.in = dprobs;
  p.probs = probs;
  p.rows = rows;
  p.N = static_cast<int>(seqlen_k);
  p.scale = scale;
  const bool vec_ok = aligned_all({dscores, dprobs, probs});
  dispatch_act(dtype, [&](auto t) {
    using T = decltype(t);
    launch_softmax<T, true>(p, vec_ok && seqlen_k % Dtype<T>::kVec == 0, stream);
  });
  return cudaGetLastError();
}
