"""Variable-length (packed) attention: ``fastbert::varlen_attention_fwd`` / ``varlen_attention_bwd``.

The padding-free layout: the sequences of a batch are packed back to back, q, k, v: (total_tokens, nheads, headdim),
and sequence i holds tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``; every token attends (bidirectionally) to the
tokens of its own sequence. No work is spent on padding, so a batch costs what its real tokens cost.
``max_seqlen`` (the longest sequence) sizes the kernels' grids without reading ``cu_seqlens`` back from the GPU.
lse is head-major, (nheads, total_tokens), fp32.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from fastbert.ops import _backend
from fastbert.ops._utils import autocast_inputs, check_dropout_p, check_scale, check_tensor, new_seed
from fastbert.ops.attention import _attention_bwd_torch, _attention_fwd_torch

# --------------------------------------------------------------------------------------------------------------
# torch backend: the padded torch kernel once per sequence (on CPU that is PyTorch's fused flash kernel)


def _sequence_seed(seed, index):
    # Sequence i draws its dropout mask from seed + i: independent masks, regenerated identically in the backward.
    return None if seed is None else seed + index


def _sequences(cu_seqlens):
    bounds = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if end > start:
            yield i, start, end


def _varlen_attention_fwd_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for i, start, end in _sequences(cu_seqlens):
        o, s = _attention_fwd_torch(
            q[None, start:end], k[None, start:end], v[None, start:end], None, dropout_p, scale, _sequence_seed(seed, i)
        )
        out[start:end], lse[:, start:end] = o[0], s[0]
    return out, lse


def _varlen_attention_bwd_torch(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, start, end in _sequences(cu_seqlens):
        grads = _attention_bwd_torch(
            dout[None, start:end], q[None, start:end], k[None, start:end], v[None, start:end], out[None, start:end],
            lse[None, :, start:end], None, dropout_p, scale, _sequence_seed(seed, i),
        )
        for full, g in zip((dq, dk, dv), grads, strict=True):
            full[start:end] = g[0]
    return dq, dk, dv


_backend.register_impl("varlen_attention_fwd", "torch", _varlen_attention_fwd_torch)
_backend.register_impl("varlen_attention_bwd", "torch", _varlen_attention_bwd_torch)

# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("fastbert::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """out: (total, H, D) in q's dtype; lse: (H, total) fp32 log-sum-exp of the scaled scores of each query."""
    fn = _backend.impl("varlen_attention_fwd", q.device.type)
    return fn(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed)


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    total, h, _ = q.shape
    return q.new_empty((total, h, v.shape[-1])), q.new_empty((h, total), dtype=torch.float32)


