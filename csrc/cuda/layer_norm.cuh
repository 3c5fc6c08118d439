// The LayerNorm row engine shared by add_layer_norm (layer_norm.cu) and bias_gelu_layer_norm (bias_gelu.cu).
//
// out = LayerNorm(z) with z produced per element by a prologue:
//   LnOp::kAdd:  z = dropout(x) + residual           (BERT's post-LN sublayer output)
//   LnOp::kGelu: z = gelu(x + pre_bias)              (the MLM head transform)
// Numerics: fp32 throughout; mean first, then the variance as the mean of squared deviations from registers
// (two-pass, no E[z^2] - mean^2 cancellation); rstd = rsqrtf(var + eps) like PyTorch's CUDA LayerNorm.
//
// Work split. A "row group" of WPR warps owns one row at a time and keeps the row in registers: thread `tid` of
// the group holds vectors tid, tid + 32 * WPR, ... (VEC elements each, 16-byte loads). A block holds GROUPS row
// groups and strides over the rows. Narrow rows use one warp per row (WPR = 1, shuffles only), wide rows one
// block per row. Rows wider than the largest config, or misaligned / odd widths, take the scalar three-pass
// kernels at the end (z recomputed each pass, any width).
//
// Backward: dz = rstd * (w * dout - mean(w * dout) - xhat * mean(w * dout * xhat)), then the prologue's
// backward. Parameter gradients are accumulated per block in fixed column ownership (a thread always owns the
// same columns), combined across the block's row groups in a fixed order, written as fp32 partials
// [3][nparts][N] (dweight, dbias, dpre_bias), and summed over the parts by ln_param_grad_kernel in a fixed
// order: deterministic, no atomics.
#pragma once

#include "common.cuh"

