"""Shared helpers for the op tests: the accuracy rule, same-precision PyTorch baselines, input makers.

The accuracy rule (flash-attention's): with ``ref`` the float64 NumPy result, a result in dtype D passes when
``max|result - ref| <= 2 * max|torch_D - ref| + atol``, where ``torch_D`` is a plain PyTorch composition of the
same op computed in dtype D (the ``*_baseline`` functions below). fp32 must in addition be tight:
``max|result - ref| <= 1e-5 * max(1, max|ref|)``.

Every backend is judged by the same helpers: the tests are parametrized over the backends that
``fastbert.ops.backends(device_type)`` reports available, so a backend that registers kernels is tested at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastbert.ops as ops

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [FP32, BF16, FP16]
HALF_DTYPES = [FP16, BF16]
ATOL = {FP32: 1e-6, BF16: 1e-3, FP16: 1e-3}
FP32_TIGHT = 1e-5

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def available_backends(device_type: str) -> list[str]:
    """Backends that can run on ``device_type`` here (``torch`` always; triton/cuda/cpp once they load)."""
    return [name for name, status in ops.backends(device_type).items() if status.available]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------------
# inputs and outputs


def rand(shape, dtype, device="cpu", scale=1.0, offset=0.0) -> torch.Tensor:
    """Normal(offset, scale) drawn in fp32 on the CPU (same values on every device), then cast to ``dtype``."""
    return (torch.randn(shape, dtype=torch.float32) * scale + offset).to(device=device, dtype=dtype)


def padding_mask(kind: str, batch: int, seqlen: int, device="cpu") -> torch.Tensor | None:
    """(batch, seqlen) bool key padding mask, True = real token.

    none: no mask. partial: sequence b keeps its first max(1, seqlen - b - 1) tokens (the first one is full).
    empty: like partial, but the last sequence has no real token at all (its rows must come out as zeros).
    """
    if kind == "none":
        return None
    lengths = [seqlen] + [max(1, seqlen - b - 1) for b in range(1, batch)]
    if kind == "empty":
        lengths[-1] = 0
    mask = torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]
    return mask.to(device)


def to_np(t) -> np.ndarray | None:
    if t is None:
        return None
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def fwd_bwd(fn, args: dict, grad_names, dout: torch.Tensor):
    """Run ``fn(**args)`` with fresh leaves for ``grad_names``, backprop ``dout``; return (out, {name: grad})."""
    leaves = dict(args)
    for name in grad_names:
        leaves[name] = args[name].detach().clone().requires_grad_(True)
    out = fn(**leaves)
    out.backward(dout)
    grads = {}
    for name in grad_names:
        assert leaves[name].grad is not None, f"no gradient reached {name}"
        grads[name] = leaves[name].grad.detach()
    return out.detach(), grads


# ----------------------------------------------------------------------------------------------------------------
# the rule


def assert_matches_ref(name: str, result, ref, baseline, dtype: torch.dtype, atol: float | None = None) -> float:
    """Apply the accuracy rule to one output; returns max|result - ref|.

    result: the backend's output (tensor); ref: the float64 NumPy result; baseline: the same-dtype plain PyTorch
    composition's output (tensor). Also asserts shapes agree and everything is finite.
    """
    result_np, base_np = to_np(result), to_np(baseline)
    ref = np.asarray(ref, dtype=np.float64)
    assert result_np.shape == ref.shape, f"{name}: shape {result_np.shape}, reference has {ref.shape}"
    assert np.isfinite(result_np).all(), f"{name}: {np.count_nonzero(~np.isfinite(result_np))} non-finite values"
    assert np.isfinite(base_np).all(), f"{name}: the {dtype_id(dtype)} baseline itself is not finite (test bug)"
    err = float(np.max(np.abs(result_np - ref), initial=0.0))
    base_err = float(np.max(np.abs(base_np - ref), initial=0.0))
    atol = ATOL[dtype] if atol is None else atol
    bound = 2.0 * base_err + atol
    assert err <= bound, (
        f"{name} ({dtype_id(dtype)}): max|result - ref| = {err:.3e} > 2 * max|torch_{dtype_id(dtype)} - ref| "
        f"({base_err:.3e}) + atol ({atol:.0e}) = {bound:.3e}"
    )
    if dtype == FP32:
        tight = FP32_TIGHT * max(1.0, float(np.max(np.abs(ref), initial=0.0)))
        assert err <= tight, f"{name} (float32): max|result - ref| = {err:.3e} > {tight:.3e} (1e-5 at unit scale)"
    return err


def assert_all_match(names, results: dict, refs: dict, baselines: dict, dtype: torch.dtype) -> None:
    for name in names:
        assert_matches_ref(name, results[name], refs[name], baselines[name], dtype)


def assert_same(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Same answer up to the dtype's rounding (for layout changes: non-contiguous vs contiguous)."""
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# same-dtype plain PyTorch baselines (torch_D of the rule). Each computes in its inputs' dtype and is
# differentiable by ordinary autograd.


def attention_baseline(q, k, v, key_padding_mask=None, scale=None, dropout_mask=None):
    """matmul-softmax-matmul in q's dtype. q: (B, Tq, H, D); k, v: (B, Tk, H, D); mask (B, Tk) bool."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Tq, Tk)
    probs = _masked_softmax(scores, key_padding_mask)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def softmax_baseline(scores, key_padding_mask=None, scale=1.0):
    """torch.softmax in scores' dtype. scores: (B, H, Tq, Tk); mask (B, Tk) bool."""
    return _masked_softmax(scores * scale, key_padding_mask)


def _masked_softmax(scores, key_padding_mask):
    if key_padding_mask is None:
        return torch.softmax(scores, dim=-1)
    has_key = key_padding_mask.any(dim=-1)  # (B,)
    # A sequence without real keys attends to everything, then is zeroed: no -inf-only rows, so no NaN in autograd.
    keep = key_padding_mask | ~has_key[:, None]
    probs = torch.softmax(scores.masked_fill(~keep[:, None, None, :], float("-inf")), dim=-1)
    return probs * has_key[:, None, None, None].to(probs.dtype)


def with_dresidual(grads):
    """fastbert::add_layer_norm_bwd's (dx, dresidual, dweight, dbias) from a call with a residual and no dropout,
    where the op returns dresidual empty (the residual's gradient is dx), with dx filled in for dresidual."""
    dx, dresidual, dweight, dbias = grads
    assert dresidual.numel() == 0, "without dropout the op must not write dresidual (it equals dx)"
    return dx, dx, dweight, dbias


def add_layer_norm_baseline(x, residual, weight, bias, eps, dropout_mask=None):
    """F.layer_norm(x * dropout_mask + residual) in x's dtype."""
    z = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    if residual is not None:
        z = z + residual
    return F.layer_norm(z, (x.shape[-1],), weight, bias, eps)


def bias_gelu_baseline(x, bias, approximate="none"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def bias_gelu_layer_norm_baseline(x, bias, weight, ln_bias, eps, approximate="none"):
    return F.layer_norm(bias_gelu_baseline(x, bias, approximate), (x.shape[-1],), weight, ln_bias, eps)