@torch.library.custom_op("fastbert::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv with the shapes and dtypes of q, k, v."""
    fn = _backend.impl("varlen_attention_bwd", q.device.type)
    return fn(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed)


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.max_seqlen, ctx.dropout_p, ctx.scale = max_seqlen, dropout_p, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    args = (dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.dropout_p, ctx.scale, seed)
    dq, dk, dv = _backend.call_backward(ctx, varlen_attention_bwd, "varlen_attention_bwd", *args)
    return dq, dk, dv, None, None, None, None, None


_backend.register_autograd(
    varlen_attention_fwd, "varlen_attention_fwd", "varlen_attention_bwd", _backward, _setup_context
)

# --------------------------------------------------------------------------------------------------------------
# public API


def check_cu_seqlens(cu_seqlens, total_tokens: int, max_seqlen: int | None, device,
                     read_values: bool = True, allow_empty: bool = True) -> tuple[torch.Tensor, int]:
    """Validate cu_seqlens (and max_seqlen); returns (cu_seqlens as int32, max_seqlen).

    Reading the offsets is a host sync on a GPU; it happens when max_seqlen is None, or when ``read_values`` and
    input checks are on. ``allow_empty=False`` refuses sequences of length 0 (the model's packed input: a sequence
    needs at least its [CLS] token, as on the padded path).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of sequence offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D (batch + 1,) offsets such as [0, len0, len0 + len1, ...], got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens has dtype {cu_seqlens.dtype}; use torch.int32 offsets")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}; move it with .to({device})")
    if max_seqlen is not None and not isinstance(max_seqlen, torch.SymInt):
        try:  # an int, or anything usable as one (numpy or 0-d tensor integers); not a float or str
            max_seqlen = operator.index(max_seqlen)
        except TypeError:
            raise TypeError(f"max_seqlen must be an int (the longest sequence's length) or None to compute it from "
                            f"cu_seqlens, got {type(max_seqlen).__name__} {max_seqlen!r}") from None
    if max_seqlen is None or (read_values and _inputs_checked(cu_seqlens)):
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if bounds[0] != 0 or bounds[-1] != total_tokens or any(n < 0 for n in lengths):
            raise ValueError(
                f"cu_seqlens must rise from 0 to the number of packed tokens ({total_tokens}) without decreasing; "
                f"got {bounds if len(bounds) <= 16 else bounds[:8] + ['...'] + bounds[-4:]}"
            )
        if not allow_empty and 0 in lengths:
            raise ValueError(
                f"cu_seqlens holds an empty sequence (sequence {lengths.index(0)} has length 0, offsets "
                f"{bounds if len(bounds) <= 16 else bounds[:8] + ['...'] + bounds[-4:]}); every sequence needs at "
                "least its [CLS] token, as on the padded path: drop the empty sequences"
            )
        longest = max(lengths, default=0)
        if max_seqlen is None:
            max_seqlen = longest
        elif max_seqlen < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest}); pass >= it")
        elif max_seqlen > total_tokens:
            # A loose upper bound (a fixed grid size, a CUDA-graph bucket) is allowed; no sequence can be longer than
            # the packed tokens, so the kernels' grids are sized by that instead of a bound far beyond it.
            max_seqlen = total_tokens
    max_seqlen = int(max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    return cu_seqlens.to(torch.int32), max_seqlen


def _inputs_checked(cu_seqlens) -> bool:
    # While torch.compile traces, the offsets have no values: reading them would break the graph (an error under
    # fullgraph=True), so a compiled call trusts them, as a GPU call with input checks off does.
    if torch.compiler.is_compiling():
        return False
    # Reading the offsets is free on CPU; on a GPU it syncs, and can be switched off for serving.
    if cu_seqlens.device.type == "cpu":
        return True
    from fastbert.validation import input_checks_enabled

    return input_checks_enabled()


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence.

    q, k, v: (total_tokens, nheads, headdim), one dtype (fp32, fp16 or bf16), sequences back to back.
    cu_seqlens: (batch + 1,) int32 offsets, [0, len0, len0 + len1, ..., total_tokens]; empty sequences allowed.
    max_seqlen: the longest sequence (computed from cu_seqlens when None, a host sync on a GPU).
    dropout_p: dropout on the attention probabilities (pass 0.0 in eval). scale: default 1/sqrt(headdim).
    check_offsets: read cu_seqlens back to check it (a host sync on a GPU, skipped when input checks are off);
    False trusts offsets validated once upstream, as BertModel does for every layer after the first check.
    Returns (total_tokens, nheads, headdim) in q's dtype (the autocast dtype under torch.autocast).
    """
    check_tensor("q", q, ndim=3)
    q, k, v = autocast_inputs("lower", q, k, v)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), like=q)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), like=q)
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must all be (total_tokens, nheads, "
            "headdim) over the same packed tokens"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"q has shape {tuple(q.shape)}: headdim must be >= 1")
    cu_seqlens, max_seqlen = check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q.device, check_offsets)
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p == 1.0:  # nn.Dropout(p=1.0) drops every probability, as in transformers
        from fastbert.ops._utils import all_dropped_attention

        return all_dropped_attention(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_scale(scale)
    seed = new_seed() if dropout_p > 0.0 else None
    out, _ = _backend.call(
        varlen_attention_fwd, "varlen_attention_fwd", q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, seed
    )
    return out


__all__ = ["check_cu_seqlens", "varlen_attention", "varlen_attention_bwd", "varlen_attention_fwd"]