namespace fastbert {
namespace cuda {

enum class LnOp { kAdd, kGelu };

struct LnParams {
  // forward outputs
  void* out;
  float* mean;
  float* rstd;
  // inputs (T unless noted; nullable ones say so in launchers.h)
  const void* x;
  const void* residual;  // kAdd
  const void* pre_bias;  // kGelu, TW
  const void* weight;    // TW
  const void* bias;      // TW
  // backward
  const void* dout;
  void* dx;
  void* dresidual;
  const float* mean_in;
  const float* rstd_in;
  float* partials;  // [3][nparts][N]
  int64_t rows;
  int N;
  float eps;
  bool dropout;
  float keep_scale;
  uint32_t thr16;
  uint64_t seed;
  int approximate;  // FastbertGelu
};

constexpr int kLnBwdMaxParts = 1024;  // the most blocks (hence partial rows) a backward launch uses
constexpr int kLnGenericThreads = 256;

// --------------------------------------------------------------------------------------------------------------
// GELU in fp32 (erff / tanhf; never the fast-math intrinsics).

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCoeff = 0.044715f;

__device__ __forceinline__ float gelu_f(float u, int approximate) {
  if (approximate == FASTBERT_GELU_TANH) {
    const float inner = kSqrt2OverPi * fmaf(kTanhCoeff * u, u * u, u);
    return 0.5f * u * (1.0f + tanhf(inner));
  }
  return 0.5f * u * (1.0f + erff(u * kInvSqrt2));
}

__device__ __forceinline__ float gelu_grad_f(float u, int approximate) {
  if (approximate == FASTBERT_GELU_TANH) {
    const float u2 = u * u;
    const float t = tanhf(kSqrt2OverPi * fmaf(kTanhCoeff * u, u2, u));
    const float dinner = kSqrt2OverPi * fmaf(3.0f * kTanhCoeff, u2, 1.0f);
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * dinner;
  }
  return 0.5f * (1.0f + erff(u * kInvSqrt2)) + u * kInvSqrt2Pi * expf(-0.5f * u * u);
}

// --------------------------------------------------------------------------------------------------------------
// Prologue: z for N (= VEC, or 1 in the scalar kernels) consecutive elements starting at (row, col0).
// aux receives what the backward epilogue needs: the dropout factor (0 or 1/(1-p)) or the GELU input.

// Dropout factors for n consecutive columns col0.. (col0 % n == 0, n in {1, 4, 8}): rows mapping of launchers.h.
template <int N>
__device__ __forceinline__ void rows_dropout_factors(const LnParams& p, int64_t row, int col0, float* f) {
  if constexpr (N == 8 || N == 4) {
    const Philox4 r = rows_philox(p.seed, row, col0);
    const int s0 = col0 & 7;  // 0 for N == 8; 0 or 4 for N == 4
#pragma unroll
    for (int j = 0; j < N; ++j) f[j] = philox_u16(r, s0 + j) >= p.thr16 ? p.keep_scale : 0.0f;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const Philox4 r = rows_philox(p.seed, row, col0 + j);
      f[j] = philox_u16(r, (col0 + j) & 7) >= p.thr16 ? p.keep_scale : 0.0f;
    }
  }
}

template <LnOp OP, typename T, typename TW, int N>
__device__ __forceinline__ void ln_prologue(const LnParams& p, int64_t row, int col0, float* z, float* aux) {
  const int64_t off = row * p.N + col0;
  load_f32<N>(static_cast<const T*>(p.x) + off, z);
  if constexpr (OP == LnOp::kAdd) {
    if (p.dropout) {
      rows_dropout_factors<N>(p, row, col0, aux);
#pragma unroll
      for (int j = 0; j < N; ++j) z[j] *= aux[j];
    }
    if (p.residual != nullptr) {
      float r[N];
      load_f32<N>(static_cast<const T*>(p.residual) + off, r);
#pragma unroll
      for (int j = 0; j < N; ++j) z[j] += r[j];
    }
  } else {
    if (p.pre_bias != nullptr) {
      float b[N];
      load_f32<N>(static_cast<const TW*>(p.pre_bias) + col0, b);
#pragma unroll
      for (int j = 0; j < N; ++j) z[j] += b[j];
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      aux[j] = z[j];
      z[j] = gelu_f(z[j], p.approximate);
    }
  }
}

// Backward epilogue: writes dx (and dresidual) from dz; returns dx in fp32 for the dpre_bias partial.
template <LnOp OP, typename T, int N>
__device__ __forceinline__ void ln_epilogue_bwd(const LnParams& p, int64_t row, int col0, const float* dz,
                                                const float* aux, float* dxv) {
  const int64_t off = row * p.N + col0;
  if constexpr (OP == LnOp::kAdd) {
#pragma unroll
    for (int j = 0; j < N; ++j) dxv[j] = p.dropout ? dz[j] * aux[j] : dz[j];
    if (p.dresidual != nullptr) store_f32<N>(static_cast<T*>(p.dresidual) + off, dz);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) dxv[j] = dz[j] * gelu_grad_f(aux[j], p.approximate);
  }
  store_f32<N>(static_cast<T*>(p.dx) + off, dxv);
}

template <int N, typename TW>
__device__ __forceinline__ void load_param(const void* ptr, int col0, float fill, float* out) {
  if (ptr != nullptr) {
    load_f32<N>(static_cast<const TW*>(ptr) + col0, out);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = fill;
  }
}

template <int GROUPS, int WPR, int K>
__device__ __forceinline__ void group_sum(float (&v)[K], float (*red)[WPR][K], int group, int warp_in_group,
                                          int lane) {
  group_reduce<SumOp, GROUPS, WPR, K>(v, red, group, warp_in_group, lane);
}

// --------------------------------------------------------------------------------------------------------------
// Register-cached kernels.

