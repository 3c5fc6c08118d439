// The C API of the fused attention kernels (launchers.h): argument checks and the parameter block, padded
// (fastbert_attention_*) and packed variable-length (fastbert_varlen_attention_*). Host code only: the kernels and
// their per-dtype / per-head-dim dispatch live in attention_fwd.cu, attention_bwd.cu and attention_simt.cu.
#include "attention.cuh"

namespace fastbert {
namespace cuda {
namespace {

bool common_args_ok(int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t headdim, float scale,
                    float dropout_p, FastbertDType dtype) {
  if (!valid_dtype(dtype) || fastbert_attention_supported(headdim, dtype) == 0) return false;
  if (batch < 0 || nheads < 0 || seqlen_q < 0 || seqlen_k < 0) return false;
  if (seqlen_q >= INT32_MAX || seqlen_k >= INT32_MAX || batch * nheads >= INT32_MAX) return false;
  return std::isfinite(scale) && valid_dropout_p(dropout_p);
}

// Varlen sizes: the grid holds ceil(max_seqlen / 64) * batch * nheads blocks, token offsets are int32 (cu_seqlens)
// and lse / delta rows h * total + t must fit the kernels' int64 index math (total < 2^31 keeps it far away).
bool varlen_args_ok(const int32_t* cu_seqlens, int64_t batch, int64_t max_seqlen, int64_t total, int64_t nheads,
                    int64_t headdim, float scale, float dropout_p, FastbertDType dtype) {
  if (!common_args_ok(batch, max_seqlen, max_seqlen, nheads, headdim, scale, dropout_p, dtype)) return false;
  if (total < 0 || total >= INT32_MAX) return false;
  if (total > 0 && (batch == 0 || max_seqlen == 0 || cu_seqlens == nullptr)) return false;
  return ceil_div(max_seqlen, 64) * batch * nheads <= INT32_MAX && ceil_div(nheads * total, 8) <= INT32_MAX;
}

void fill_common(AttnParams& p, int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t headdim,
                 float scale, float dropout_p, uint64_t seed) {
  p.B = static_cast<int>(batch);
  p.Tq = static_cast<int>(seqlen_q);
  p.Tk = static_cast<int>(seqlen_k);
  p.H = static_cast<int>(nheads);
  p.D = static_cast<int>(headdim);
  p.scale = scale;
  p.scale_log2 = scale * kLog2e;
  p.dropout = dropout_p > 0.0f;
  p.keep_scale = p.dropout ? 1.0f / (1.0f - dropout_p) : 1.0f;
  p.thr16 = dropout_threshold16(dropout_p);
  p.seed = seed;
}

// Strides allow 16-byte vector access (elements per 16 bytes: 8 for fp16/bf16, 4 for fp32).
bool strides_vec_ok(FastbertDType dtype, std::initializer_list<FastbertStrides> strides) {
  const int64_t per = dtype == FASTBERT_FLOAT32 ? 4 : 8;
  for (const FastbertStrides& s : strides) {
    if (s.batch % per != 0 || s.seq % per != 0 || s.head % per != 0) return false;
  }
  return true;
}

// Packed tensors have no batch dimension: sequences are addressed through cu_seqlens along the token stride.
FastbertStrides packed(FastbertStrides s) { return FastbertStrides{0, s.seq, s.head}; }

void set_fwd_tensors(AttnParams& p, void* out, float* lse, const void* q, const void* k, const void* v,
                     FastbertStrides qs, FastbertStrides ks, FastbertStrides vs, FastbertStrides os,
                     FastbertDType dtype) {
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse;
  p.q_sb = qs.batch, p.q_st = qs.seq, p.q_sh = qs.head;
  p.k_sb = ks.batch, p.k_st = ks.seq, p.k_sh = ks.head;
  p.v_sb = vs.batch, p.v_st = vs.seq, p.v_sh = vs.head;
  p.o_sb = os.batch, p.o_st = os.seq, p.o_sh = os.head;
  p.vec_ok = aligned_all({out, q, k, v}) && strides_vec_ok(dtype, {qs, ks, vs, os});
}

void set_bwd_tensors(AttnParams& p, void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k,
                     const void* v, const void* out, const float* lse, void* workspace,
                     std::initializer_list<FastbertStrides> strides, FastbertDType dtype) {
  const FastbertStrides* s = strides.begin();  // q, k, v, out, dout, dq, dk, dv
  p.q = q, p.k = k, p.v = v, p.out_in = out, p.dout = dout, p.dq = dq, p.dk = dk, p.dv = dv;
  p.lse_in = lse;
  p.delta = static_cast<float*>(workspace);
  p.q_sb = s[0].batch, p.q_st = s[0].seq, p.q_sh = s[0].head;
  p.k_sb = s[1].batch, p.k_st = s[1].seq, p.k_sh = s[1].head;
  p.v_sb = s[2].batch, p.v_st = s[2].seq, p.v_sh = s[2].head;
  p.o_sb = s[3].batch, p.o_st = s[3].seq, p.o_sh = s[3].head;
  p.do_sb = s[4].batch, p.do_st = s[4].seq, p.do_sh = s[4].head;
  p.dq_sb = s[5].batch, p.dq_st = s[5].seq, p.dq_sh = s[5].head;
  p.dk_sb = s[6].batch, p.dk_st = s[6].seq, p.dk_sh = s[6].head;
  p.dv_sb = s[7].batch, p.dv_st = s[7].seq, p.dv_sh = s[7].head;
  // out only feeds the delta kernel's scalar loads, so its alignment does not matter.
  p.vec_ok = aligned_all({dq, dk, dv, dout, q, k, v}) &&
             strides_vec_ok(dtype, {s[0], s[1], s[2], s[4], s[5], s[6], s[7]});
}

}  // namespace
}  // namespace cuda
}  // namespace fastbert

