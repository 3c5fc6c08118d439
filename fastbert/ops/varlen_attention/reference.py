"""Float64 NumPy reference for variable-length (packed) attention: the ground truth in tests.

Sequences are packed back to back with no padding: q, k, v are (total_tokens, nheads, headdim) and sequence i
holds tokens cu_seqlens[i] : cu_seqlens[i + 1]. Each token attends to the tokens of its own sequence only
(bidirectional), which is the padded reference applied to every sequence alone. lse is head-major,
(nheads, total_tokens), as in flash-attention's varlen interface.
"""

import numpy as np

from fastbert.ops.attention.reference import attention_bwd_ref, attention_fwd_ref

__all__ = ["check_cu_seqlens_ref", "varlen_attention_bwd_ref", "varlen_attention_fwd_ref"]


def check_cu_seqlens_ref(cu_seqlens, total_tokens):
    """cu_seqlens as int64 NumPy: 1-D, starts at 0, non-decreasing, ends at total_tokens."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0 or cu[-1] != total_tokens or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to total_tokens={total_tokens}, got {cu}")
    return cu


def _per_sequence(cu, *arrays):
    for i in range(len(cu) - 1):
        start, end = cu[i], cu[i + 1]
        yield i, start, end, [np.asarray(a, dtype=np.float64)[None, start:end] for a in arrays]


def varlen_attention_fwd_ref(q, k, v, cu_seqlens, scale=None, dropout_masks=None):
    """q, k, v: (total_tokens, nheads, headdim); cu_seqlens: (batch + 1,) offsets.

    dropout_masks: None, or one (nheads, len_i, len_i) array per sequence (0 or 1/(1-p)).
    Returns out: (total_tokens, nheads, headdim) and lse: (nheads, total_tokens), float64.
    """
    cu = check_cu_seqlens_ref(cu_seqlens, np.shape(q)[0])
    out = np.zeros(np.shape(q), dtype=np.float64)
    lse = np.full((np.shape(q)[1], np.shape(q)[0]), -np.inf)
    for i, start, end, (qi, ki, vi) in _per_sequence(cu, q, k, v):
        if end == start:
            continue
        mask = None if dropout_masks is None else np.asarray(dropout_masks[i])[None]
        o, s = attention_fwd_ref(qi, ki, vi, None, scale, mask)
        out[start:end], lse[:, start:end] = o[0], s[0]
    return out, lse


def varlen_attention_bwd_ref(dout, q, k, v, cu_seqlens, scale=None, dropout_masks=None):
    """Gradients of varlen_attention_fwd_ref's out: dq, dk, dv, each (total_tokens, nheads, headdim) float64."""
    cu = check_cu_seqlens_ref(cu_seqlens, np.shape(q)[0])
    grads = [np.zeros(np.shape(q), dtype=np.float64) for _ in range(3)]
    for i, start, end, (gi, qi, ki, vi) in _per_sequence(cu, dout, q, k, v):
        if end == start:
            continue
        mask = None if dropout_masks is None else np.asarray(dropout_masks[i])[None]
        for g, d in zip(grads, attention_bwd_ref(gi, qi, ki, vi, None, scale, mask), strict=True):
            g[start:end] = d[0]
    return tuple(grads)