template <LnOp OP, typename T, typename TW, int GROUPS, int WPR, int E, int VEC>
__global__ void __launch_bounds__(GROUPS * WPR * 32, 1) ln_fwd_kernel(const LnParams p) {
  constexpr int kTpr = WPR * 32, kIters = E / VEC;
  __shared__ float red[2][GROUPS][WPR][1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp / WPR, wig = warp % WPR, tid = wig * 32 + lane;
  const int N = p.N, nvec = N / VEC;
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * GROUPS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * GROUPS) {
    const int64_t row = base + group;
    const bool row_ok = row < p.rows;
    float z[kIters][VEC];
    float s[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * kTpr;
      if (row_ok && c < nvec) {
        float aux[VEC];
        ln_prologue<OP, T, TW, VEC>(p, row, c * VEC, z[it], aux);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s[0] += z[it][j];
      }
    }
    group_sum<GROUPS, WPR>(s, red[0], group, wig, lane);
    const float mean = s[0] * inv_n;
    float sq[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (row_ok && tid + it * kTpr < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = z[it][j] - mean;
          sq[0] += d * d;
        }
      }
    }
    group_sum<GROUPS, WPR>(sq, red[1], group, wig, lane);
    const float rstd = rsqrtf(sq[0] * inv_n + p.eps);
    if (row_ok) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int c = tid + it * kTpr;
        if (c < nvec) {
          float w[VEC], b[VEC], y[VEC];
          load_param<VEC, TW>(p.weight, c * VEC, 1.0f, w);
          load_param<VEC, TW>(p.bias, c * VEC, 0.0f, b);
#pragma unroll
          for (int j = 0; j < VEC; ++j) y[j] = fmaf((z[it][j] - mean) * rstd, w[j], b[j]);
          store_f32<VEC>(static_cast<T*>(p.out) + row * N + c * VEC, y);
        }
      }
      if (tid == 0) {
        p.mean[row] = mean;
        p.rstd[row] = rstd;
      }
    }
  }
}

template <LnOp OP, typename T, typename TW, int GROUPS, int WPR, int E, int VEC>
__global__ void __launch_bounds__(GROUPS * WPR * 32, 1) ln_bwd_kernel(const LnParams p) {
  constexpr int kTpr = WPR * 32, kIters = E / VEC;
  constexpr bool kGelu = OP == LnOp::kGelu;
  __shared__ float red[2][GROUPS][WPR][2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp / WPR, wig = warp % WPR, tid = wig * 32 + lane;
  const int N = p.N, nvec = N / VEC;
  const float inv_n = 1.0f / static_cast<float>(N);
  float acc_w[kIters][VEC], acc_b[kIters][VEC], acc_pb[kGelu ? kIters : 1][VEC];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_w[it][j] = 0.0f;
      acc_b[it][j] = 0.0f;
      if constexpr (kGelu) acc_pb[it][j] = 0.0f;
    }
  }
  int parity = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * GROUPS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * GROUPS, parity ^= 1) {
    const int64_t row = base + group;
    const bool row_ok = row < p.rows;
    const float mean = row_ok ? p.mean_in[row] : 0.0f, rstd = row_ok ? p.rstd_in[row] : 0.0f;
    float xhat[kIters][VEC], wdy[kIters][VEC], aux[kIters][VEC];
    float s[2] = {0.0f, 0.0f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * kTpr;
      if (row_ok && c < nvec) {
        float z[VEC], dy[VEC], w[VEC];
        ln_prologue<OP, T, TW, VEC>(p, row, c * VEC, z, aux[it]);
        load_f32<VEC>(static_cast<const T*>(p.dout) + row * N + c * VEC, dy);
        load_param<VEC, TW>(p.weight, c * VEC, 1.0f, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xh = (z[j] - mean) * rstd, wd = dy[j] * w[j];
          xhat[it][j] = xh;
          wdy[it][j] = wd;
          s[0] += wd;
          s[1] += wd * xh;
          acc_w[it][j] = fmaf(dy[j], xh, acc_w[it][j]);
          acc_b[it][j] += dy[j];
        }
      }
    }
    group_sum<GROUPS, WPR>(s, red[parity], group, wig, lane);
    const float mean_wdy = s[0] * inv_n, mean_wdy_xhat = s[1] * inv_n;
    if (row_ok) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int c = tid + it * kTpr;
        if (c < nvec) {
          float dz[VEC], dxv[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) dz[j] = rstd * (wdy[it][j] - mean_wdy - xhat[it][j] * mean_wdy_xhat);
          ln_epilogue_bwd<OP, T, VEC>(p, row, c * VEC, dz, aux[it], dxv);
          if constexpr (kGelu) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc_pb[it][j] += dxv[j];
          }
        }
      }
    }
  }
  if (p.partials == nullptr) return;
  // Partial parameter gradients of this block: row groups combined in order 0, 1, ... through shared memory.
  const int64_t part_stride = static_cast<int64_t>(gridDim.x) * N;
  float* pw = p.partials + static_cast<int64_t>(blockIdx.x) * N;
  if constexpr (GROUPS == 1) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * kTpr;
      if (c < nvec) {
        store_f32<VEC>(pw + c * VEC, acc_w[it]);
        store_f32<VEC>(pw + part_stride + c * VEC, acc_b[it]);
        if constexpr (kGelu) store_f32<VEC>(pw + 2 * part_stride + c * VEC, acc_pb[it]);
      }
    }
  } else {
    constexpr int kArrays = kGelu ? 3 : 2;
    __shared__ float acc[kArrays][kTpr * E];
    for (int g = 0; g < GROUPS; ++g) {
      if (group == g) {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
          const int c = tid + it * kTpr;
          if (c < nvec) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const int col = c * VEC + j;
              acc[0][col] = (g == 0 ? 0.0f : acc[0][col]) + acc_w[it][j];
              acc[1][col] = (g == 0 ? 0.0f : acc[1][col]) + acc_b[it][j];
              if constexpr (kGelu) acc[kArrays - 1][col] = (g == 0 ? 0.0f : acc[kArrays - 1][col]) + acc_pb[it][j];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int col = threadIdx.x; col < N; col += blockDim.x) {
      pw[col] = acc[0][col];
      pw[part_stride + col] = acc[1][col];
      if constexpr (kGelu) pw[2 * part_stride + col] = acc[kArrays - 1][col];
    }
  }
}

