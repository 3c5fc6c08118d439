"""Float64 NumPy reference for the masked, scaled attention softmax: the ground truth in tests.

Forward: probs = softmax(scale * scores) over the last dim, with padded keys excluded (they get probability
exactly 0, not a large negative logit), the row maximum subtracted before exp. A row whose keys are all padded
gives zeros, never NaN: that is fastbert's documented choice (transformers attends uniformly instead).
"""

import numpy as np

__all__ = ["softmax_bwd_ref", "softmax_fwd_ref"]


def _check_key_padding_mask(key_padding_mask, batch, seqlen_k):
    """Return the mask as a bool array (batch, seqlen_k), or None; raise on a wrong shape."""
    if key_padding_mask is None:
        return None
    mask = np.asarray(key_padding_mask).astype(bool)
    if mask.shape != (batch, seqlen_k):
        raise ValueError(
            f"key_padding_mask must have shape (batch, seqlen_k) = {(batch, seqlen_k)}, got {mask.shape}; "
            "pass True for real tokens and False for padding"
        )
    return mask


def softmax_fwd_ref(scores, key_padding_mask=None, scale=1.0):
    """Masked, scaled softmax over the keys.

    scores: (batch, nheads, seqlen_q, seqlen_k), any float dtype (computed in float64).
    key_padding_mask: (batch, seqlen_k) bool, True = real token; None = all real.
    scale: multiplies the scores before the softmax.
    Returns probs: (batch, nheads, seqlen_q, seqlen_k) float64; rows with no real key are all zeros.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4:
        raise ValueError(f"scores must be (batch, nheads, seqlen_q, seqlen_k), got shape {scores.shape}")
    batch, _, _, seqlen_k = scores.shape
    mask = _check_key_padding_mask(key_padding_mask, batch, seqlen_k)
    logits = scores * scale
    if mask is not None:
        # -inf (not a large negative) so padded keys get exactly zero probability.
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
    row_max = logits.max(axis=-1, keepdims=True)
    # A fully masked row has max -inf; shifting by 0 instead keeps exp(-inf) = 0 rather than exp(nan).
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    exp = np.exp(logits - row_max)
    denom = exp.sum(axis=-1, keepdims=True)
    return exp / np.where(denom > 0.0, denom, 1.0)


def softmax_bwd_ref(dprobs, probs, scale=1.0):
    """Gradient of softmax_fwd_ref with respect to the (unscaled) scores.

    dprobs, probs: (batch, nheads, seqlen_q, seqlen_k); probs is the forward output.
    Returns dscores: same shape, float64. Padded keys and fully masked rows get zero gradient because their
    probabilities are zero.
    """
    dprobs = np.asarray(dprobs, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if dprobs.shape != probs.shape:
        raise ValueError(f"dprobs shape {dprobs.shape} must equal probs shape {probs.shape}")
    row_dot = (dprobs * probs).sum(axis=-1, keepdims=True)
    return scale * probs * (dprobs - row_dot)
