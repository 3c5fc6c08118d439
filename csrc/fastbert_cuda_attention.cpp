// The torch binding of the fused attention kernels (csrc/cuda/attention_*.cu): CUDA implementations of
// torch.ops.fastbert_ext.attention_fwd / _bwd (padded batch, key padding mask) and varlen_attention_fwd / _bwd
// (sequences packed back to back, cu_seqlens). Schemas: fastbert.cpp. Helpers: fastbert_cuda.h.
//
// q, k, v, out and their gradients are read through their strides (the kernels take batch / token / head strides
// and need only the head dim to be dense), so the (B, T, H, D) views that a fused QKV projection produces are not
// copied. Outputs are allocated contiguous; lse is (B, H, Tq) fp32, or (H, total) for varlen.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "fastbert_cuda.h"

namespace {

using namespace fastbert_cuda;

// The kernels read rows of headdim elements: the last stride must be 1; the others are passed through.
Tensor dense_rows(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

FastbertStrides strides_of(const Tensor& t) {  // (B, T, H, D)
  return FastbertStrides{t.stride(0), t.stride(1), t.stride(2)};
}

FastbertStrides packed_strides_of(const Tensor& t) {  // (total, H, D): no batch dimension
  return FastbertStrides{0, t.stride(0), t.stride(1)};
}

// q, k, v on one CUDA device, one supported dtype, shapes as the kernels take them; returns the kernel dtype.
FastbertDType check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, bool varlen) {
  TORCH_CHECK(q.is_cuda(), "fastbert_ext (cuda): q must be a CUDA tensor, got ", q.device());
  check_device(k, "k", q);
  check_device(v, "v", q);
  const FastbertDType dt = kernel_dtype(q.scalar_type(), "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastbert_ext (cuda): q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  if (varlen) {
    TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
                "fastbert_ext (cuda): q, k, v must all be (total_tokens, nheads, headdim), got ", q.sizes(), ", ",
                k.sizes(), ", ", v.sizes());
  } else {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
                    k.size(2) == q.size(2) && k.size(3) == q.size(3),
                "fastbert_ext (cuda): q must be (batch, seqlen_q, nheads, headdim) and k, v (batch, seqlen_k, nheads, "
                "headdim), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  }
  const int64_t d = q.size(-1);
  TORCH_CHECK(fastbert_attention_supported(d, dt) == 1,
              "fastbert_ext (cuda): headdim must be a multiple of 8 in [8, 128], got ", d);
  return dt;
}

void check_like(const Tensor& t, const char* name, const Tensor& like) {
  check_device(t, name, like);
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "fastbert_ext (cuda): ", name,
              " must have q's shape ", like.sizes(), " and dtype ", like.scalar_type(), ", got ", t.sizes(), " ",
              t.scalar_type());
}

Tensor checked_lse(const Tensor& lse, at::IntArrayRef shape, const Tensor& q) {
  check_device(lse, "lse", q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == shape, "fastbert_ext (cuda): lse must be the "
              "forward's fp32 log-sum-exp of shape ", shape, ", got ", lse.sizes(), " ", lse.scalar_type());
  return lse.contiguous();
}

