"""Triton kernels for the masked, scaled attention softmax: ``fastbert::softmax_fwd`` / ``softmax_bwd``.

Rows are the (batch, head, query) triples of the (B, H, Tq, Tk) scores, each a softmax over Tk keys, computed in
fp32 with the row max subtracted; padded keys get -inf (probability exactly 0) and a row without any real key
(max = -inf) is shifted by 0 instead, so exp gives 0 everywhere and 1 / sum is replaced by 0: zeros, never NaN.

Blocking: up to _MAX_BLOCK_N keys (8192 by default) a program keeps (ROWS, next_power_of_2(Tk)) in registers, one
read and one write per element, with short rows packed ROWS to a program and num_warps = tile / 256 as in
layer_norm/triton.py (Tk = 512: two rows, 4 warps; Tk = 8192: one row, 16 warps). Longer rows loop over
_MAX_BLOCK_N-wide chunks: the forward keeps a running max and rescaled sum (online softmax) in a first pass and
writes in a second, the backward accumulates sum(dp * p) then writes (one extra read of the inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.ops import _backend
from fastbert.ops.layer_norm.triton import cast_to, on_device, row_tile

_MAX_BLOCK_N = 8192  # longest row kept in registers; longer rows loop over chunks of this size


@triton.jit
def _load_logits(S, MASK, base, batch, cols, mask, N, scale, HAS_MASK: tl.constexpr):
    """scale * scores in fp32 for a (ROWS, BLOCK_N) tile, -inf where padded or out of bounds."""
    s = tl.load(S + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        keep = tl.load(MASK + batch[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0)
        mask = mask & (keep != 0)
    return tl.where(mask, s, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(
    S,  # (M, N) scores, M = B * H * Tq rows, N = Tk keys: fp32 / fp16 / bf16
    MASK,  # (B, N) uint8, 1 = real key, or None when not HAS_MASK
    P,  # (M, N) probabilities, scores' dtype
    M, N,
    rows_per_batch,  # H * Tq: row r belongs to batch r // rows_per_batch
    scale,  # fp32, multiplies the scores
    HAS_MASK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    base = rows.to(tl.int64) * N  # int64: B * H * Tq * Tk passes 2^31 at e.g. 32 x 16 x 2048 x 2048
    batch = rows // rows_per_batch
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (cols < N)[None, :]
        s = _load_logits(S, MASK, base, batch, cols, mask, N, scale, HAS_MASK)
        m = tl.max(s, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # no real key: exp(-inf - 0) = 0 below
        e = tl.exp(s - m[:, None])
        total = tl.sum(e, axis=1)
        inv = 1.0 / tl.where(total > 0.0, total, 1.0)  # total = 0 only when every e is 0 already
        tl.store(P + base[:, None] + cols[None, :], cast_to(e * inv[:, None], P.dtype.element_ty), mask=mask)
    else:
        m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        total = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            s = _load_logits(S, MASK, base, batch, c, mask, N, scale, HAS_MASK)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            # exp(m - shift) rescales the running sum; m = -inf (nothing real yet) gives exp(-inf) = 0.
            total = total * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
        inv = 1.0 / tl.where(total > 0.0, total, 1.0)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            s = _load_logits(S, MASK, base, batch, c, mask, N, scale, HAS_MASK)
            p = tl.exp(s - m[:, None]) * inv[:, None]
            tl.store(P + base[:, None] + c[None, :], cast_to(p, P.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    DP,  # (M, N) gradient of the probabilities, probs' dtype
    P,  # (M, N) probabilities from the forward
    DS,  # (M, N) gradient of the scores, probs' dtype
    M, N,
    scale,  # fp32: dscores = scale * p * (dp - sum(dp * p))
    SINGLE_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    base = rows.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (cols < N)[None, :]
        offs = base[:, None] + cols[None, :]
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(p * dp, axis=1)
        tl.store(DS + offs, cast_to(scale * p * (dp - dot[:, None]), DS.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < N)[None, :]
            offs = base[:, None] + (start + cols)[None, :]
            p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(p * tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32), axis=1)
        for start in range(0, N, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < N)[None, :]
            offs = base[:, None] + (start + cols)[None, :]
            p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
            dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DS + offs, cast_to(scale * p * (dp - dot[:, None]), DS.dtype.element_ty), mask=mask)


def _config(m: int, n: int) -> tuple[bool, int, int, int]:
    """(SINGLE_BLOCK, ROWS, BLOCK_N, num_warps) for m rows of n keys."""
    rows, block_n, num_warps = row_tile(m, min(n, _MAX_BLOCK_N))
    return n <= _MAX_BLOCK_N, rows, block_n, num_warps


def _softmax_fwd_triton(scores, key_padding_mask, scale):
    """scores: (B, H, Tq, Tk); key_padding_mask: (B, Tk) bool, True = real key, or None -> probs, scores' dtype."""
    batch, heads, seqlen_q, seqlen_k = scores.shape
    s = scores.contiguous()
    probs = torch.empty_like(s)
    m = s.numel() // seqlen_k if seqlen_k else 0
    if m == 0:
        return probs
    single, rows, block_n, num_warps = _config(m, seqlen_k)
    mask = None
    if key_padding_mask is not None:
        # bool and uint8 share a byte layout: uint8 loads the same on every Triton version.
        mask = key_padding_mask.to(device=s.device, dtype=torch.bool).contiguous().view(torch.uint8)
    with on_device(s):
        _softmax_fwd_kernel[(triton.cdiv(m, rows),)](
            s, mask, probs, m, seqlen_k, heads * seqlen_q, float(scale),
            HAS_MASK=mask is not None, SINGLE_BLOCK=single, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return probs


def _softmax_bwd_triton(dprobs, probs, scale):
    """dprobs, probs: (B, H, Tq, Tk) -> dscores = scale * p * (dp - sum(dp * p)), probs' shape and dtype."""
    p = probs.contiguous()
    dp = dprobs.contiguous()
    dscores = torch.empty_like(p)
    seqlen_k = p.shape[-1]
    m = p.numel() // seqlen_k if seqlen_k else 0
    if m == 0:
        return dscores
    single, rows, block_n, num_warps = _config(m, seqlen_k)
    with on_device(p):
        _softmax_bwd_kernel[(triton.cdiv(m, rows),)](
            dp, p, dscores, m, seqlen_k, float(scale),
            SINGLE_BLOCK=single, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return dscores


_backend.register_impl("softmax_fwd", "triton", _softmax_fwd_triton)
_backend.register_impl("softmax_bwd", "triton", _softmax_bwd_triton)
