"""Shared by the op packages' ``native.py``: the limits of the compiled CUDA kernels (csrc/cuda/launchers.h).

Each ``cuda`` implementation calls :func:`rows_unsupported` / :func:`attention_unsupported` first and runs the torch
implementation of the op when they return a reason, so the ``cuda`` backend never fails on an input the public API
accepts. The row kernels take any width from 1 to 2^30; attention takes head dims that are multiples of 8 up to
128 and grids of fewer than 2^31 blocks.
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW_WIDTH = 1 << 30
MAX_HEAD_DIM = 128
_INT32_MAX = (1 << 31) - 1
_SIMT_ROWS = 32  # the fp32 attention kernels' tile height: the smallest tile, so the largest grid


def rows_unsupported(x: torch.Tensor) -> str | None:
    """Why the row kernels (LayerNorm, GELU, softmax) cannot take ``x`` (..., width), or None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype}"
    if x.dim() == 0 or not 1 <= x.shape[-1] <= MAX_ROW_WIDTH:
        return f"row width {x.shape[-1] if x.dim() else 'of a 0-d tensor'} outside [1, 2^30]"
    return None


def _qkv_unsupported(q, k, v, ndim: int) -> str | None:
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernels take one of fp16, bf16, fp32"
    if q.dim() != ndim or v.shape != k.shape or k.shape[-1] != q.shape[-1]:
        return "q, k, v shapes differ from what the kernels take"
    d = q.shape[-1]
    if not (8 <= d <= MAX_HEAD_DIM and d % 8 == 0):
        return f"head dim {d}: the kernels take multiples of 8 up to {MAX_HEAD_DIM}"
    return None


def _grid_too_large(seqlen: int, batch: int, heads: int, delta_rows: int) -> bool:
    # Every attention grid has at most ceil(seqlen / 32) * batch * heads blocks (the fp32 kernels' 32-row tiles are
    # the smallest), and the backward's delta kernel ceil(rows / 8).
    return (
        seqlen >= _INT32_MAX
        or -(-seqlen // _SIMT_ROWS) * batch * heads > _INT32_MAX
        or -(-delta_rows // 8) > _INT32_MAX
    )


def attention_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the attention kernels cannot take q (B, Tq, H, D), k, v (B, Tk, H, D), or None."""
    reason = _qkv_unsupported(q, k, v, 4)
    if reason is None:
        batch, tq, heads = q.shape[:3]
        if (k.shape[0], k.shape[2]) != (batch, heads):
            reason = "k, v differ from q in batch or heads"
        elif batch * heads >= _INT32_MAX or _grid_too_large(max(tq, k.shape[1]), batch, heads, batch * heads * tq):
            reason = "batch * heads or the grid beyond 2^31"
    return reason


def varlen_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, max_seqlen: int) -> str | None:
    """Why the varlen attention kernels cannot take q, k, v (total, H, D) in ``batch`` sequences, or None."""
    reason = _qkv_unsupported(q, k, v, 3)
    if reason is None and k.shape != q.shape:
        reason = "k and q differ in shape"
    if reason is None:
        total, heads = q.shape[:2]
        if total >= _INT32_MAX or _grid_too_large(max_seqlen, batch, heads, heads * total):
            reason = "packed tokens or the grid beyond 2^31"
    return reason
