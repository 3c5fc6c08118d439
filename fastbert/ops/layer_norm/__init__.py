"""Residual-add + dropout + LayerNorm: ``fastbert::add_layer_norm_fwd`` / ``add_layer_norm_bwd``.

out = LayerNorm(dropout(x) + residual) over the last dimension, BERT's post-LN sublayer output. Statistics
(mean, rstd) are computed and saved in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastbert.ops import _backend
from fastbert.ops._utils import (
    autocast_inputs,
    check_dropout_p,
    check_eps,
    check_hidden_params,
    check_tensor,
    dropout_scale_mask,
    new_seed,
)

# --------------------------------------------------------------------------------------------------------------
# torch backend


def _pre_norm_sum(x, residual, dropout_p, seed):
    """z = dropout(x) + residual, in x's dtype when no upcast is needed."""
    z = x.contiguous()
    if dropout_p > 0.0:
        z = z * dropout_scale_mask(seed, x.shape, dropout_p, x.device, x.dtype)
    if residual is not None:
        z = z + residual
    return z


def _native_layer_norm_fp32(z, weight, bias, eps):
    """(out in z's dtype, mean fp32, rstd fp32), all with z's leading shape; upcasts half inputs to fp32."""
    hidden = z.shape[-1]
    if z.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        out, mean, rstd = torch.native_layer_norm(z, (hidden,), weight, bias, eps)
    else:
        out, mean, rstd = torch.native_layer_norm(
            z.float(), (hidden,), weight.float(), None if bias is None else bias.float(), eps
        )
        out = out.to(z.dtype)
    return out, mean.squeeze(-1).float(), rstd.squeeze(-1).float()


def _native_layer_norm_bwd_fp32(dout, z, mean, rstd, weight, bias):
    """(dz in z's dtype, dweight, dbias in the parameters' dtypes; dbias empty without bias), out = LayerNorm(z)."""
    hidden = z.shape[-1]
    mask = [True, True, bias is not None]
    dz, dw, db = torch.ops.aten.native_layer_norm_backward(
        dout.float(),
        z.float(),
        (hidden,),
        mean.unsqueeze(-1),
        rstd.unsqueeze(-1),
        weight.float(),
        None if bias is None else bias.float(),
        mask,
    )
    return dz.to(z.dtype), dw.to(weight.dtype), weight.new_empty(0) if bias is None else db.to(bias.dtype)


def _add_layer_norm_fwd_torch(x, residual, weight, bias, eps, dropout_p, seed):
    z = _pre_norm_sum(x, residual, dropout_p, seed)
    return _native_layer_norm_fp32(z, weight, bias, eps)


def _add_layer_norm_bwd_torch(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed):
    # z is recomputed (one add) rather than saved: x and residual are alive anyway for the surrounding matmuls.
    z = _pre_norm_sum(x, residual, dropout_p, seed)
    dz, dweight, dbias = _native_layer_norm_bwd_fp32(dout, z, mean, rstd, weight, bias)
    dx = dz if dropout_p == 0.0 else dz * dropout_scale_mask(seed, x.shape, dropout_p, x.device, dz.dtype)
    dresidual = x.new_empty(0) if residual is None or dropout_p == 0.0 else dz.to(residual.dtype).contiguous()
    return dx.to(x.dtype).contiguous(), dresidual, dweight, dbias


_backend.register_impl("add_layer_norm_fwd", "torch", _add_layer_norm_fwd_torch)
_backend.register_impl("add_layer_norm_bwd", "torch", _add_layer_norm_bwd_torch)

# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("fastbert::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out: x's shape and dtype; mean, rstd: x.shape[:-1] in fp32."""
    return _backend.impl("add_layer_norm_fwd", x.device.type)(x, residual, weight, bias, eps, dropout_p, seed)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


@torch.library.custom_op("fastbert::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dresidual, dweight, dbias; dbias is empty (numel 0) when bias is None.

    dresidual is the residual's gradient only with dropout (dropout_p > 0), where it differs from dx; otherwise it is
    empty (numel 0), and the residual's gradient is dx: every backend writes dz once, not twice.
    """
    fn = _backend.impl("add_layer_norm_bwd", x.device.type)
    return fn(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed)


def _add_layer_norm_bwd_fake(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed):
    """Shapes of the backward's outputs (also those of the native fastbert_ext op)."""
    return (
        x.new_empty(x.shape),
        residual.new_empty(residual.shape) if residual is not None and dropout_p > 0.0 else x.new_empty(0),
        weight.new_empty(weight.shape),
        weight.new_empty(0) if bias is None else bias.new_empty(bias.shape),
    )


add_layer_norm_bwd.register_fake(_add_layer_norm_bwd_fake)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p


def _backward(ctx, dout, dmean, drstd):
    x, residual, weight, bias, mean, rstd, seed = ctx.saved_tensors
    args = (dout.contiguous(), x, residual, weight, bias, mean, rstd, ctx.dropout_p, seed)
    dx, dresidual, dweight, dbias = _backend.call_backward(ctx, add_layer_norm_bwd, "add_layer_norm_bwd", *args)
    if residual is not None and ctx.dropout_p == 0.0:  # the op returned no dresidual: it equals dx
        dresidual = dx if residual.dtype == dx.dtype else dx.to(residual.dtype)
    return dx, None if residual is None else dresidual, dweight, None if bias is None else dbias, None, None, None


_backend.register_autograd(add_layer_norm_fwd, "add_layer_norm_fwd", "add_layer_norm_bwd", _backward, _setup_context)

# --------------------------------------------------------------------------------------------------------------
# public API


def add_layer_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float = 1e-12,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LayerNorm(dropout(x) + residual) over the last dimension.

    x: (..., hidden) fp32/fp16/bf16; residual: x's shape and dtype, or None; weight, bias: (hidden,) (bias may be
    None), any float dtype. eps: BERT's layer_norm_eps (1e-12). Returns x's shape and dtype. Under torch.autocast, x
    and residual are first cast as the unfused ops would cast them: to their promoted dtype (a bf16 sublayer output
    plus an fp32 residual gives fp32), and to fp32 on CUDA, where autocast runs LayerNorm in fp32.
    """
    check_tensor("x", x)
    x, residual = autocast_inputs("layer_norm", x, residual)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), like=x)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; they must match")
    check_hidden_params(x, weight=weight, bias=bias)
    dropout_p = check_dropout_p(dropout_p)
    if dropout_p == 1.0:  # nn.Dropout(p=1.0) zeroes x: LayerNorm(0 + residual)
        x, dropout_p = x * 0.0, 0.0
    seed = new_seed() if dropout_p > 0.0 else None
    out, _, _ = _backend.call(
        add_layer_norm_fwd, "add_layer_norm_fwd", x, residual, weight, bias, check_eps(eps), dropout_p, seed
    )
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """LayerNorm(x) over the last dimension; see :func:`add_layer_norm`."""
    return add_layer_norm(x, None, weight, bias, eps)


__all__ = ["add_layer_norm", "layer_norm", "add_layer_norm_fwd", "add_layer_norm_bwd"]