using namespace fastbert::cuda;

extern "C" int fastbert_attention_supported(int64_t headdim, FastbertDType dtype) {
  return valid_dtype(dtype) && headdim >= 8 && headdim <= 128 && headdim % 8 == 0 ? 1 : 0;
}

extern "C" cudaError_t fastbert_attention_fwd(void* out, float* lse, const void* q, const void* k, const void* v,
                                              const uint8_t* key_padding_mask, int64_t batch, int64_t seqlen_q,
                                              int64_t seqlen_k, int64_t nheads, int64_t headdim,
                                              FastbertStrides q_strides, FastbertStrides k_strides,
                                              FastbertStrides v_strides, FastbertStrides out_strides,
                                              int64_t mask_stride_b, float scale, float dropout_p, uint64_t seed,
                                              FastbertDType dtype, cudaStream_t stream) {
  if (!common_args_ok(batch, seqlen_q, seqlen_k, nheads, headdim, scale, dropout_p, dtype)) {
    return cudaErrorInvalidValue;
  }
  if (key_padding_mask != nullptr && mask_stride_b < seqlen_k) return cudaErrorInvalidValue;
  if (batch * nheads * seqlen_q == 0) return cudaSuccess;
  if (out == nullptr || lse == nullptr || q == nullptr || (seqlen_k > 0 && (k == nullptr || v == nullptr))) {
    return cudaErrorInvalidValue;
  }
  AttnParams p{};
  fill_common(p, batch, seqlen_q, seqlen_k, nheads, headdim, scale, dropout_p, seed);
  p.mask = key_padding_mask;
  p.mask_stride_b = mask_stride_b;
  set_fwd_tensors(p, out, lse, q, k, v, q_strides, k_strides, v_strides, out_strides, dtype);
  return launch_attn_fwd(p, dtype, stream);
}

extern "C" size_t fastbert_attention_bwd_workspace_size(int64_t batch, int64_t nheads, int64_t seqlen_q) {
  if (batch <= 0 || nheads <= 0 || seqlen_q <= 0) return 0;
  return static_cast<size_t>(batch * nheads * seqlen_q) * sizeof(float);
}

