"""Helpers shared by the op packages: dropout seeds and masks, argument checks."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Under torch.autocast each op takes the dtypes its unfused twin would get there: attention runs in the autocast
# dtype (scaled_dot_product_attention is on both devices' lower-precision lists); LayerNorm and softmax run in fp32 on
# CUDA (autocast's fp32 list) and in their inputs' promoted dtype on CPU (on neither CPU list); GELU and adds follow
# type promotion everywhere.
_FP32_UNDER_AUTOCAST = {"cuda": frozenset({"layer_norm", "softmax"})}


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype of the autocast region active for ``t``'s device, or None outside one."""
    device_type = t.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(kind: str, *tensors):
    """``tensors`` (None entries kept) cast as autocast would cast the inputs of the unfused ``kind`` of op.

    kind: "lower" (matmul-like: to the autocast dtype), "promote" (to the tensors' promoted dtype), or "layer_norm" /
    "softmax" (fp32 where that device's autocast runs them in fp32, else promote). Outside autocast, or for
    non-float tensors, the tensors come back as they are.
    """
    first = next(t for t in tensors if t is not None)
    lower = autocast_dtype(first)
    if lower is None or not first.is_floating_point():
        return tensors
    if kind == "lower":
        target = lower
    elif kind in _FP32_UNDER_AUTOCAST.get(first.device.type, ()):
        target = torch.float32
    else:
        target = first.dtype
        for t in tensors:
            if t is not None:
                target = torch.promote_types(target, t.dtype)
    return tuple(t if t is None or t.dtype == target else t.to(target) for t in tensors)


def new_seed() -> torch.Tensor:
    """A dropout seed drawn from torch's default CPU generator, as a (1,) int64 CPU tensor.

    A tensor (not an int) so that `torch.compile(fullgraph=True)` traces it without a graph break; it lives on the
    CPU so that reading it never synchronizes a GPU. `torch.manual_seed` makes the sequence of seeds reproducible.
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def dropout_scale_mask(seed: torch.Tensor, shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """The torch backend's dropout mask: 0 where dropped, 1/(1-p) where kept, drawn from `seed`.

    The forward and backward passes regenerate the same mask from the same seed instead of storing it.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.reshape(-1)[0].item()))
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) * (1.0 / (1.0 - p))


def check_tensor(name: str, t, *, ndim=None, dtypes=FLOAT_DTYPES, like: torch.Tensor | None = None) -> None:
    """Raise a TypeError/ValueError naming `name` when `t` is not a tensor of the expected rank, dtype or device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; use one of {names} (e.g. {name}.to(torch.float32))")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}; move it with .to({like.device})")


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() != 1 or isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}") from None


def check_dropout_p(dropout_p: float) -> float:
    """A dropout probability in [0, 1]. 1.0 drops everything, as nn.Dropout(p=1.0) does in transformers; the ops
    handle it before any kernel runs (a kernel's 1 / (1 - p) scale would be infinite)."""
    dropout_p = _as_float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p} (pass 0.0 in eval)")
    return dropout_p


def all_dropped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention under dropout_p = 1.0: every probability is dropped, so the output is 0 @ v, zeros shaped like q.
    Built from q, k and v times zero so that all three get the zero gradients transformers gives them."""
    return q * 0.0 + (k * 0.0).sum() + (v * 0.0).sum()


def check_eps(eps: float) -> float:
    """LayerNorm's eps: finite and > 0. eps = 0 divides by zero on a constant row (rstd = inf, out = NaN)."""
    eps = _as_float("eps", eps)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be a finite float > 0 (BERT's layer_norm_eps is 1e-12), got {eps}")
    return eps


def check_scale(scale: float) -> float:
    """A softmax / attention scale: finite (NaN or inf scores would make every probability NaN)."""
    scale = _as_float("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float (default 1/sqrt(headdim)), got {scale}")
    return scale


def check_hidden_params(x: torch.Tensor, required=("weight",), **params) -> None:
    """Per-feature parameters (weight, bias, ...) must be 1-D of size x.shape[-1] on x's device; those not in
    ``required`` may be None. x must have at least one dimension (the features)."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden features); got a 0-dim tensor")
    hidden = x.shape[-1]
    if hidden == 0:  # a LayerNorm of no features has no mean; no BERT layer has width 0
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension (the hidden features) must be >= 1")
    for name, p in params.items():
        if p is None:
            if name in required:
                raise TypeError(f"{name} must be a tensor of shape ({hidden},), got None")
            continue
        check_tensor(name, p, ndim=1, like=x)
        if p.shape[0] != hidden:
            raise ValueError(f"{name} has {p.shape[0]} features but the input's last dimension is {hidden}")
