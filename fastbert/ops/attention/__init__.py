"""Fused bidirectional attention with a key-padding mask: ``fastbert::attention_fwd`` / ``attention_bwd``.

q, k, v: (batch, seqlen, nheads, headdim), the layout the Q/K/V projections produce, so no transpose is needed
before the op. The output has the same layout. A query whose keys are all padding gets zeros (never NaN).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastbert.ops import _backend
from fastbert.ops._utils import (
    autocast_inputs,
    check_dropout_p,
    check_scale,
    check_tensor,
    dropout_scale_mask,
    new_seed,
)

# --------------------------------------------------------------------------------------------------------------
# torch backend


def _scores_fp32(q, k, key_padding_mask, scale):
    # (B, H, Tq, Tk) in fp32: softmax statistics are always kept in fp32.
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return scores


def _probs_and_lse(scores):
    """Softmax with the row max subtracted (exp(scores - lse) loses accuracy as |lse| grows), and lse.

    Rows whose keys are all padding get probabilities 0 and lse -inf.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)  # exp(-inf) = 0 on masked keys
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    return probs, (torch.log(denom) + row_max).squeeze(-1)


def _padding_bias(key_padding_mask, dtype):
    """(B, 1, 1, Tk) additive bias: 0 on real keys, -inf on padding (None without a mask)."""
    if key_padding_mask is None:
        return None
    bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill(~key_padding_mask, float("-inf"))[:, None, None, :]


def _use_cpu_flash(q, dropout_p):
    # PyTorch's fused CPU flash kernels: the same math in fp32 with far less memory traffic than the composition.
    return q.device.type == "cpu" and dropout_p == 0.0


def _unit_last_stride(*tensors):
    # PyTorch's CPU flash kernels (2.13 at least) read the head dim as if its stride were 1: a view with another
    # stride there (x[..., ::2]) gives a wrong answer, silently. Copy such rare views; other strides are honoured.
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _is_empty(q, k):
    # No query or no key (T = 0, H = 0, B = 0): PyTorch's CPU flash kernel divides by zero (SIGFPE) on such shapes,
    # and the composition's row max has nothing to reduce. The answer is known: zeros, lse -inf, zero gradients.
    return q.numel() == 0 or k.numel() == 0


def _attention_fwd_torch(q, k, v, key_padding_mask, dropout_p, scale, seed):
    if _is_empty(q, k):
        b, tq, h, _ = q.shape
        lse = torch.full((b, h, tq), float("-inf"), dtype=torch.float32, device=q.device)
        return q.new_zeros((b, tq, h, v.shape[-1])), lse
    if _use_cpu_flash(q, dropout_p):
        q, k, v = _unit_last_stride(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
            attn_mask=_padding_bias(key_padding_mask, q.dtype), scale=scale,
        )
        lse = lse.float()
        if key_padding_mask is not None:
            empty = ~key_padding_mask.any(dim=1)  # (B,) sequences with no real token: lse is -inf by definition
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
        return out.transpose(1, 2).contiguous(), lse.contiguous()
    probs, lse = _probs_and_lse(_scores_fp32(q, k, key_padding_mask, scale))
    if dropout_p > 0.0:
        probs = probs * dropout_scale_mask(seed, probs.shape, dropout_p, q.device)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(q.dtype).contiguous(), lse


