// fastbert CUDA kernels: the plain launchers (pointers, sizes, cudaStream_t) that the torch binding calls.
//
// Self-contained C++17 (also valid C): it includes only <stddef.h>, <stdint.h> and the CUDA runtime API header,
// never torch. The implementations live in csrc/cuda/*.cu and are compiled by nvcc alone.
//
// Conventions shared by every launcher
// - Returns cudaSuccess, cudaErrorInvalidValue (bad argument, nothing launched), or the launch error from
//   cudaGetLastError(). Nothing is allocated and nothing synchronizes: the kernels run on `stream`.
// - "T" is the activation dtype given by `dtype`; "TW" is `param_dtype`, the dtype of the per-feature parameters
//   (weight, bias, ...), which must be either T or FASTBERT_FLOAT32 (fp32 LayerNorm parameters under bf16/fp16
//   autocast). All parameter pointers of one call share TW, and parameter gradients are written in TW.
// - Statistics (mean, rstd, lse) are fp32; all arithmetic is fp32 whatever T is.
// - Row-major "(rows, hidden)" tensors are contiguous: element (r, c) at r * hidden + c. The binding flattens
//   the leading dimensions of (..., hidden) into rows and makes tensors contiguous first.
// - Sizes of zero are valid and launch nothing (rows == 0) or write the empty-sum result (seqlen_k == 0).
// - 16-byte vector loads are used when every pointer of the call is 16-byte aligned and the row width is a
//   multiple of 8 (fp16/bf16) or 4 (fp32) elements; otherwise a scalar kernel runs (same results, slower).
// - Dropout is counter-based (Philox4x32-10, key = seed): keep iff a 16-bit random number u16 >= thr16 with
//   thr16 = round(dropout_p * 65536) (clamped to 65535); kept values are multiplied by 1 / (1 - dropout_p).
//   The backward regenerates the mask from the same seed. Element -> counter mappings (see common.cuh):
//     rows (add_layer_norm): counter {col >> 3, lo32(row), hi32(row), 0x524F5753}, u16 lane col & 7;
//     attention (b, h, q, k), bh = b * nheads + h, ql = q & 15, kl = k & 15:
//       counter {(k >> 4) << 5 | (ql & 1) << 4 | ((ql & 7) >> 1) << 2 | ((kl & 7) >> 1), q >> 4, bh, 0x4154544E},
//       u16 lane (ql >> 3) * 4 + (kl >> 3) * 2 + (kl & 1);
//   the u16 lane s of a Philox output {w0, w1, w2, w3} is (w[s / 2] >> (16 * (s % 2))) & 0xffff.
//   The mask therefore depends only on (seed, position), never on dtype, layout or launch configuration.
//   Varlen attention uses the attention mapping with b = the sequence index and positions within the sequence.
#ifndef FASTBERT_CSRC_CUDA_LAUNCHERS_H_
#define FASTBERT_CSRC_CUDA_LAUNCHERS_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum FastbertDType {
  FASTBERT_FLOAT32 = 0,
  FASTBERT_FLOAT16 = 1,
  FASTBERT_BFLOAT16 = 2,
} FastbertDType;

// GELU flavour: exact erf (BERT's "gelu") or the tanh approximation (gelu_new, gelu_pytorch_tanh).
typedef enum FastbertGelu {
  FASTBERT_GELU_ERF = 0,
  FASTBERT_GELU_TANH = 1,
} FastbertGelu;

// Element strides (not bytes) of a (batch, seqlen, nheads, headdim) tensor; the headdim stride must be 1.
typedef struct FastbertStrides {
  int64_t batch;
  int64_t seq;
  int64_t head;
} FastbertStrides;

// ==============================================================================================================
// add_layer_norm: out = LayerNorm(dropout(x) + residual) over the last dimension, with z = dropout(x) + residual,
// mean = mean(z), rstd = 1 / sqrt(var(z) + eps) (biased variance), out = (z - mean) * rstd * weight + bias.

