"""Bias + GELU, and the MLM head's bias + GELU + LayerNorm.

``fastbert::bias_gelu_fwd`` / ``bias_gelu_bwd``: out = gelu(x + bias), the FFN intermediate activation after a
bias-free matmul. ``fastbert::bias_gelu_layer_norm_fwd`` / ``_bwd``: out = LayerNorm(gelu(x + bias)), the
prediction-head transform. GELU is exact (erf) unless ``approximate="tanh"`` (configs with gelu_new & co.).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastbert.ops import _backend
from fastbert.ops._utils import autocast_inputs, check_eps, check_hidden_params, check_tensor
from fastbert.ops.layer_norm import _native_layer_norm_bwd_fp32, _native_layer_norm_fp32

APPROXIMATIONS = ("none", "tanh")

# --------------------------------------------------------------------------------------------------------------
# torch backend


def _add_bias(x, bias):
    return x if bias is None else x + bias.to(x.dtype)


def _bias_gelu_fwd_torch(x, bias, approximate):
    return torch.nn.functional.gelu(_add_bias(x, bias), approximate=approximate).contiguous()


def _bias_gelu_fwd_inplace_torch(x, bias, approximate):
    if bias is not None:
        x.add_(bias.to(x.dtype))
    torch.ops.aten.gelu_(x, approximate=approximate)


def _bias_gelu_bwd_torch(dout, x, bias, approximate, need_dbias):
    dx = torch.ops.aten.gelu_backward(dout, _add_bias(x, bias), approximate=approximate).contiguous()
    return dx, _dbias(dx, bias, need_dbias)


def _bias_gelu_layer_norm_fwd_torch(x, bias, weight, ln_bias, eps, approximate):
    return _native_layer_norm_fp32(_bias_gelu_fwd_torch(x, bias, approximate), weight, ln_bias, eps)


def _bias_gelu_layer_norm_bwd_torch(dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias):
    # gelu(x + bias) is recomputed instead of saved: one elementwise op against a (tokens, hidden) activation.
    y = _bias_gelu_fwd_torch(x, bias, approximate)
    dy, dweight, dln_bias = _native_layer_norm_bwd_fp32(dout, y, mean, rstd, weight, ln_bias)
    return (*_bias_gelu_bwd_torch(dy, x, bias, approximate, need_dbias), dweight, dln_bias)


def _dbias(dx, bias, need_dbias):
    """The bias's gradient from dx = d(x + bias), summed over every leading dimension, in the bias's dtype; empty
    (numel 0, dx's dtype) unless need_dbias and there is a bias. The backends that have no fused column sum use this.
    torch's sum accumulates in fp32 for half inputs; an explicit fp32 result is only needed when the bias is wider
    than dx (fp32 bias, bf16 activations)."""
    if not need_dbias or bias is None:
        return dx.new_empty(0)
    rows = dx.reshape(-1, dx.shape[-1])
    if bias.dtype == dx.dtype:
        return rows.sum(dim=0)
    return rows.sum(dim=0, dtype=torch.float32).to(bias.dtype)


_backend.register_impl("bias_gelu_fwd", "torch", _bias_gelu_fwd_torch)
_backend.register_impl("bias_gelu_fwd_", "torch", _bias_gelu_fwd_inplace_torch)
_backend.register_impl("bias_gelu_bwd", "torch", _bias_gelu_bwd_torch)
_backend.register_impl("bias_gelu_layer_norm_fwd", "torch", _bias_gelu_layer_norm_fwd_torch)
_backend.register_impl("bias_gelu_layer_norm_bwd", "torch", _bias_gelu_layer_norm_bwd_torch)

# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("fastbert::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    """gelu(x + bias): x's shape and dtype."""
    return _backend.impl("bias_gelu_fwd", x.device.type)(x, bias, approximate)


@bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastbert::bias_gelu_fwd_", mutates_args=("x",))
def bias_gelu_fwd_(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> None:
    """x <- gelu(x + bias) in place (x contiguous); no autograd: for inference, where x is a dead temporary."""
    _backend.impl("bias_gelu_fwd_", x.device.type)(x, bias, approximate)


@torch.library.custom_op("fastbert::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(
    dout: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str, need_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = d(x + bias) (x's shape and dtype) and dbias, its sum over the leading dimensions (bias's dtype; empty,
    numel 0, unless need_dbias and there is a bias)."""
    return _backend.impl("bias_gelu_bwd", x.device.type)(dout, x, bias, approximate, need_dbias)


def _bias_gelu_bwd_fake(dout, x, bias, approximate, need_dbias):
    """Shapes of the backward's outputs (also those of the native fastbert_ext op)."""
    return x.new_empty(x.shape), _dbias_fake(x, bias, need_dbias)


def _dbias_fake(x, bias, need_dbias):
    return bias.new_empty(bias.shape) if need_dbias and bias is not None else x.new_empty(0)


bias_gelu_bwd.register_fake(_bias_gelu_bwd_fake)


def _bias_gelu_setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_backward(ctx, dout):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    args = (dout.contiguous(), x, bias, ctx.approximate, need_dbias)
    dx, dbias = _backend.call_backward(ctx, bias_gelu_bwd, "bias_gelu_bwd", *args)
    return dx, dbias if need_dbias else None, None


_backend.register_autograd(
    bias_gelu_fwd, "bias_gelu_fwd", "bias_gelu_bwd", _bias_gelu_backward, _bias_gelu_setup_context
)


@torch.library.custom_op("fastbert::bias_gelu_layer_norm_fwd", mutates_args=())
def bias_gelu_layer_norm_fwd(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    ln_bias: Optional[torch.Tensor],
    eps: float,
    approximate: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out: x's shape and dtype; mean, rstd: x.shape[:-1] in fp32."""
    fn = _backend.impl("bias_gelu_layer_norm_fwd", x.device.type)
    return fn(x, bias, weight, ln_bias, eps, approximate)


@bias_gelu_layer_norm_fwd.register_fake
def _(x, bias, weight, ln_bias, eps, approximate):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


@torch.library.custom_op("fastbert::bias_gelu_layer_norm_bwd", mutates_args=())
def bias_gelu_layer_norm_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    ln_bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    approximate: str,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's shape and dtype), dbias (as in bias_gelu_bwd), dweight, dln_bias (empty without ln_bias)."""
    fn = _backend.impl("bias_gelu_layer_norm_bwd", x.device.type)
    return fn(dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias)


def _bias_gelu_layer_norm_bwd_fake(dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias):
    """Shapes of the backward's outputs (also those of the native fastbert_ext op)."""
    dln_bias = weight.new_empty(0) if ln_bias is None else ln_bias.new_empty(ln_bias.shape)
    return x.new_empty(x.shape), _dbias_fake(x, bias, need_dbias), weight.new_empty(weight.shape), dln_bias


bias_gelu_layer_norm_bwd.register_fake(_bias_gelu_layer_norm_bwd_fake)


def _bias_gelu_layer_norm_setup_context(ctx, inputs, output):
    x, bias, weight, ln_bias, eps, approximate = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, bias, weight, ln_bias, mean, rstd)
    ctx.approximate = approximate


def _bias_gelu_layer_norm_backward(ctx, dout, dmean, drstd):
    x, bias, weight, ln_bias, mean, rstd = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    args = (dout.contiguous(), x, bias, weight, ln_bias, mean, rstd, ctx.approximate, need_dbias)
    grads = _backend.call_backward(ctx, bias_gelu_layer_norm_bwd, "bias_gelu_layer_norm_bwd", *args)
    dx, dbias, dweight, dln_bias = grads
    return dx, dbias if need_dbias else None, dweight, None if ln_bias is None else dln_bias, None, None


_backend.register_autograd(
    bias_gelu_layer_norm_fwd,
    "bias_gelu_layer_norm_fwd",
    "bias_gelu_layer_norm_bwd",
    _bias_gelu_layer_norm_backward,
    _bias_gelu_layer_norm_setup_context,
)

# --------------------------------------------------------------------------------------------------------------
# public API


def _check_approximate(approximate: str) -> str:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' (exact erf GELU) or 'tanh', got {approximate!r}")
    return approximate


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias). x: (..., hidden) fp32/fp16/bf16; bias: (hidden,) or None. Returns x's shape and dtype (under
    torch.autocast, x and bias's promoted dtype, as for the unfused add)."""
    check_tensor("x", x)
    x, bias = autocast_inputs("promote", x, bias)
    check_hidden_params(x, bias=bias)
    return _backend.call(bias_gelu_fwd, "bias_gelu_fwd", x, bias, _check_approximate(approximate))


def bias_gelu_(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    """In-place :func:`bias_gelu`: overwrites x with gelu(x + bias) and returns it. For inference on a temporary
    (the FFN's up-projection output): it saves allocating, and on CPU page-faulting in, a second activation of that
    size. x must be contiguous and must not need autograd (use :func:`bias_gelu` when training).
    """
    check_tensor("x", x)
    check_hidden_params(x, bias=bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            "bias_gelu_ overwrites x in place, which autograd cannot differentiate; use fastbert.ops.bias_gelu "
            "when gradients are needed, or call it under torch.no_grad() / torch.inference_mode()"
        )
    if not x.is_contiguous():
        raise ValueError("bias_gelu_ overwrites x in place, so x must be contiguous; use fastbert.ops.bias_gelu")
    _backend.call(bias_gelu_fwd_, "bias_gelu_fwd_", x, bias, _check_approximate(approximate))
    return x


def bias_gelu_layer_norm(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    ln_bias: Optional[torch.Tensor],
    eps: float = 1e-12,
    approximate: str = "none",
) -> torch.Tensor:
    """LayerNorm(gelu(x + bias)) over the last dimension (the MLM head transform after its bias-free matmul).

    x: (..., hidden); bias, weight, ln_bias: (hidden,) (bias and ln_bias may be None). Returns x's shape and dtype.
    Under torch.autocast, x and bias are promoted as for the unfused add, and go to fp32 on CUDA, where autocast runs
    LayerNorm in fp32.
    """
    check_tensor("x", x)
    x, bias = autocast_inputs("layer_norm", x, bias)
    check_hidden_params(x, bias=bias, weight=weight, ln_bias=ln_bias)
    out, _, _ = _backend.call(
        bias_gelu_layer_norm_fwd, "bias_gelu_layer_norm_fwd", x, bias, weight, ln_bias, check_eps(eps),
        _check_approximate(approximate),
    )
    return out


__all__ = ["bias_gelu", "bias_gelu_", "bias_gelu_layer_norm", "bias_gelu_fwd", "bias_gelu_fwd_", "bias_gelu_bwd"]
