"""Masked, scaled softmax over attention scores: ``fastbert::softmax_fwd`` / ``softmax_bwd``.

The path that must return attention probabilities (``output_attentions=True``) materializes the scores and runs
this op instead of the fused attention. Computed in fp32 with the row max subtracted; a row whose keys are all
padding gives zeros, never NaN.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastbert.ops import _backend
from fastbert.ops._utils import autocast_inputs, check_scale, check_tensor

# --------------------------------------------------------------------------------------------------------------
# torch backend


def _softmax_fwd_torch(scores, key_padding_mask, scale):
    s = scores.float() * scale
    if key_padding_mask is None:
        return torch.softmax(s, dim=-1).to(scores.dtype)
    s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(s, dim=-1)
    # A row with no real key is softmax(all -inf) = NaN: it is defined as zeros.
    probs = probs.masked_fill(~key_padding_mask.any(dim=1)[:, None, None, None], 0.0)
    return probs.to(scores.dtype)


def _softmax_bwd_torch(dprobs, probs, scale):
    p = probs.float()
    dscores = torch.ops.aten._softmax_backward_data(dprobs.float(), p, -1, torch.float32)
    return (dscores * scale).to(probs.dtype)


_backend.register_impl("softmax_fwd", "torch", _softmax_fwd_torch)
_backend.register_impl("softmax_bwd", "torch", _softmax_bwd_torch)

# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("fastbert::softmax_fwd", mutates_args=())
def softmax_fwd(scores: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """probs: scores' shape (B, H, Tq, Tk) and dtype."""
    return _backend.impl("softmax_fwd", scores.device.type)(scores, key_padding_mask, scale)


@softmax_fwd.register_fake
def _(scores, key_padding_mask, scale):
    return scores.new_empty(scores.shape)


@torch.library.custom_op("fastbert::softmax_bwd", mutates_args=())
def softmax_bwd(dprobs: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    """dscores: probs' shape and dtype."""
    return _backend.impl("softmax_bwd", probs.device.type)(dprobs, probs, scale)


@softmax_bwd.register_fake
def _(dprobs, probs, scale):
    return probs.new_empty(probs.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale = inputs[2]


def _backward(ctx, dprobs):
    (probs,) = ctx.saved_tensors
    return _backend.call_backward(ctx, softmax_bwd, "softmax_bwd", dprobs.contiguous(), probs, ctx.scale), None, None


_backend.register_autograd(softmax_fwd, "softmax_fwd", "softmax_bwd", _backward, _setup_context)

# --------------------------------------------------------------------------------------------------------------
# public API


def softmax(scores: torch.Tensor, key_padding_mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """softmax(scores * scale) over the last dimension with padded keys excluded.

    scores: (batch, nheads, seqlen_q, seqlen_k) fp32/fp16/bf16; key_padding_mask: (batch, seqlen_k) bool, True for
    real tokens, or None. Returns scores' shape and dtype; rows with no real key are zeros. Under torch.autocast on
    CUDA the softmax runs in fp32, as autocast runs the unfused one.
    """
    check_tensor("scores", scores, ndim=4)
    (scores,) = autocast_inputs("softmax", scores)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=None, like=scores)
        expected = (scores.shape[0], scores.shape[3])
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (batch, seqlen_k) = {expected}"
            )
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
    return _backend.call(softmax_fwd, "softmax_fwd", scores, key_padding_mask, check_scale(scale))


__all__ = ["softmax", "softmax_fwd", "softmax_bwd"]