// --------------------------------------------------------------------------------------------------------------
// Scalar kernels: any width, any alignment; one block per row, z recomputed in every pass.

template <LnOp OP, typename T, typename TW>
__global__ void __launch_bounds__(kLnGenericThreads, 4) ln_fwd_generic_kernel(const LnParams p) {
  constexpr int kWarps = kLnGenericThreads / 32;
  __shared__ float red[2][1][kWarps][1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int N = p.N;
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    float s[1] = {0.0f};
    for (int c = threadIdx.x; c < N; c += kLnGenericThreads) {
      float z, aux;
      ln_prologue<OP, T, TW, 1>(p, row, c, &z, &aux);
      s[0] += z;
    }
    group_sum<1, kWarps>(s, red[0], 0, warp, lane);
    const float mean = s[0] * inv_n;
    float sq[1] = {0.0f};
    for (int c = threadIdx.x; c < N; c += kLnGenericThreads) {
      float z, aux;
      ln_prologue<OP, T, TW, 1>(p, row, c, &z, &aux);
      sq[0] += (z - mean) * (z - mean);
    }
    group_sum<1, kWarps>(sq, red[1], 0, warp, lane);
    const float rstd = rsqrtf(sq[0] * inv_n + p.eps);
    for (int c = threadIdx.x; c < N; c += kLnGenericThreads) {
      float z, aux, w, b;
      ln_prologue<OP, T, TW, 1>(p, row, c, &z, &aux);
      load_param<1, TW>(p.weight, c, 1.0f, &w);
      load_param<1, TW>(p.bias, c, 0.0f, &b);
      static_cast<T*>(p.out)[row * N + c] = from_f32<T>(fmaf((z - mean) * rstd, w, b));
    }
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

// Partials accumulate in this block's own slice of the workspace (each column owned by one thread: no races).
template <LnOp OP, typename T, typename TW>
__global__ void __launch_bounds__(kLnGenericThreads, 4) ln_bwd_generic_kernel(const LnParams p) {
  constexpr int kWarps = kLnGenericThreads / 32;
  constexpr bool kGelu = OP == LnOp::kGelu;
  __shared__ float red[2][1][kWarps][2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int N = p.N;
  const float inv_n = 1.0f / static_cast<float>(N);
  const int64_t part_stride = static_cast<int64_t>(gridDim.x) * N;
  float* pw = p.partials == nullptr ? nullptr : p.partials + static_cast<int64_t>(blockIdx.x) * N;
  if (pw != nullptr) {
    for (int c = threadIdx.x; c < N; c += kLnGenericThreads) {
      pw[c] = 0.0f;
      pw[part_stride + c] = 0.0f;
      if constexpr (kGelu) pw[2 * part_stride + c] = 0.0f;
    }
  }
  int parity = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, parity ^= 1) {
    const float mean = p.mean_in[row], rstd = p.rstd_in[row];
    const T* dout = static_cast<const T*>(p.dout) + row * N;
    float s[2] = {0.0f, 0.0f};
    for (int c = threadIdx.x; c < N; c += kLnGenericThreads) {
      float z, aux, w;
      ln_prologue<OP, T, TW, 1>(p, row, c, &z, &aux);
      load_param<1, TW>(p.weight, c, 1.0f, &w);
      const float dy = to_f32(dout[c]), xh = (z - mean) * rstd, wd = dy * w;
      s[0] += wd;
      s[1] += wd * xh;
      if (pw != nullptr) {
        pw[c] = fmaf(dy, xh, pw[c]);
        pw[part_stride + c] += dy;
      }
    }
    group_sum<1, kWarps>(s, red[parity], 0, warp, lane);
    const float mean_wdy = s[0] * inv_n, mean_wdy_xhat = s[1] * inv_n;
    for (int c = threadIdx.x; c < N; c += kLnGenericThreads) {
      float z, aux, w, dxv;
      ln_prologue<OP, T, TW, 1>(p, row, c, &z, &aux);
      load_param<1, TW>(p.weight, c, 1.0f, &w);
      const float xh = (z - mean) * rstd, wd = to_f32(dout[c]) * w;
      const float dz = rstd * (wd - mean_wdy - xh * mean_wdy_xhat);
      ln_epilogue_bwd<OP, T, 1>(p, row, c, &dz, &aux, &dxv);
      if constexpr (kGelu) {
        if (pw != nullptr) pw[2 * part_stride + c] += dxv;
      }
    }
  }
}

// out_i[col] = sum over parts of partials[i][part][col], parts in order (per-thread strided sums, then the 16
// slices in order): deterministic. Grid (ceil(N / 32), 3); block (32, 16).
template <typename TW>
__global__ void __launch_bounds__(512, 2) ln_param_grad_kernel(const float* __restrict__ partials, int nparts, int N,
                                                            TW* d0, TW* d1, TW* d2) {
  __shared__ float slice_sums[16][33];
  const int which = blockIdx.y;
  TW* out = which == 0 ? d0 : (which == 1 ? d1 : d2);
  if (out == nullptr) return;
  const int col = blockIdx.x * 32 + threadIdx.x;
  const float* src = partials + static_cast<int64_t>(which) * nparts * N;
  float s = 0.0f;
  if (col < N) {
    for (int part = threadIdx.y; part < nparts; part += 16) s += src[static_cast<int64_t>(part) * N + col];
  }
  slice_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) total += slice_sums[i][threadIdx.x];
    out[col] = from_f32<TW>(total);
  }
}

