// add_layer_norm: out = LayerNorm(dropout(x) + residual), forward and backward. Kernels: layer_norm.cuh (LnOp::kAdd).
#include "layer_norm.cuh"

namespace fastbert {
namespace cuda {
namespace {

bool rows_args_ok(int64_t rows, int64_t hidden) {
  return rows >= 0 && hidden >= 1 && hidden <= (int64_t{1} << 30);
}

}  // namespace
}  // namespace cuda
}  // namespace fastbert

using namespace fastbert::cuda;

extern "C" cudaError_t fastbert_add_layer_norm_fwd(void* out, float* mean, float* rstd, const void* x,
                                                   const void* residual, const void* weight, const void* bias,
                                                   int64_t rows, int64_t hidden, float eps, float dropout_p,
                                                   uint64_t seed, FastbertDType dtype, FastbertDType param_dtype,
                                                   cudaStream_t stream) {
  if (!rows_args_ok(rows, hidden) || !valid_dropout_p(dropout_p) || !(eps >= 0.0f)) return cudaErrorInvalidValue;
  if (!valid_dtype(dtype) || !valid_param_dtype(dtype, param_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (out == nullptr || mean == nullptr || rstd == nullptr || x == nullptr) return cudaErrorInvalidValue;
  LnParams p{};
  p.out = out;
  p.mean = mean;
  p.rstd = rstd;
  p.x = x;
  p.residual = residual;
  p.weight = weight;
  p.bias = bias;
  p.rows = rows;
  p.N = static_cast<int>(hidden);
  p.eps = eps;
  p.dropout = dropout_p > 0.0f;
  p.keep_scale = p.dropout ? 1.0f / (1.0f - dropout_p) : 1.0f;
  p.thr16 = dropout_threshold16(dropout_p);
  p.seed = seed;
  const bool vec_ok = aligned_all({out, x, residual, weight, bias});
  dispatch_act_param(dtype, param_dtype, [&](auto t, auto tw) {
    using T = decltype(t);
    using TW = decltype(tw);
    launch_ln_fwd<LnOp::kAdd, T, TW>(p, vec_ok && hidden % Dtype<T>::kVec == 0, stream);
  });
  return cudaGetLastError();
}

extern "C" size_t fastbert_layer_norm_bwd_workspace_size(int64_t rows, int64_t hidden) {
  if (rows <= 0 || hidden <= 0) return 0;
  return ln_bwd_workspace_bytes(rows, hidden);
}

extern "C" cudaError_t fastbert_add_layer_norm_bwd(void* dx, void* dresidual, void* dweight, void* dbias,
                                                   const void* dout, const void* x, const void* residual,
                                                   const void* weight, const float* mean, const float* rstd,
                                                   int64_t rows, int64_t hidden, float dropout_p, uint64_t seed,
                                                   void* workspace, size_t workspace_bytes, FastbertDType dtype,
                                                   FastbertDType param_dtype, cudaStream_t stream) {
  if (!rows_args_ok(rows, hidden) || !valid_dropout_p(dropout_p)) return cudaErrorInvalidValue;
  if (!valid_dtype(dtype) || !valid_param_dtype(dtype, param_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (dx == nullptr || dout == nullptr || x == nullptr || mean == nullptr || rstd == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool want_params = dweight != nullptr || dbias != nullptr;
  if (want_params && (workspace == nullptr || !is_aligned16(workspace) ||
                      workspace_bytes < ln_bwd_workspace_bytes(rows, hidden))) {
    return cudaErrorInvalidValue;
  }
  LnParams p{};
  p.x = x;
  p.residual = residual;
  p.weight = weight;
  p.dout = dout;
  p.dx = dx;
  p.dresidual = dresidual;
  p.mean_in = mean;
  p.rstd_in = rstd;
  p.partials = want_params ? static_cast<float*>(workspace) : nullptr;
  p.rows = rows;
  p.N = static_cast<int>(hidden);
  p.dropout = dropout_p > 0.0f;
  p.keep_scale = p.dropout ? 1.0f / (1.0f - dropout_p) : 1.0f;
  p.thr16 = dropout_threshold16(dropout_p);
  p.seed = seed;
  const bool vec_ok = aligned_all({dx, dresidual, dout, x, residual, weight});
  dispatch_act_param(dtype, param_dtype, [&](auto t, auto tw) {
    using T = decltype(t);
    using TW = decltype(tw);
    launch_ln_bwd<LnOp::kAdd, T, TW>(p, vec_ok && hidden % Dtype<T>::kVec == 0, dweight, dbias, nullptr, stream);
  });
  return cudaGetLastError();
}