extern "C" cudaError_t fastbert_attention_bwd(
    void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k, const void* v, const void* out,
    const float* lse, const uint8_t* key_padding_mask, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
    int64_t nheads, int64_t headdim, FastbertStrides q_strides, FastbertStrides k_strides, FastbertStrides v_strides,
    FastbertStrides out_strides, FastbertStrides dout_strides, FastbertStrides dq_strides, FastbertStrides dk_strides,
    FastbertStrides dv_strides, int64_t mask_stride_b, float scale, float dropout_p, uint64_t seed, void* workspace,
    size_t workspace_bytes, FastbertDType dtype, cudaStream_t stream) {
  if (!common_args_ok(batch, seqlen_q, seqlen_k, nheads, headdim, scale, dropout_p, dtype)) {
    return cudaErrorInvalidValue;
  }
  if (key_padding_mask != nullptr && mask_stride_b < seqlen_k) return cudaErrorInvalidValue;
  if (batch * nheads == 0 || (seqlen_q == 0 && seqlen_k == 0)) return cudaSuccess;
  // An empty side (seqlen_q or seqlen_k == 0) may come with null pointers; the other side's gradients are zeros.
  if (seqlen_q > 0 && (dq == nullptr || dout == nullptr || q == nullptr || out == nullptr || lse == nullptr ||
                       workspace == nullptr || !is_aligned16(workspace) ||
                       workspace_bytes < fastbert_attention_bwd_workspace_size(batch, nheads, seqlen_q))) {
    return cudaErrorInvalidValue;
  }
  if (seqlen_k > 0 && (dk == nullptr || dv == nullptr || k == nullptr || v == nullptr)) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(std::max(seqlen_q, seqlen_k), 64) * batch * nheads;
  if (blocks > INT32_MAX || ceil_div(batch * nheads * seqlen_q, 8) > INT32_MAX) return cudaErrorInvalidValue;
  AttnParams p{};
  fill_common(p, batch, seqlen_q, seqlen_k, nheads, headdim, scale, dropout_p, seed);
  p.mask = key_padding_mask;
  p.mask_stride_b = mask_stride_b;
  set_bwd_tensors(p, dq, dk, dv, dout, q, k, v, out, lse, workspace,
                  {q_strides, k_strides, v_strides, out_strides, dout_strides, dq_strides, dk_strides, dv_strides},
                  dtype);
  return launch_attn_bwd(p, dtype, stream);
}

extern "C" cudaError_t fastbert_varlen_attention_fwd(void* out, float* lse, const void* q, const void* k,
                                                     const void* v, const int32_t* cu_seqlens, int64_t batch,
                                                     int64_t max_seqlen, int64_t total, int64_t nheads,
                                                     int64_t headdim, FastbertStrides q_strides,
                                                     FastbertStrides k_strides, FastbertStrides v_strides,
                                                     FastbertStrides out_strides, float scale, float dropout_p,
                                                     uint64_t seed, FastbertDType dtype, cudaStream_t stream) {
  if (!varlen_args_ok(cu_seqlens, batch, max_seqlen, total, nheads, headdim, scale, dropout_p, dtype)) {
    return cudaErrorInvalidValue;
  }
  if (total * nheads == 0) return cudaSuccess;
  if (out == nullptr || lse == nullptr || q == nullptr || k == nullptr || v == nullptr) return cudaErrorInvalidValue;
  AttnParams p{};
  fill_common(p, batch, max_seqlen, max_seqlen, nheads, headdim, scale, dropout_p, seed);
  p.cu_seqlens = cu_seqlens;
  p.total = total;
  set_fwd_tensors(p, out, lse, q, k, v, packed(q_strides), packed(k_strides), packed(v_strides), packed(out_strides),
                  dtype);
  return launch_attn_fwd(p, dtype, stream);
}

extern "C" cudaError_t fastbert_varlen_attention_bwd(
    void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k, const void* v, const void* out,
    const float* lse, const int32_t* cu_seqlens, int64_t batch, int64_t max_seqlen, int64_t total, int64_t nheads,
    int64_t headdim, FastbertStrides q_strides, FastbertStrides k_strides, FastbertStrides v_strides,
    FastbertStrides out_strides, FastbertStrides dout_strides, FastbertStrides dq_strides, FastbertStrides dk_strides,
    FastbertStrides dv_strides, float scale, float dropout_p, uint64_t seed, void* workspace, size_t workspace_bytes,
    FastbertDType dtype, cudaStream_t stream) {
  if (!varlen_args_ok(cu_seqlens, batch, max_seqlen, total, nheads, headdim, scale, dropout_p, dtype)) {
    return cudaErrorInvalidValue;
  }
  if (total * nheads == 0) return cudaSuccess;
  if (dq == nullptr || dk == nullptr || dv == nullptr || dout == nullptr || q == nullptr || k == nullptr ||
      v == nullptr || out == nullptr || lse == nullptr || workspace == nullptr || !is_aligned16(workspace) ||
      workspace_bytes < fastbert_attention_bwd_workspace_size(1, nheads, total)) {
    return cudaErrorInvalidValue;
  }
  AttnParams p{};
  fill_common(p, batch, max_seqlen, max_seqlen, nheads, headdim, scale, dropout_p, seed);
  p.cu_seqlens = cu_seqlens;
  p.total = total;
  set_bwd_tensors(p, dq, dk, dv, dout, q, k, v, out, lse, workspace,
                  {packed(q_strides), packed(k_strides), packed(v_strides), packed(out_strides), packed(dout_strides),
                   packed(dq_strides), packed(dk_strides), packed(dv_strides)},
                  dtype);
  return launch_attn_bwd(p, dtype, stream);
}