// --------------------------------------------------------------------------------------------------------------
// Host side: config choice and launches. vec_ok: every pointer 16-byte aligned and N % Dtype<T>::kVec == 0.

inline size_t ln_bwd_workspace_bytes(int64_t rows, int64_t hidden) {
  const int64_t parts = rows < kLnBwdMaxParts ? rows : kLnBwdMaxParts;
  return static_cast<size_t>(3 * parts * hidden) * sizeof(float);
}

template <typename Kernel>
inline void launch_rows(Kernel kernel, int64_t blocks, int threads, const LnParams& p, cudaStream_t stream) {
  const int64_t grid = blocks < (1 << 20) ? blocks : (1 << 20);
  kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(p);
}

template <LnOp OP, typename T, typename TW>
inline void launch_ln_fwd(const LnParams& p, bool vec_ok, cudaStream_t stream) {
  constexpr int V = Dtype<T>::kVec;
  const int N = p.N;
  if (vec_ok && N <= 32 * 32) {
    launch_rows(ln_fwd_kernel<OP, T, TW, 4, 1, 32, V>, ceil_div(p.rows, 4), 128, p, stream);
  } else if (vec_ok && N <= 128 * 32) {
    launch_rows(ln_fwd_kernel<OP, T, TW, 1, 4, 32, V>, p.rows, 128, p, stream);
  } else if (vec_ok && N <= 512 * 32) {
    launch_rows(ln_fwd_kernel<OP, T, TW, 1, 16, 32, V>, p.rows, 512, p, stream);
  } else {
    launch_rows(ln_fwd_generic_kernel<OP, T, TW>, p.rows, kLnGenericThreads, p, stream);
  }
}