// out:      (rows, hidden) T, written.
// mean:     (rows,) fp32, written.            rstd: (rows,) fp32, written.
// x:        (rows, hidden) T.                 residual: (rows, hidden) T, or NULL (no residual).
// weight:   (hidden,) TW, or NULL (ones).     bias: (hidden,) TW, or NULL (zeros).
// hidden:   1 .. 2^30. The row stays in registers up to 16384 columns in the forward and 8192 in the backward
//           (one warp per row up to 1024 / 256 columns, one block per row beyond); wider rows, widths that are not
//           a multiple of the 16-byte vector, and misaligned pointers take scalar kernels (z recomputed per pass).
// dropout_p in [0, 1) on x (0 disables it; seed is then ignored); rows mapping of the dropout mask above.
cudaError_t fastbert_add_layer_norm_fwd(void* out, float* mean, float* rstd, const void* x, const void* residual,
                                        const void* weight, const void* bias, int64_t rows, int64_t hidden, float eps,
                                        float dropout_p, uint64_t seed, FastbertDType dtype,
                                        FastbertDType param_dtype, cudaStream_t stream);

// Bytes of scratch the two LayerNorm backward launchers need (fp32 per-block partial sums of the parameter
// gradients, reduced by a second kernel in a fixed order: deterministic, no atomics). Depends only on the sizes.
size_t fastbert_layer_norm_bwd_workspace_size(int64_t rows, int64_t hidden);

// dx:        (rows, hidden) T, written: dz * dropout mask / (1 - p), with dz = dL/dz.
// dresidual: (rows, hidden) T, written with dz, or NULL (not wanted; e.g. no residual).
// dweight:   (hidden,) TW, written, or NULL.     dbias: (hidden,) TW, written, or NULL.
// dout:      (rows, hidden) T.    x, residual, weight: as in the forward (residual, weight nullable).
// mean, rstd: (rows,) fp32 from the forward.     dropout_p, seed: as in the forward.
// workspace: device scratch of at least fastbert_layer_norm_bwd_workspace_size(rows, hidden) bytes, 16-byte
//            aligned, contents ignored (may be NULL when dweight and dbias are both NULL).
cudaError_t fastbert_add_layer_norm_bwd(void* dx, void* dresidual, void* dweight, void* dbias, const void* dout,
                                        const void* x, const void* residual, const void* weight, const float* mean,
                                        const float* rstd, int64_t rows, int64_t hidden, float dropout_p,
                                        uint64_t seed, void* workspace, size_t workspace_bytes, FastbertDType dtype,
                                        FastbertDType param_dtype, cudaStream_t stream);

// ==============================================================================================================
// bias_gelu: out = gelu(x + bias), elementwise with the bias broadcast over rows (the FFN activation).

// out: (rows, hidden) T, written (may alias x).   x: (rows, hidden) T.   bias: (hidden,) TW, or NULL.
cudaError_t fastbert_bias_gelu_fwd(void* out, const void* x, const void* bias, int64_t rows, int64_t hidden,
                                   FastbertGelu approximate, FastbertDType dtype, FastbertDType param_dtype,
                                   cudaStream_t stream);

// dx: (rows, hidden) T, written = dout * gelu'(x + bias) (may alias dout). dbias is dx summed over rows: the
// binding computes it (a column sum) when bias requires grad.
cudaError_t fastbert_bias_gelu_bwd(void* dx, const void* dout, const void* x, const void* bias, int64_t rows,
                                   int64_t hidden, FastbertGelu approximate, FastbertDType dtype,
                                   FastbertDType param_dtype, cudaStream_t stream);

// bias_gelu_layer_norm: out = LayerNorm(gelu(x + bias)) (BERT's MLM head transform); mean/rstd of gelu(x + bias).
// out: (rows, hidden) T.  mean, rstd: (rows,) fp32.  x: (rows, hidden) T.
// bias: (hidden,) TW or NULL (the dense bias before GELU).  weight: (hidden,) TW or NULL.  ln_bias: (hidden,) TW
// or NULL.  hidden: as in add_layer_norm.
cudaError_t fastbert_bias_gelu_layer_norm_fwd(void* out, float* mean, float* rstd, const void* x, const void* bias,
                                              const void* weight, const void* ln_bias, int64_t rows, int64_t hidden,
                                              float eps, FastbertGelu approximate, FastbertDType dtype,
                                              FastbertDType param_dtype, cudaStream_t stream);

// dx: (rows, hidden) T, written.  dbias: (hidden,) TW = dx summed over rows, written, or NULL.
// dweight, dln_bias: (hidden,) TW, written, or NULL.  dout, x: (rows, hidden) T.  bias, weight: as in the forward.
// mean, rstd: (rows,) fp32 from the forward.  workspace: as in fastbert_add_layer_norm_bwd (NULL allowed when
// dbias, dweight and dln_bias are all NULL).
cudaError_t fastbert_bias_gelu_layer_norm_bwd(void* dx, void* dbias, void* dweight, void* dln_bias, const void* dout,
                                              const void* x, const void* bias, const void* weight, const float* mean,
                                              const float* rstd, int64_t rows, int64_t hidden,
                                              FastbertGelu approximate, void* workspace, size_t workspace_bytes,
                                              FastbertDType dtype, FastbertDType param_dtype, cudaStream_t stream);

