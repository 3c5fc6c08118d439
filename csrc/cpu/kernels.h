// The CPU kernels of the cpp backend, as plain functions of pointers and sizes.
//
// csrc/fastbert.cpp (the only translation unit that includes torch headers) checks arguments, allocates the
// outputs and calls these; the kernel files include only ATen's Parallel and vec headers, which keeps the first
// build short. Conventions shared by every kernel:
//
// - Activations (x, residual, dout, scores, ...) are contiguous row-major (rows, n) arrays of `dtype`; outputs of
//   the same shape are written in the same dtype. Everything in between is fp32.
// - Per-feature parameters (LayerNorm weight and bias, the GELU bias) arrive as fp32 arrays of n values: the binding
//   upcasts them (they are tiny), so any float parameter dtype works with any activation dtype. A missing bias is
//   passed as an array of zeros, never as nullptr.
// - Parameter gradients are written as fp32 arrays of n values; the binding casts them to the parameter's dtype.
//   They are summed over fixed row blocks and the blocks then added in order, so they are bitwise identical from
//   run to run and at any thread count.
// - LayerNorm statistics (mean, rstd) are fp32 arrays of `rows` values.
#pragma once

#include <cstdint>

namespace fastbert::cpu {

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out = LayerNorm(dropout(x) + residual). residual may be nullptr. The dropout mask comes from a counter-based
// hash of (seed, row, column) (see dropout.h): the backward regenerates it from the same seed.
void add_layer_norm_fwd(Dtype dtype, const void* x, const void* residual, const float* weight, const float* bias,
                        void* out, float* mean, float* rstd, int64_t rows, int64_t n, float eps, float dropout_p,
                        uint64_t seed);

// dx = dz * mask and dresidual = dz (dresidual may be nullptr); dweight, dbias: fp32 (n,).
void add_layer_norm_bwd(Dtype dtype, const void* dout, const void* x, const void* residual, const float* weight,
                        const float* mean, const float* rstd, void* dx, void* dresidual, float* dweight, float* dbias,
                        int64_t rows, int64_t n, float dropout_p, uint64_t seed);

// out = gelu(x + bias), exact erf GELU or (tanh_approx) the tanh approximation.
void bias_gelu_fwd(Dtype dtype, const void* x, const float* bias, void* out, int64_t rows, int64_t n,
                   bool tanh_approx);

// dx = dout * gelu'(x + bias); unless dbias is nullptr, also the bias gradient, fp32 (n,): dx summed over rows.
void bias_gelu_bwd(Dtype dtype, const void* dout, const void* x, const float* bias, void* dx, float* dbias,
                   int64_t rows, int64_t n, bool tanh_approx);

// out = LayerNorm(gelu(x + bias)); gelu(x + bias) stays in fp32 between the two (never rounded to dtype).
void bias_gelu_layer_norm_fwd(Dtype dtype, const void* x, const float* bias, const float* weight,
                              const float* ln_bias, void* out, float* mean, float* rstd, int64_t rows, int64_t n,
                              float eps, bool tanh_approx);

// dx, and fp32 dweight / dln_bias (n,); unless dbias is nullptr, also the GELU bias's gradient (dx summed over rows).
void bias_gelu_layer_norm_bwd(Dtype dtype, const void* dout, const void* x, const float* bias, const float* weight,
                              const float* mean, const float* rstd, void* dx, float* dweight, float* dln_bias,
                              float* dbias, int64_t rows, int64_t n, bool tanh_approx);

// probs = softmax(scores * scale) over rows of n keys. scores: (batch, rows_per_batch, n); key_mask: (batch, n)
// bytes, nonzero for real keys, or nullptr. Padded keys get exactly 0; a row without a real key is all zeros.
void softmax_fwd(Dtype dtype, const void* scores, const uint8_t* key_mask, void* probs, int64_t batch,
                 int64_t rows_per_batch, int64_t n, float scale);

// dscores = probs * (dprobs - sum(dprobs * probs)) * scale, per row.
void softmax_bwd(Dtype dtype, const void* dprobs, const void* probs, void* dscores, int64_t rows, int64_t n,
                 float scale);

}  // namespace fastbert::cpu
