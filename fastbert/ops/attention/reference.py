"""Float64 NumPy reference for BERT self-attention (non-causal, key padding mask): the ground truth in tests.

out = dropout(softmax(scale * q k^T, padded keys excluded)) v, with the log-sum-exp of each row saved for the
backward, as flash-attention does. A query row whose keys are all padded gives out = 0 and lse = -inf, never
NaN, and contributes no gradient: fastbert's documented choice (transformers attends uniformly instead).

Layout follows flash-attention: q, k, v are (batch, seqlen, nheads, headdim); probabilities and lse are
head-major, (batch, nheads, seqlen_q, seqlen_k) and (batch, nheads, seqlen_q).
"""

import math

import numpy as np

from fastbert.ops.softmax.reference import _check_key_padding_mask

__all__ = ["attention_bwd_ref", "attention_fwd_ref", "attention_probs_ref"]


def _as_f64(name, array, ndim):
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {array.shape}")
    return array


def _check_qkv(q, k, v):
    q = _as_f64("q (batch, seqlen_q, nheads, headdim)", q, 4)
    k = _as_f64("k (batch, seqlen_k, nheads, headdim)", k, 4)
    v = _as_f64("v (batch, seqlen_k, nheads, headdim)", v, 4)
    batch, _, nheads, headdim = q.shape
    if k.shape[0] != batch or k.shape[2:] != (nheads, headdim):
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in batch, nheads or headdim")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} must equal k shape {k.shape}")
    return q, k, v


def _check_dropout_mask(dropout_mask, batch, nheads, seqlen_q, seqlen_k):
    if dropout_mask is None:
        return None
    dropout_mask = np.asarray(dropout_mask, dtype=np.float64)
    if dropout_mask.shape != (batch, nheads, seqlen_q, seqlen_k):
        raise ValueError(
            f"dropout_mask must have shape (batch, nheads, seqlen_q, seqlen_k) = "
            f"{(batch, nheads, seqlen_q, seqlen_k)}, got {dropout_mask.shape}; values are 0 or 1/(1-p)"
        )
    return dropout_mask


def _default_scale(scale, headdim):
    return 1.0 / math.sqrt(headdim) if scale is None else float(scale)


def attention_probs_ref(q, k, key_padding_mask=None, scale=None):
    """Attention probabilities and their row log-sum-exp (before dropout).

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads, headdim).
    key_padding_mask: (batch, seqlen_k) bool, True = real token; None = all real.
    scale: defaults to 1/sqrt(headdim).
    Returns probs: (batch, nheads, seqlen_q, seqlen_k), lse: (batch, nheads, seqlen_q), both float64.
    A fully masked row has probs 0 and lse -inf.
    """
    q = _as_f64("q (batch, seqlen_q, nheads, headdim)", q, 4)
    k = _as_f64("k (batch, seqlen_k, nheads, headdim)", k, 4)
    scale = _default_scale(scale, q.shape[-1])
    mask = _check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[1])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k, optimize=True) * scale  # (B, H, Sq, Sk)
    if mask is not None:
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
    row_max = logits.max(axis=-1)  # (B, H, Sq)
    # Shift fully masked rows (max = -inf) by 0 so they give exp(-inf) = 0, not exp(nan).
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    exp = np.exp(logits - shift[..., None])
    denom = exp.sum(axis=-1)
    with np.errstate(divide="ignore"):
        lse = np.where(denom > 0.0, shift + np.log(denom), -np.inf)
    probs = exp / np.where(denom > 0.0, denom, 1.0)[..., None]
    return probs, lse


def attention_fwd_ref(q, k, v, key_padding_mask=None, scale=None, dropout_mask=None):
    """Scaled dot-product attention over padded keys.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim).
    key_padding_mask: (batch, seqlen_k) bool, True = real token; None = all real.
    scale: defaults to 1/sqrt(headdim).
    dropout_mask: (batch, nheads, seqlen_q, seqlen_k), already scaled (0 or 1/(1-p)), multiplied onto the
        probabilities; None = no dropout.
    Returns out: (batch, seqlen_q, nheads, headdim) and lse: (batch, nheads, seqlen_q), the log-sum-exp of the
    scaled, masked scores (-inf for a fully masked row, whose out is 0).
    """
    q, k, v = _check_qkv(q, k, v)
    batch, seqlen_q, nheads, _ = q.shape
    dropout_mask = _check_dropout_mask(dropout_mask, batch, nheads, seqlen_q, k.shape[1])
    probs, lse = attention_probs_ref(q, k, key_padding_mask, scale)
    if dropout_mask is not None:
        probs = probs * dropout_mask
    out = np.einsum("bhqk,bkhd->bqhd", probs, v, optimize=True)
    return out, lse


def attention_bwd_ref(dout, q, k, v, key_padding_mask=None, scale=None, dropout_mask=None):
    """Gradients of attention_fwd_ref's out with respect to q, k, v (recomputes the forward).

    dout: (batch, seqlen_q, nheads, headdim); the other arguments as in attention_fwd_ref.
    Returns dq: (batch, seqlen_q, nheads, headdim), dk, dv: (batch, seqlen_k, nheads, headdim), float64.
    Padded keys and fully masked query rows get zero gradient (their probabilities are exactly 0).
    """
    q, k, v = _check_qkv(q, k, v)
    dout = _as_f64("dout (batch, seqlen_q, nheads, headdim)", dout, 4)
    if dout.shape != q.shape:
        raise ValueError(f"dout shape {dout.shape} must equal q shape {q.shape}")
    batch, seqlen_q, nheads, headdim = q.shape
    scale = _default_scale(scale, headdim)
    dropout_mask = _check_dropout_mask(dropout_mask, batch, nheads, seqlen_q, k.shape[1])
    probs, _ = attention_probs_ref(q, k, key_padding_mask, scale)  # (B, H, Sq, Sk)
    dropped = probs if dropout_mask is None else probs * dropout_mask
    dv = np.einsum("bhqk,bqhd->bkhd", dropped, dout, optimize=True)
    dprobs = np.einsum("bqhd,bkhd->bhqk", dout, v, optimize=True)
    if dropout_mask is not None:
        dprobs = dprobs * dropout_mask
    # Softmax backward; the row dot product equals flash-attention's D = rowsum(dout * out).
    dlogits = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))
    dscores = dlogits * scale
    dq = np.einsum("bhqk,bkhd->bqhd", dscores, k, optimize=True)
    dk = np.einsum("bhqk,bqhd->bkhd", dscores, q, optimize=True)
    return dq, dk, dv
