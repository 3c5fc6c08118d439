"""Float64 NumPy reference for bias + GELU, and bias + GELU + LayerNorm (the MLM head transform).

BERT's "gelu" is the exact erf form, 0.5 * x * (1 + erf(x / sqrt(2))); "tanh" is the approximation
0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) used by gelu_new / gelu_pytorch_tanh / gelu_fast.
NumPy has no erf, so the exact form maps math.erf (correctly rounded to within an ulp) over the elements;
a polynomial approximation would make the ground truth itself a source of error.
"""

import math

import numpy as np

from fastbert.ops.layer_norm.reference import layer_norm_bwd_ref, layer_norm_fwd_ref

__all__ = [
    "bias_gelu_bwd_ref",
    "bias_gelu_fwd_ref",
    "bias_gelu_layer_norm_bwd_ref",
    "bias_gelu_layer_norm_fwd_ref",
    "gelu_grad_ref",
    "gelu_ref",
]

_APPROXIMATIONS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_COEFF = 0.044715
# erf(t) rounds to exactly +-1 in float64 for |t| >= 6, so only smaller arguments go through math.erf.
_ERF_SATURATION = 6.0


def _check_approximate(approximate):
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")


def _erf(t):
    """Elementwise erf of a float64 array, via math.erf (about 0.1 us per element)."""
    out = np.sign(t)
    small = np.abs(t) < _ERF_SATURATION
    values = t[small]
    # fromiter over a list is ~25% faster than np.frompyfunc and gives a float64 array directly.
    out[small] = np.fromiter(map(math.erf, values.tolist()), dtype=np.float64, count=values.size)
    return out


def _tanh_inner(x):
    return _SQRT_2_OVER_PI * (x + _TANH_COEFF * x * x * x)


def gelu_ref(x, approximate="none"):
    """GELU of x: (...) -> (...) float64. approximate: "none" (exact erf) or "tanh"."""
    _check_approximate(approximate)
    x = np.asarray(x, dtype=np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(_tanh_inner(x)))
    return 0.5 * x * (1.0 + _erf(x * _INV_SQRT_2))


def gelu_grad_ref(x, approximate="none"):
    """d gelu(x) / dx: (...) -> (...) float64. approximate: "none" (exact erf) or "tanh"."""
    _check_approximate(approximate)
    x = np.asarray(x, dtype=np.float64)
    if approximate == "tanh":
        tanh = np.tanh(_tanh_inner(x))
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_COEFF * x * x)
        return 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh * tanh) * dinner
    cdf = 0.5 * (1.0 + _erf(x * _INV_SQRT_2))
    pdf = _INV_SQRT_2PI * np.exp(-0.5 * x * x)
    return cdf + x * pdf


def _add_bias(x, bias):
    """Return x + bias in float64; x: (..., hidden), bias: (hidden,) or None."""
    x = np.asarray(x, dtype=np.float64)
    if bias is None:
        return x
    bias = np.asarray(bias, dtype=np.float64)
    if x.ndim < 1 or bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must have shape (hidden,) matching x's last dim; got bias {bias.shape}, x {x.shape}")
    return x + bias


def _sum_to_bias(grad, bias):
    """Reduce grad (..., hidden) to (hidden,), or None when there is no bias."""
    return None if bias is None else grad.reshape(-1, grad.shape[-1]).sum(axis=0)


def bias_gelu_fwd_ref(x, bias, approximate="none"):
    """gelu(x + bias). x: (..., hidden); bias: (hidden,) or None. Returns (..., hidden) float64."""
    return gelu_ref(_add_bias(x, bias), approximate)


def bias_gelu_bwd_ref(dout, x, bias, approximate="none"):
    """Gradients of bias_gelu_fwd_ref.

    dout, x: (..., hidden); bias: (hidden,) or None.
    Returns dx: (..., hidden) and dbias: (hidden,), or None when bias is None.
    """
    preact = _add_bias(x, bias)
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != preact.shape:
        raise ValueError(f"dout shape {dout.shape} must equal x shape {preact.shape}")
    dx = dout * gelu_grad_ref(preact, approximate)
    return dx, _sum_to_bias(dx, bias)


def bias_gelu_layer_norm_fwd_ref(x, bias, weight, ln_bias, eps, approximate="none"):
    """LayerNorm(gelu(x + bias)) over the last dim: BERT's MLM head transform after its dense layer.

    x: (..., hidden); bias: (hidden,) or None (the dense bias); weight, ln_bias: (hidden,) or None (LayerNorm).
    Returns out: (..., hidden), mean: x.shape[:-1], rstd: x.shape[:-1], all float64 (statistics of the GELU output).
    """
    activated = bias_gelu_fwd_ref(x, bias, approximate)
    return layer_norm_fwd_ref(activated, None, weight, ln_bias, eps)


def bias_gelu_layer_norm_bwd_ref(dout, x, bias, weight, ln_bias, eps, approximate="none"):
    """Gradients of bias_gelu_layer_norm_fwd_ref (recomputes the forward).

    dout, x: (..., hidden); the other arguments as in bias_gelu_layer_norm_fwd_ref.
    Returns dx: (..., hidden), dbias: (hidden,) or None, dweight: (hidden,) or None, dln_bias: (hidden,) or None.
    """
    activated = bias_gelu_fwd_ref(x, bias, approximate)
    dactivated, _, dweight, dln_bias = layer_norm_bwd_ref(dout, activated, None, weight, ln_bias, eps)
    dx, dbias = bias_gelu_bwd_ref(dactivated, x, bias, approximate)
    return dx, dbias, dweight, dln_bias