// ---------------------------------------------------------------------------------------------------------------
// padded batch

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const OptTensor& key_padding_mask, double dropout_p, double scale,
                                         const OptTensor& seed) {
  const FastbertDType dt = check_qkv(q_in, k_in, v_in, false);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  const int64_t b = q.size(0), tq = q.size(1), h = q.size(2), d = q.size(3), tk = k.size(1);
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  const Tensor mask = key_padding_mask ? bool_mask(*key_padding_mask, b, tk, q) : Tensor();
  Tensor out = at::empty({b, tq, h, d}, q.options());
  Tensor lse = at::empty({b, h, tq}, q.options().dtype(at::kFloat));
  check_launch(fastbert_attention_fwd(out.data_ptr(), lse.data_ptr<float>(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                      mask_ptr(mask), b, tq, tk, h, d, strides_of(q), strides_of(k), strides_of(v),
                                      strides_of(out), tk, static_cast<float>(scale), static_cast<float>(dropout_p),
                                      seed_value, dt, stream_of(q)),
               "attention_fwd");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                 const OptTensor& key_padding_mask, double dropout_p, double scale,
                                                 const OptTensor& seed) {
  const FastbertDType dt = check_qkv(q_in, k_in, v_in, false);
  check_like(dout_in, "dout", q_in);
  check_like(out_in, "out", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  const Tensor dout = dense_rows(dout_in), out = dense_rows(out_in);
  const int64_t b = q.size(0), tq = q.size(1), h = q.size(2), d = q.size(3), tk = k.size(1);
  const Tensor lse = checked_lse(lse_in, {b, h, tq}, q);
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  const Tensor mask = key_padding_mask ? bool_mask(*key_padding_mask, b, tk, q) : Tensor();
  Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  const size_t ws_bytes = fastbert_attention_bwd_workspace_size(b, h, tq);
  Tensor ws = workspace(ws_bytes, q);
  check_launch(fastbert_attention_bwd(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dout.data_ptr(), q.data_ptr(),
                                      k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                      mask_ptr(mask), b, tq, tk, h, d, strides_of(q), strides_of(k), strides_of(v),
                                      strides_of(out), strides_of(dout), strides_of(dq), strides_of(dk),
                                      strides_of(dv), tk, static_cast<float>(scale), static_cast<float>(dropout_p),
                                      seed_value, ws.data_ptr(), ws_bytes, dt, stream_of(q)),
               "attention_bwd");
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------------------------
// varlen (packed sequences)

// cu_seqlens as a contiguous int32 tensor on q's device. Its values are not read here (that would synchronize the
// GPU): the caller (fastbert.ops.varlen_attention) validates them and max_seqlen.
Tensor checked_cu_seqlens(const Tensor& cu_seqlens, int64_t max_seqlen, const Tensor& q) {
  check_device(cu_seqlens, "cu_seqlens", q);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "fastbert_ext (cuda): cu_seqlens must be 1-D (batch + 1,) offsets, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
              "fastbert_ext (cuda): cu_seqlens must be int32 offsets, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen < (int64_t{1} << 31), "fastbert_ext (cuda): max_seqlen must be in [0, "
              "2^31), got ", max_seqlen);
  TORCH_CHECK(q.size(0) < (int64_t{1} << 31), "fastbert_ext (cuda): at most 2^31 - 1 packed tokens, got ", q.size(0));
  TORCH_CHECK(q.size(0) == 0 || max_seqlen > 0, "fastbert_ext (cuda): max_seqlen must be at least the longest "
              "sequence, got 0 with ", q.size(0), " tokens");
  return cu_seqlens.to(at::kInt).contiguous();
}

std::tuple<Tensor, Tensor> varlen_attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                const Tensor& cu_seqlens_in, int64_t max_seqlen, double dropout_p,
                                                double scale, const OptTensor& seed) {
  const FastbertDType dt = check_qkv(q_in, k_in, v_in, true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor cu = checked_cu_seqlens(cu_seqlens_in, max_seqlen, q_in);
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  const int64_t total = q.size(0), h = q.size(1), d = q.size(2), batch = cu.numel() - 1;
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  Tensor out = at::empty({total, h, d}, q.options());
  Tensor lse = at::empty({h, total}, q.options().dtype(at::kFloat));
  check_launch(fastbert_varlen_attention_fwd(out.data_ptr(), lse.data_ptr<float>(), q.data_ptr(), k.data_ptr(),
                                             v.data_ptr(), cu.data_ptr<int32_t>(), batch, max_seqlen, total, h, d,
                                             packed_strides_of(q), packed_strides_of(k), packed_strides_of(v),
                                             packed_strides_of(out), static_cast<float>(scale),
                                             static_cast<float>(dropout_p), seed_value, dt, stream_of(q)),
               "varlen_attention_fwd");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_attention_bwd(const Tensor& dout_in, const Tensor& q_in,
                                                        const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
                                                        const Tensor& lse_in, const Tensor& cu_seqlens_in,
                                                        int64_t max_seqlen, double dropout_p, double scale,
                                                        const OptTensor& seed) {
  const FastbertDType dt = check_qkv(q_in, k_in, v_in, true);
  check_like(dout_in, "dout", q_in);
  check_like(out_in, "out", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor cu = checked_cu_seqlens(cu_seqlens_in, max_seqlen, q_in);
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  const Tensor dout = dense_rows(dout_in), out = dense_rows(out_in);
  const int64_t total = q.size(0), h = q.size(1), d = q.size(2), batch = cu.numel() - 1;
  const Tensor lse = checked_lse(lse_in, {h, total}, q);
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  const size_t ws_bytes = fastbert_attention_bwd_workspace_size(1, h, total);
  Tensor ws = workspace(ws_bytes, q);
  check_launch(fastbert_varlen_attention_bwd(
                   dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dout.data_ptr(), q.data_ptr(), k.data_ptr(),
                   v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(), cu.data_ptr<int32_t>(), batch, max_seqlen,
                   total, h, d, packed_strides_of(q), packed_strides_of(k), packed_strides_of(v),
                   packed_strides_of(out), packed_strides_of(dout), packed_strides_of(dq), packed_strides_of(dk),
                   packed_strides_of(dv), static_cast<float>(scale), static_cast<float>(dropout_p), seed_value,
                   ws.data_ptr(), ws_bytes, dt, stream_of(q)),
               "varlen_attention_bwd");
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert_ext, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("varlen_attention_fwd", &varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd);
}
