"""Triton backend of packed variable-length attention: the padded attention kernels in their VARLEN mode.

Registers ``varlen_attention_fwd`` / ``varlen_attention_bwd`` with the contract of the torch implementations in
``fastbert.ops.varlen_attention``: q, k, v (total, H, D) read through their strides (views of a packed (total, 3, H, D)
projection need no copy), cu_seqlens (nseq + 1,) int32 on q's device, max_seqlen >= the longest sequence; out
(total, H, D) contiguous in q's dtype, lse (H, total) fp32; dq, dk, dv contiguous.

The kernels are those of ``fastbert.ops.attention.triton`` / ``triton_bwd`` compiled with ``VARLEN=True`` (see
``_program_sequence`` there): the grid is cdiv(max_seqlen, block) x (nseq * H), each program reads its sequence's
first token and length from cu_seqlens, offsets the packed tensors by that token, and programs past the sequence's
end return at once, so no work is spent on padding or on other sequences' tokens. Dropout draws one Philox counter
per (sequence, head, query, key), the same in the forward and both backward kernels; its mask differs from the torch
backend's (which seeds each sequence with seed + i), as every backend's does.

Falls back to the torch implementation for what the kernels do not cover (``unsupported_reason``).
"""

from __future__ import annotations

import torch

from fastbert.ops import _backend
from fastbert.ops.attention import triton as _attn
from fastbert.ops.attention import triton_bwd as _attn_bwd
from fastbert.ops.varlen_attention import _varlen_attention_bwd_torch, _varlen_attention_fwd_torch

# The dropout counter of query q and key k in a sequence of length n is (sequence * H + head) * 2^32 + q * n + k:
# distinct across sequences and heads while n^2 <= 2^32.
MAX_DROPOUT_SEQLEN = 1 << 16


def unsupported_reason(q, k, v, cu_seqlens, max_seqlen, dropout_p) -> str | None:
    """Why the Triton kernels cannot take these inputs (the caller then runs the torch implementation), or None."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "q, k, v are not (total_tokens, nheads, headdim)"
    if q.shape[0] != k.shape[0]:
        return "q and k hold different numbers of packed tokens"
    reason = _attn.unsupported_reason(q[None], k[None], v[None])
    if reason is not None:
        return reason
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.device != q.device:
        return "cu_seqlens is not (batch + 1,) offsets on q's device"
    if max_seqlen < 1:
        return f"max_seqlen={max_seqlen} sizes an empty grid"
    if dropout_p > 0.0 and max_seqlen > MAX_DROPOUT_SEQLEN:
        return f"dropout on sequences longer than {MAX_DROPOUT_SEQLEN}: the Philox counters would collide"
    return None


def _offsets(cu_seqlens):
    # The kernels read int32 offsets; the public function already converts, direct custom-op calls may not.
    return cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)


def varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """out: (total, H, D) contiguous in q's dtype; lse: (H, total) fp32.

    q, k, v: (total, H, D); cu_seqlens: (nseq + 1,) on q's device; seed: (1,) int64 CPU tensor or None.
    """
    if unsupported_reason(q, k, v, cu_seqlens, max_seqlen, dropout_p) is not None:
        return _varlen_attention_fwd_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed)
    return _attn.launch_fwd(q, k, v, None, _offsets(cu_seqlens), int(max_seqlen), dropout_p, scale, seed)


def varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """dq, dk, dv: (total, H, D) contiguous in q's / k's / v's dtype; lse: (H, total) fp32 from the forward."""
    if (
        unsupported_reason(q, k, v, cu_seqlens, max_seqlen, dropout_p) is not None
        or dout.shape != q.shape
        or out.shape != q.shape
    ):
        return _varlen_attention_bwd_torch(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed)
    return _attn_bwd.launch_bwd(
        dout, q, k, v, out, lse, None, _offsets(cu_seqlens), int(max_seqlen), dropout_p, scale, seed
    )


_backend.register_impl("varlen_attention_fwd", "triton", varlen_attention_fwd)
_backend.register_impl("varlen_attention_bwd", "triton", varlen_attention_bwd)