def _attention_bwd_torch(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed):
    # In fp32 the composition below is measurably more accurate than the CPU flash backward (which recomputes
    # probabilities blockwise from lse); in half precision the flash kernel, run in fp32, is as accurate and faster.
    if _is_empty(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if _use_cpu_flash(q, dropout_p) and q.dtype != torch.float32:
        # In fp32 on a recomputed fp32 output: the kernel's row term rowsum(dO * O) taken from the saved half O
        # carries O's rounding, which does not cancel where the exact gradient does (near one-hot rows), and gave
        # gradients off by the dtype's resolution where they are far smaller (found by tests/fuzz). The fp32 forward
        # + backward costs no more than the half-precision backward on CPU.
        q32, k32, v32, dout32 = (t.float().transpose(1, 2) for t in _unit_last_stride(q, k, v, dout))
        bias = _padding_bias(key_padding_mask, torch.float32)
        out32, lse32 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q32, k32, v32, 0.0, False, attn_mask=bias, scale=scale
        )
        # The backward wants a finite lse on rows with no real key (their probabilities are all exp(-inf) = 0).
        finite_lse = torch.where(torch.isfinite(lse32), lse32, torch.zeros_like(lse32))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout32, q32, k32, v32, out32, finite_lse, 0.0, False, attn_mask=bias, scale=scale,
        )
        return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v), strict=True))
    probs, _ = _probs_and_lse(_scores_fp32(q, k, key_padding_mask, scale))
    dout32 = dout.float()
    dprobs_dropped = torch.einsum("bqhd,bkhd->bhqk", dout32, v.float())
    if dropout_p > 0.0:
        drop = dropout_scale_mask(seed, probs.shape, dropout_p, q.device)
        dv = torch.einsum("bhqk,bqhd->bkhd", probs * drop, dout32)
        dprobs = dprobs_dropped * drop
    else:
        dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout32)
        dprobs = dprobs_dropped
    dscores = probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k.float())
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.float())
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


_backend.register_impl("attention_fwd", "torch", _attention_fwd_torch)
_backend.register_impl("attention_bwd", "torch", _attention_bwd_torch)

# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("fastbert::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    dropout_p: float,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """out: (B, Tq, H, D) in q's dtype; lse: (B, H, Tq) fp32 log-sum-exp of the scaled, masked scores."""
    return _backend.impl("attention_fwd", q.device.type)(q, k, v, key_padding_mask, dropout_p, scale, seed)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, dropout_p, scale, seed):
    b, tq, h, _ = q.shape
    return q.new_empty((b, tq, h, v.shape[-1])), q.new_empty((b, h, tq), dtype=torch.float32)


@torch.library.custom_op("fastbert::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    dropout_p: float,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv with the shapes and dtypes of q, k, v."""
    fn = _backend.impl("attention_bwd", q.device.type)
    return fn(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    args = (dout.contiguous(), q, k, v, out, lse, key_padding_mask, ctx.dropout_p, ctx.scale, seed)
    dq, dk, dv = _backend.call_backward(ctx, attention_bwd, "attention_bwd", *args)
    return dq, dk, dv, None, None, None, None


_backend.register_autograd(attention_fwd, "attention_fwd", "attention_bwd", _backward, _setup_context)

# --------------------------------------------------------------------------------------------------------------
# public API


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, keys masked) v, bidirectional.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim); fp32, fp16 or bf16, one dtype.
    key_padding_mask: (batch, seqlen_k) bool, True for real tokens (an int 0/1 mask is accepted), or None.
    dropout_p: dropout on the attention probabilities (pass 0.0 in eval). scale: default 1/sqrt(headdim).
    Returns (batch, seqlen_q, nheads, headdim) in q's dtype; rows whose keys are all padding are zeros. Under
    torch.autocast, q, k and v are cast to the autocast dtype first, as for scaled_dot_product_attention.
    """
    check_tensor("q", q, ndim=4)
    q, k, v = autocast_inputs("lower", q, k, v)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), like=q)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), like=q)
    b, _, h, d = q.shape
    if d == 0:
        raise ValueError(f"q has shape {tuple(q.shape)}: headdim must be >= 1")
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected (batch={b}, seqlen_k, nheads={h}, headdim={d})")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; it must match k's shape {tuple(k.shape)}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=None, like=q)
        if tuple(key_padding_mask.shape) != (b, k.shape[1]):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (batch, seqlen_k) = "
                f"({b}, {k.shape[1]})"
            )
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p == 1.0:  # nn.Dropout(p=1.0) drops every probability, as in transformers
        from fastbert.ops._utils import all_dropped_attention

        return all_dropped_attention(q, k, v)
    scale = 1.0 / math.sqrt(d) if scale is None else check_scale(scale)
    seed = new_seed() if dropout_p > 0.0 else None
    out, _ = _backend.call(attention_fwd, "attention_fwd", q, k, v, key_padding_mask, dropout_p, scale, seed)
    return out


__all__ = ["attention", "attention_fwd", "attention_bwd"]
