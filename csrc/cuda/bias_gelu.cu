// bias_gelu: out = gelu(x + bias) (elementwise, bias broadcast over rows) and its backward; bias_gelu_layer_norm:
// out = LayerNorm(gelu(x + bias)) through the LayerNorm row engine (layer_norm.cuh, LnOp::kGelu).
//
// The elementwise kernels are memory bound with a compute-heavy body (erff is ~20 instructions), so each thread
// handles a 16-byte vector per step and walks (row, column) incrementally: no 64-bit division in the loop.
#include "layer_norm.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kEltThreads = 256;

// kBwd = false: out = gelu(x + bias). kBwd = true: out = dout * gelu'(x + bias).
template <typename T, typename TW, int VEC, bool kBwd>
__global__ void __launch_bounds__(kEltThreads, 4) bias_gelu_kernel(T* out, const T* dout, const T* x,
                                                                const TW* __restrict__ bias,
                                                                int64_t rows, int N, int approximate) {
  const int64_t nvec_row = N / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kEltThreads;
  const int64_t stride_rows = stride / nvec_row, stride_cols = stride % nvec_row;
  int64_t row = first / nvec_row, c = first % nvec_row;
  while (row < rows) {
    const int64_t off = row * N + c * VEC;
    float u[VEC], y[VEC];
    load_f32<VEC>(x + off, u);
    if (bias != nullptr) {
      float b[VEC];
      load_f32<VEC>(bias + c * VEC, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) u[j] += b[j];
    }
    if constexpr (kBwd) {
      float dy[VEC];
      load_f32<VEC>(dout + off, dy);
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[j] = dy[j] * gelu_grad_f(u[j], approximate);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[j] = gelu_f(u[j], approximate);
    }
    store_f32<VEC>(out + off, y);
    c += stride_cols;
    row += stride_rows;
    if (c >= nvec_row) {
      c -= nvec_row;
      ++row;
    }
  }
}

template <typename T, typename TW, bool kBwd>
void launch_bias_gelu(void* out, const void* dout, const void* x, const void* bias, int64_t rows, int N,
                      int approximate, bool vec_ok, cudaStream_t stream) {
  constexpr int V = Dtype<T>::kVec;
  const bool vec = vec_ok && N % V == 0;
  const int64_t work = rows * (vec ? N / V : N);
  const int64_t blocks = std::min<int64_t>(ceil_div(work, kEltThreads), int64_t{1} << 20);
  auto* o = static_cast<T*>(out);
  auto* dy = static_cast<const T*>(dout);
  auto* xi = static_cast<const T*>(x);
  auto* b = static_cast<const TW*>(bias);
  if (vec) {
    bias_gelu_kernel<T, TW, V, kBwd><<<static_cast<unsigned>(blocks), kEltThreads, 0, stream>>>(o, dy, xi, b, rows, N,
                                                                                                 approximate);
  } else {
    bias_gelu_kernel<T, TW, 1, kBwd><<<static_cast<unsigned>(blocks), kEltThreads, 0, stream>>>(o, dy, xi, b, rows, N,
                                                                                                 approximate);
  }
}

bool gelu_args_ok(int64_t rows, int64_t hidden, FastbertGelu approximate, FastbertDType dtype,
                  FastbertDType param_dtype) {
  return rows >= 0 && hidden >= 1 && hidden <= (int64_t{1} << 30) &&
         (approximate == FASTBERT_GELU_ERF || approximate == FASTBERT_GELU_TANH) && valid_dtype(dtype) &&
         valid_param_dtype(dtype, param_dtype);
}

}  // namespace
}  // namespace cuda
}  // namespace fastbert

using namespace fastbert::cuda;

