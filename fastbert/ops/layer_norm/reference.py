"""Float64 NumPy reference for the fused dropout + residual add + LayerNorm: the ground truth in tests.

BERT is post-LN: every sublayer ends in LayerNorm(dropout(sublayer_out) + residual). The fused op computes
    z = x * dropout_mask + residual
    out = (z - mean(z)) * rstd * weight + bias,   rstd = 1 / sqrt(var(z) + eps)   (biased variance)
over the last dim, and saves mean and rstd for the backward like flash-attention's layer_norm.
"""

import numpy as np

__all__ = ["layer_norm_bwd_ref", "layer_norm_fwd_ref"]


def _prepare(x, residual, weight, bias, dropout_mask):
    """Cast to float64 and check shapes; return (x, residual, weight, bias, dropout_mask)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1:
        raise ValueError("x must have at least one dim (..., hidden)")
    hidden = x.shape[-1]
    if residual is not None:
        residual = np.asarray(residual, dtype=np.float64)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {residual.shape} must equal x shape {x.shape}")
    if dropout_mask is not None:
        dropout_mask = np.asarray(dropout_mask, dtype=np.float64)
        if dropout_mask.shape != x.shape:
            raise ValueError(f"dropout_mask shape {dropout_mask.shape} must equal x shape {x.shape}")
    if weight is not None:
        weight = np.asarray(weight, dtype=np.float64)
        if weight.shape != (hidden,):
            raise ValueError(f"weight must have shape (hidden,) = {(hidden,)}, got {weight.shape}")
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (hidden,):
            raise ValueError(f"bias must have shape (hidden,) = {(hidden,)}, got {bias.shape}")
    return x, residual, weight, bias, dropout_mask


def _normalize(x, residual, eps, dropout_mask):
    """Return (xhat, mean, rstd) of z = x * dropout_mask + residual; xhat has x's shape."""
    z = x if dropout_mask is None else x * dropout_mask
    if residual is not None:
        z = z + residual
    mean = z.mean(axis=-1)
    centered = z - mean[..., None]
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=-1) + eps)
    return centered * rstd[..., None], mean, rstd


def layer_norm_fwd_ref(x, residual, weight, bias, eps, dropout_mask=None):
    """LayerNorm(x * dropout_mask + residual) over the last dim.

    x: (..., hidden); residual: (..., hidden) or None; weight, bias: (hidden,) or None (= ones / zeros).
    dropout_mask: (..., hidden), already scaled (0 or 1/(1-p)), or None.
    Returns out: (..., hidden), mean: x.shape[:-1], rstd: x.shape[:-1], all float64.
    """
    x, residual, weight, bias, dropout_mask = _prepare(x, residual, weight, bias, dropout_mask)
    xhat, mean, rstd = _normalize(x, residual, eps, dropout_mask)
    out = xhat if weight is None else xhat * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def layer_norm_bwd_ref(dout, x, residual, weight, bias, eps, dropout_mask=None):
    """Gradients of layer_norm_fwd_ref's out (recomputes mean and rstd).

    dout: (..., hidden); the other arguments as in layer_norm_fwd_ref.
    Returns dx: (..., hidden), dresidual: (..., hidden) or None when residual is None,
    dweight: (hidden,) or None when weight is None, dbias: (hidden,) or None when bias is None.
    """
    x, residual, weight, bias, dropout_mask = _prepare(x, residual, weight, bias, dropout_mask)
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != x.shape:
        raise ValueError(f"dout shape {dout.shape} must equal x shape {x.shape}")
    xhat, _, rstd = _normalize(x, residual, eps, dropout_mask)
    dxhat = dout if weight is None else dout * weight
    # d/dz of (z - mean) * rstd: project out the mean and the xhat direction, then scale by rstd.
    dz = rstd[..., None] * (
        dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )
    dx = dz if dropout_mask is None else dz * dropout_mask
    dresidual = None if residual is None else dz
    reduce_axes = tuple(range(x.ndim - 1))
    dweight = None if weight is None else (dout * xhat).sum(axis=reduce_axes)
    dbias = None if bias is None else dout.sum(axis=reduce_axes)
    return dx, dresidual, dweight, dbias