// ==============================================================================================================
// softmax over attention scores: probs = softmax(scale * scores) over the keys with padded keys excluded (they get
// exactly 0), computed in fp32 with the row max subtracted. A row with no real key is all zeros (never NaN).

// probs:  (batch, nheads, seqlen_q, seqlen_k) T, contiguous, written (may alias scores).
// scores: (batch, nheads, seqlen_q, seqlen_k) T, contiguous.
// key_padding_mask: uint8/bool (batch, seqlen_k), nonzero = real token, element (b, k) at
//                   b * mask_stride_b + k; or NULL (every key real).
// seqlen_k: any (rows up to 8192 keys stay in registers; longer rows take a chunked three-pass kernel).
cudaError_t fastbert_softmax_fwd(void* probs, const void* scores, const uint8_t* key_padding_mask,
                                 int64_t mask_stride_b, int64_t batch, int64_t nheads, int64_t seqlen_q,
                                 int64_t seqlen_k, float scale, FastbertDType dtype, cudaStream_t stream);

// dscores = scale * probs * (dprobs - sum_k(dprobs * probs)), per row.
// dscores, dprobs, probs: (rows, seqlen_k) T contiguous, rows = batch * nheads * seqlen_q (dscores may alias dprobs).
cudaError_t fastbert_softmax_bwd(void* dscores, const void* dprobs, const void* probs, int64_t rows, int64_t seqlen_k,
                                 float scale, FastbertDType dtype, cudaStream_t stream);

// ==============================================================================================================
// attention: out = dropout(softmax(scale * q k^T, padded keys excluded)) v, bidirectional, FlashAttention-2 style
// (the (seqlen_q, seqlen_k) matrix never reaches global memory). fp16/bf16 run on tensor cores (mma.sync
// m16n8k16, fp32 accumulation); fp32 runs a SIMT kernel with fp32 FMAs (no TF32), so fp32 stays within ~1e-6.

// Whether the attention launchers accept this head dim and dtype: 8 <= headdim <= 128 and headdim % 8 == 0
// (dims that are not 16, 32, 64 or 128 run the next larger kernel with zero padding). 1 = yes, 0 = no.
int fastbert_attention_supported(int64_t headdim, FastbertDType dtype);

// out: (batch, seqlen_q, nheads, headdim) T, written, strides out_strides. Rows whose keys are all padding are 0.
// lse: (batch, nheads, seqlen_q) fp32 contiguous, written: log-sum-exp of the scaled, masked scores of each row,
//      -inf for a row whose keys are all padding. (Unaffected by dropout.)
// q: (batch, seqlen_q, nheads, headdim) T; k, v: (batch, seqlen_k, nheads, headdim) T; strides as given.
// key_padding_mask: uint8/bool (batch, seqlen_k), nonzero = real key, at b * mask_stride_b + k; or NULL.
// scale: multiplies q k^T (typically 1/sqrt(headdim)).  dropout_p in [0, 1) on the probabilities, attention mapping.
// Sizes: batch * nheads < 2^31, seqlen_q, seqlen_k < 2^31.
cudaError_t fastbert_attention_fwd(void* out, float* lse, const void* q, const void* k, const void* v,
                                   const uint8_t* key_padding_mask, int64_t batch, int64_t seqlen_q,
                                   int64_t seqlen_k, int64_t nheads, int64_t headdim, FastbertStrides q_strides,
                                   FastbertStrides k_strides, FastbertStrides v_strides, FastbertStrides out_strides,
                                   int64_t mask_stride_b, float scale, float dropout_p, uint64_t seed,
                                   FastbertDType dtype, cudaStream_t stream);

// Bytes of scratch for fastbert_attention_bwd: delta = rowsum(dout * out), fp32 (batch, nheads, seqlen_q).
size_t fastbert_attention_bwd_workspace_size(int64_t batch, int64_t nheads, int64_t seqlen_q);