template <LnOp OP, typename T, typename TW, int GROUPS, int WPR, int E>
inline int64_t launch_ln_bwd_config(const LnParams& p, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(p.rows, GROUPS), kLnBwdMaxParts);
  ln_bwd_kernel<OP, T, TW, GROUPS, WPR, E, Dtype<T>::kVec>
      <<<static_cast<unsigned>(blocks), GROUPS * WPR * 32, 0, stream>>>(p);
  return blocks;
}

// d0, d1, d2: dweight, dbias, dpre_bias outputs (TW, nullable). p.partials must be null iff all three are null.
// The backward keeps 8 elements per thread (16 past 4096 columns): it holds xhat, w * dout and the prologue's aux
// plus two or three gradient accumulators per element, so the row is spread over more threads than the forward's.
template <LnOp OP, typename T, typename TW>
inline void launch_ln_bwd(const LnParams& p, bool vec_ok, void* d0, void* d1, void* d2, cudaStream_t stream) {
  const int N = p.N;
  int64_t blocks;
  if (vec_ok && N <= 32 * 8) {
    blocks = launch_ln_bwd_config<OP, T, TW, 4, 1, 8>(p, stream);
  } else if (vec_ok && N <= 64 * 8) {
    blocks = launch_ln_bwd_config<OP, T, TW, 2, 2, 8>(p, stream);
  } else if (vec_ok && N <= 128 * 8) {
    blocks = launch_ln_bwd_config<OP, T, TW, 1, 4, 8>(p, stream);
  } else if (vec_ok && N <= 256 * 8) {
    blocks = launch_ln_bwd_config<OP, T, TW, 1, 8, 8>(p, stream);
  } else if (vec_ok && N <= 512 * 8) {
    blocks = launch_ln_bwd_config<OP, T, TW, 1, 16, 8>(p, stream);
  } else if (vec_ok && N <= 512 * 16) {
    blocks = launch_ln_bwd_config<OP, T, TW, 1, 16, 16>(p, stream);
  } else {
    blocks = std::min<int64_t>(p.rows, kLnBwdMaxParts);
    ln_bwd_generic_kernel<OP, T, TW><<<static_cast<unsigned>(blocks), kLnGenericThreads, 0, stream>>>(p);
  }
  if (p.partials != nullptr) {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, 32)), 3);
    ln_param_grad_kernel<TW><<<grid, dim3(32, 16), 0, stream>>>(p.partials, static_cast<int>(blocks), N,
                                                                 static_cast<TW*>(d0), static_cast<TW*>(d1),
                                                                 static_cast<TW*>(d2));
  }
}

}  // namespace cuda
}  // namespace fastbert