extern "C" cudaError_t fastbert_bias_gelu_fwd(void* out, const void* x, const void* bias, int64_t rows,
                                              int64_t hidden, FastbertGelu approximate, FastbertDType dtype,
                                              FastbertDType param_dtype, cudaStream_t stream) {
  if (!gelu_args_ok(rows, hidden, approximate, dtype, param_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (out == nullptr || x == nullptr) return cudaErrorInvalidValue;
  const bool vec_ok = aligned_all({out, x, bias});
  dispatch_act_param(dtype, param_dtype, [&](auto t, auto tw) {
    launch_bias_gelu<decltype(t), decltype(tw), false>(out, nullptr, x, bias, rows, static_cast<int>(hidden),
                                                       approximate, vec_ok, stream);
  });
  return cudaGetLastError();
}

extern "C" cudaError_t fastbert_bias_gelu_bwd(void* dx, const void* dout, const void* x, const void* bias,
                                              int64_t rows, int64_t hidden, FastbertGelu approximate,
                                              FastbertDType dtype, FastbertDType param_dtype, cudaStream_t stream) {
  if (!gelu_args_ok(rows, hidden, approximate, dtype, param_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (dx == nullptr || dout == nullptr || x == nullptr) return cudaErrorInvalidValue;
  const bool vec_ok = aligned_all({dx, dout, x, bias});
  dispatch_act_param(dtype, param_dtype, [&](auto t, auto tw) {
    launch_bias_gelu<decltype(t), decltype(tw), true>(dx, dout, x, bias, rows, static_cast<int>(hidden), approximate,
                                                      vec_ok, stream);
  });
  return cudaGetLastError();
}

extern "C" cudaError_t fastbert_bias_gelu_layer_norm_fwd(void* out, float* mean, float* rstd, const void* x,
                                                         const void* bias, const void* weight, const void* ln_bias,
                                                         int64_t rows, int64_t hidden, float eps,
                                                         FastbertGelu approximate, FastbertDType dtype,
                                                         FastbertDType param_dtype, cudaStream_t stream) {
  if (!gelu_args_ok(rows, hidden, approximate, dtype, param_dtype) || !(eps >= 0.0f)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (out == nullptr || mean == nullptr || rstd == nullptr || x == nullptr) return cudaErrorInvalidValue;
  LnParams p{};
  p.out = out;
  p.mean = mean;
  p.rstd = rstd;
  p.x = x;
  p.pre_bias = bias;
  p.weight = weight;
  p.bias = ln_bias;
  p.rows = rows;
  p.N = static_cast<int>(hidden);
  p.eps = eps;
  p.approximate = approximate;
  const bool vec_ok = aligned_all({out, x, bias, weight, ln_bias});
  dispatch_act_param(dtype, param_dtype, [&](auto t, auto tw) {
    using T = decltype(t);
    launch_ln_fwd<LnOp::kGelu, T, decltype(tw)>(p, vec_ok && hidden % Dtype<T>::kVec == 0, stream);
  });
  return cudaGetLastError();
}

extern "C" cudaError_t fastbert_bias_gelu_layer_norm_bwd(void* dx, void* dbias, void* dweight, void* dln_bias,
                                                         const void* dout, const void* x, const void* bias,
                                                         const void* weight, const float* mean, const float* rstd,
                                                         int64_t rows, int64_t hidden, FastbertGelu approximate,
                                                         void* workspace, size_t workspace_bytes, FastbertDType dtype,
                                                         FastbertDType param_dtype, cudaStream_t stream) {
  if (!gelu_args_ok(rows, hidden, approximate, dtype, param_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (dx == nullptr || dout == nullptr || x == nullptr || mean == nullptr || rstd == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool want_params = dbias != nullptr || dweight != nullptr || dln_bias != nullptr;
  if (want_params && (workspace == nullptr || !is_aligned16(workspace) ||
                      workspace_bytes < ln_bwd_workspace_bytes(rows, hidden))) {
    return cudaErrorInvalidValue;
  }
  LnParams p{};
  p.x = x;
  p.pre_bias = bias;
  p.weight = weight;
  p.dout = dout;
  p.dx = dx;
  p.mean_in = mean;
  p.rstd_in = rstd;
  p.partials = want_params ? static_cast<float*>(workspace) : nullptr;
  p.rows = rows;
  p.N = static_cast<int>(hidden);
  p.approximate = approximate;
  const bool vec_ok = aligned_all({dx, dout, x, bias, weight});
  dispatch_act_param(dtype, param_dtype, [&](auto t, auto tw) {
    using T = decltype(t);
    // partial arrays: 0 = dweight (LayerNorm weight), 1 = dln_bias, 2 = dbias (the pre-GELU bias)
    launch_ln_bwd<LnOp::kGelu, T, decltype(tw)>(p, vec_ok && hidden % Dtype<T>::kVec == 0, dweight, dln_bias, dbias,
                                                stream);
  });
  return cudaGetLastError();
}
