"""cuda backend of varlen (packed) attention: ``torch.ops.fastbert_ext.varlen_attention_fwd`` / ``_bwd``.

The padded attention kernels of csrc/cuda in their packed mode (csrc/fastbert_cuda_attention.cpp): one grid of
ceil(max_seqlen / tile) * batch * nheads blocks; each block reads its sequence's start and length from cu_seqlens
and does nothing past the sequence's end, so no work goes to padding and no sequence sees another's tokens. lse is
(nheads, total) fp32, as in the torch implementation. cu_seqlens and max_seqlen are trusted (the public
:func:`fastbert.ops.varlen_attention` validates them while input checks are on): a sequence longer than
max_seqlen would leave its rows past max_seqlen unwritten.

Dropout is the kernels' own Philox mask: sequence i, head h, positions (q, k) within the sequence draw the element
that padded attention draws at batch row i (launchers.h), not the torch implementation's per-sequence generator;
forward and backward agree. Inputs the kernels do not take (head dims that are not a multiple of 8 in [8, 128])
run the torch implementation (:func:`unsupported_reason`, shapes and dtypes only: forward and backward agree).

The cpp backend registers nothing: on CPU the torch implementation runs PyTorch's flash kernel per sequence.
"""

from __future__ import annotations

import torch

from fastbert import _ext
from fastbert.ops import _backend
from fastbert.ops._native import varlen_unsupported
from fastbert.ops.varlen_attention import _varlen_attention_bwd_torch, _varlen_attention_fwd_torch

_ext.load("cpp")  # defines every fastbert_ext schema; the CUDA library only adds kernels to them


@torch.library.register_fake("fastbert_ext::varlen_attention_fwd")
def _(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    total, h, d = q.shape
    return q.new_empty((total, h, d)), q.new_empty((h, total), dtype=torch.float32)


@torch.library.register_fake("fastbert_ext::varlen_attention_bwd")
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def unsupported_reason(q, k, v, cu_seqlens, max_seqlen) -> str | None:
    """Why the CUDA kernels cannot take these inputs (the torch implementation then runs), or None."""
    return varlen_unsupported(q, k, v, cu_seqlens.shape[0] - 1, int(max_seqlen))


def _varlen_attention_fwd_cuda(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    if unsupported_reason(q, k, v, cu_seqlens, max_seqlen) is not None:
        return _varlen_attention_fwd_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed)
    return torch.ops.fastbert_ext.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed)


def _varlen_attention_bwd_cuda(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    if unsupported_reason(q, k, v, cu_seqlens, max_seqlen) is not None:
        return _varlen_attention_bwd_torch(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed)
    return torch.ops.fastbert_ext.varlen_attention_bwd(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed
    )


_backend.register_impl("varlen_attention_fwd", "cuda", _varlen_attention_fwd_cuda)
_backend.register_impl("varlen_attention_bwd", "cuda", _varlen_attention_bwd_cuda)