// Gradients of fastbert_attention_fwd: three kernels, no atomics (deterministic): delta = rowsum(dout * out);
// dK/dV (one block per key tile, looping over query tiles); dQ (one block per query tile, looping over key tiles).
// dq: (batch, seqlen_q, nheads, headdim) T written;  dk, dv: (batch, seqlen_k, nheads, headdim) T written.
// dout, out: (batch, seqlen_q, nheads, headdim) T.  q, k, v, key_padding_mask, scale, dropout_p, seed: as in the
// forward (same seed: the mask is regenerated).  lse: (batch, nheads, seqlen_q) fp32 from the forward.
// workspace: >= fastbert_attention_bwd_workspace_size(...) bytes of device scratch, 16-byte aligned.
// seqlen_q == 0 or seqlen_k == 0: the other side's gradients are written as zeros; the empty side's pointers (and
// the workspace, when seqlen_q == 0) may be NULL.
cudaError_t fastbert_attention_bwd(void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k,
                                   const void* v, const void* out, const float* lse, const uint8_t* key_padding_mask,
                                   int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t headdim,
                                   FastbertStrides q_strides, FastbertStrides k_strides, FastbertStrides v_strides,
                                   FastbertStrides out_strides, FastbertStrides dout_strides,
                                   FastbertStrides dq_strides, FastbertStrides dk_strides, FastbertStrides dv_strides,
                                   int64_t mask_stride_b, float scale, float dropout_p, uint64_t seed,
                                   void* workspace, size_t workspace_bytes, FastbertDType dtype, cudaStream_t stream);

// ==============================================================================================================
// varlen attention: `batch` sequences packed back to back along the token dimension (no padding, no mask), sequence
// i at tokens cu_seqlens[i] .. cu_seqlens[i + 1], each attending (bidirectionally) to its own tokens only. The same
// kernels as fastbert_attention_* in their packed mode: a block reads its sequence's start and length from
// cu_seqlens, and a block whose tile lies past its sequence's end (the grid is sized by max_seqlen) exits at once.

// out: (total, nheads, headdim) T, written.  lse: (nheads, total) fp32 contiguous, written (-inf never occurs: a
// sequence has at least one token to attend to, and empty sequences have no rows).
// q, k, v: (total, nheads, headdim) T. Strides: .seq = the token stride, .head = the head stride; .batch is ignored.
// cu_seqlens: (batch + 1,) int32 device offsets: cu_seqlens[0] = 0, non-decreasing, cu_seqlens[batch] = total, and
//             every length <= max_seqlen. Not checked on the device (the caller validates): rows of a sequence
//             longer than max_seqlen past max_seqlen are left unwritten.
// max_seqlen: the longest sequence (or any upper bound; it only sizes the grid).  total < 2^31.
// Dropout: the attention mapping with b = the sequence index and q, k = positions within the sequence, i.e. the mask
// fastbert_attention_fwd draws for the same sequences padded into a batch with the same seed.
cudaError_t fastbert_varlen_attention_fwd(void* out, float* lse, const void* q, const void* k, const void* v,
                                          const int32_t* cu_seqlens, int64_t batch, int64_t max_seqlen, int64_t total,
                                          int64_t nheads, int64_t headdim, FastbertStrides q_strides,
                                          FastbertStrides k_strides, FastbertStrides v_strides,
                                          FastbertStrides out_strides, float scale, float dropout_p, uint64_t seed,
                                          FastbertDType dtype, cudaStream_t stream);

// Gradients of fastbert_varlen_attention_fwd (same three deterministic kernels as fastbert_attention_bwd).
// dq, dk, dv: (total, nheads, headdim) T, written (every row).  dout, out: (total, nheads, headdim) T.
// lse: (nheads, total) fp32 from the forward.  Other arguments as in the forward (same seed: same mask).
// workspace: >= fastbert_attention_bwd_workspace_size(1, nheads, total) bytes of device scratch, 16-byte aligned.
cudaError_t fastbert_varlen_attention_bwd(void* dq, void* dk, void* dv, const void* dout, const void* q,
                                          const void* k, const void* v, const void* out, const float* lse,
                                          const int32_t* cu_seqlens, int64_t batch, int64_t max_seqlen, int64_t total,
                                          int64_t nheads, int64_t headdim, FastbertStrides q_strides,
                                          FastbertStrides k_strides, FastbertStrides v_strides,
                                          FastbertStrides out_strides, FastbertStrides dout_strides,
                                          FastbertStrides dq_strides, FastbertStrides dk_strides,
                                          FastbertStrides dv_strides, float scale, float dropout_p, uint64_t seed,
                                          void* workspace, size_t workspace_bytes, FastbertDType dtype,
                                          cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // FASTBERT_CSRC_CUDA_LAUNCHERS_H_
