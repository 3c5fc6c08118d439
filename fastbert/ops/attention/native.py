"""cpp / cuda backends of attention.

cpp: nothing registered, so fastbert's torch implementation runs. On CPU that implementation is PyTorch's fused
flash kernel (``_scaled_dot_product_flash_attention_for_cpu``): blocked GEMM micro-kernels with an online softmax, in
fp32 for every dtype. A hand-written kernel in csrc/cpu would have to beat that GEMM code before fusion could pay
off, so the cpp backend leaves attention to it; the masked softmax that the ``output_attentions=True`` path needs is
compiled (fastbert/ops/softmax/native.py).

cuda: the fused kernels of csrc/cuda/attention_*.cu through ``torch.ops.fastbert_ext.attention_fwd`` / ``_bwd``
(csrc/fastbert_cuda_attention.cpp), forward and backward: FlashAttention-2 style on tensor cores for fp16/bf16, fp32
on CUDA cores without TF32, key padding mask, fused dropout (the kernels' own Philox mask, csrc/cuda/common.cuh;
the backward regenerates it), deterministic gradients (no atomics). Head dims that are not a multiple of 8 in
[8, 128] (and grids beyond 2^31 blocks) run the torch implementation instead (:func:`unsupported_reason`); the
decision depends on shapes and dtypes only, so a forward and its backward always take the same path.
"""

from __future__ import annotations

import torch

from fastbert import _ext
from fastbert.ops import _backend
from fastbert.ops._native import attention_unsupported
from fastbert.ops.attention import _attention_bwd_torch, _attention_fwd_torch

_ext.load("cpp")  # defines every fastbert_ext schema; the CUDA library only adds kernels to them


def unsupported_reason(q, k, v) -> str | None:
    """Why the CUDA kernels cannot take q (B, Tq, H, D), k, v (B, Tk, H, D) (the torch implementation then runs)."""
    return attention_unsupported(q, k, v)


@torch.library.register_fake("fastbert_ext::attention_fwd")
def _(q, k, v, key_padding_mask, dropout_p, scale, seed):
    b, tq, h, d = q.shape
    return q.new_empty((b, tq, h, d)), q.new_empty((b, h, tq), dtype=torch.float32)


@torch.library.register_fake("fastbert_ext::attention_bwd")
def _(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_fwd_cuda(q, k, v, key_padding_mask, dropout_p, scale, seed):
    if unsupported_reason(q, k, v) is not None:
        return _attention_fwd_torch(q, k, v, key_padding_mask, dropout_p, scale, seed)
    return torch.ops.fastbert_ext.attention_fwd(q, k, v, key_padding_mask, dropout_p, scale, seed)


def _attention_bwd_cuda(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed):
    if unsupported_reason(q, k, v) is not None:
        return _attention_bwd_torch(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed)
    return torch.ops.fastbert_ext.attention_bwd(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed)


_backend.register_impl("attention_fwd", "cuda", _attention_fwd_cuda)
_backend.register_impl("attention_bwd", "cuda", _attention_bwd_cuda)
