"""Triton fused attention for the ``triton`` backend: FlashAttention-2 forward here, backward in ``triton_bwd.py``.

Registers ``attention_fwd`` / ``attention_bwd`` implementations with the contract of the torch ones in
``fastbert.ops.attention``: q, k, v (B, T, H, D) read through their strides (packed-projection views need no copy),
key_padding_mask (B, Tk) bool (True = real token) or None; out (B, Tq, H, D) contiguous in q's dtype, lse (B, H, Tq)
fp32, -inf on rows whose keys are all padding (their out is exactly 0, never NaN).

Forward: one program per (query block, batch*head) streams the key blocks with an online softmax in fp32: scores
are scaled by scale*log2(e) once so each exponential is one exp2; the running max m and sum l rescale the fp32
output accumulator, and (B, H, Tq, Tk) scores are never stored. Padding keys and the ragged tail get -inf scores
from the mask row loaded per key block; a row that has seen no real key keeps m = -inf and is shifted by 0 instead
(exp2(-inf - -inf) would be NaN), so a fully masked row ends with l = 0 and is written as 0 with lse = -inf.

Dropout multiplies P after normalization: the running sum l takes the undropped P, the accumulator only the kept
entries, and 1 / (1 - p) is folded into the final 1 / l. The keep mask comes from Philox (``_dropout_keep``), one
counter per (batch, head, query, key), so the backward regenerates it from the same seed instead of storing it.

Falls back to the torch implementation (same results, slower) for what the kernels do not cover: head dims above
128, dtypes other than fp16/bf16/fp32, mismatched shapes, empty inputs, bf16 before sm80 (``unsupported_reason``).
Head dims that are not a power of two (8, 24, 40, 80, ...) run zero-padded to the next one.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from fastbert.ops import _backend
from fastbert.ops.attention import _attention_bwd_torch, _attention_fwd_torch

LOG2E = 1.4426950408889634  # scores are scaled by scale * log2(e) once, so the kernels use exp2 (one MUFU op)
MAX_HEAD_DIM = 128
MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1, where batch*head goes
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# helpers shared with the backward (triton_bwd.py)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows past n_rows and padded head-dim columns read as 0 (so they add 0 to dots)."""
    mask = rows[:, None] < n_rows
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptrs, value, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    mask = rows[:, None] < n_rows
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, _cast(value, ptrs.dtype.element_ty, PRECISION), mask=mask)


@triton.jit
def _cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Under PRECISION "interpret-bf16" (see dot_precision) the interpreter's
    fp32 -> bf16 cast truncates: round the fp32 bits by hand first (the usual + 0x7FFF + lsb trick), after which
    the truncating cast is exact."""
    if PRECISION == "interpret-bf16":
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc) with fp32 accumulation. PRECISION: "ieee" (fp32 inputs: exact fp32 products, not TF32),
    "default" (half inputs: tensor cores), or "interpret-bf16" (see dot_precision): bf16 operands multiplied in
    fp32, where their products are exact, as in tensor cores."""
    if PRECISION == "interpret-bf16":
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PRECISION == "ieee":
        res = tl.dot(a, b, acc, input_precision="ieee")
    else:
        res = tl.dot(a, b, acc)
    return res


@triton.jit
def _key_valid(Mask, mask_row, stride_mt, keys, Tk, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) bool: the key exists (ragged tail) and, with a padding mask, is a real token."""
    valid = keys < Tk
    if HAS_MASK:
        valid = valid & (tl.load(Mask + mask_row + keys * stride_mt, mask=valid, other=0) != 0)
    return valid


@triton.jit
def _dropout_keep(seed, rng_base, q_idx, k_idx, Tk, dropout_p):
    """Keep-mask of the dropout on P[b, h, q, k], regenerated identically by the forward and both backward kernels.

    Philox counter = ((b * H + h) * Tq + q) * Tk + k: one distinct counter per (batch, head, query, key), so no two
    entries share a random number. rng_base = (b * H + h) * Tq * Tk is int64 and the sum is done in int64: at
    B*H*T*T = 32*16*8192*8192 = 2^35 the counter no longer fits int32; tl.rand splits an int64 counter into two
    32-bit Philox words, so it stays collision-free up to 2^64. The 64-bit seed is Philox's key. An element is
    kept when its uniform draw is >= dropout_p (as torch's dropout_scale_mask does), probability 1 - p.
    q_idx, k_idx: broadcastable index blocks ((M, 1) and (1, N), or transposed in the dK/dV kernel).
    """
    offsets = rng_base + q_idx.to(tl.int64) * Tk + k_idx
    return tl.rand(seed, offsets) >= dropout_p


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(q, k, v) -> str | None:
    """Why the Triton kernels cannot take these inputs (the caller then runs the torch implementation), or None."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernels take one of fp16, bf16, fp32"
    d = q.shape[-1]
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or (k.shape[0], k.shape[2], k.shape[3]) != (
        q.shape[0], q.shape[2], d
    ):
        return "q, k, v shapes are not (B, Tq, H, D), (B, Tk, H, D), (B, Tk, H, D)"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}: tiles would not fit in registers and shared memory"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and _cuda_capability(q.device.index or 0)[0] < 8:
        return "bf16 tensor-core dots need compute capability 8.0+"
    return None


def head_block(d: int) -> int:
    # tl.dot needs every dimension >= 16 and a power of two: other head dims are zero-padded to BLOCK_D (the zero
    # columns add nothing to q k^T and are never stored).
    return max(16, triton.next_power_of_2(d))


def clamp_block(block: int, length: int) -> int:
    # Short sequences get smaller tiles (power of two, >= 16 for tl.dot) instead of computing on padding.
    return min(block, max(16, triton.next_power_of_2(length)))


def dot_precision(dtype) -> str:
    """The PRECISION constexpr of the kernels for inputs of ``dtype`` (see _dot and _cast)."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Triton's interpreter (3.9 at least) runs tl.dot on bf16's raw uint16 storage (garbage) and truncates in
        # fp32 -> bf16 casts. This mode makes _dot multiply in fp32 (bf16 products are exact there, as in bf16
        # tensor cores) and _cast round to nearest even, so CI on CPU sees the numerics of the GPU kernels.
        return "interpret-bf16"
    # fp32: "ieee", not TF32 (10-bit mantissa), so fp32 matches the float64 reference to ~1e-6.
    return "ieee" if dtype == torch.float32 else "default"


def bh_chunks(bh: int):
    """(start, count) chunks of the batch*head axis, each within CUDA's 65535 limit on grid dimension 1."""
    for start in range(0, bh, MAX_GRID_Y):
        yield start, min(MAX_GRID_Y, bh - start)


def device_guard(t):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def seed_value(seed, dropout_p: float) -> int:
    """The dropout seed as a host int (the seed tensor lives on the CPU: no GPU sync); 0 without dropout."""
    if dropout_p == 0.0:
        return 0
    if seed is None:
        raise ValueError("attention with dropout_p > 0 needs a seed: a (1,) int64 CPU tensor (fastbert.ops._utils)")
    return int(seed.reshape(-1)[0].item())


def mask_arg(key_padding_mask, dummy):
    """(pointer tensor, (stride_b, stride_t)) for the key-padding mask: a uint8 view of the bool mask (no copy), or
    ``dummy`` (never read: HAS_MASK is off) without one."""
    if key_padding_mask is None:
        return dummy, (0, 0)
    if key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    mask = key_padding_mask.view(torch.uint8)
    return mask, mask.stride()


def last_dim_contiguous(t):
    # Kernels index (batch, seq, head) through strides but assume unit stride along the head dim (vector loads).
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["seed"])
def _attention_fwd_kernel(
    Q,  # (B, Tq, H, D), any strides with unit head-dim stride
    K, V,  # (B, Tk, H, D) each, likewise
    Mask,  # (B, Tk) uint8, nonzero = real key (unused without HAS_MASK)
    Out,  # (B, Tq, H, D) contiguous, written in q's dtype
    Lse,  # (B, H, Tq) fp32 contiguous, written
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_mb, stride_mt, stride_ob, stride_ot, stride_oh,
    H, Tq, Tk, bh_start,
    qk_scale,  # scale * log2(e)
    dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1) + bh_start
    b, h = (bh // H).to(tl.int64), bh % H  # int64 batch offsets: packed (B, T, 3, H, D) tensors pass 2^31 elements
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                   rows, Tq, offs_d, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D), kept in registers for the whole loop
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    rng_base = bh.to(tl.int64) * Tq * Tk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the log2-scaled scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Tk, BLOCK_N):
        keys = start_n + offs_n
        k = _load_rows(k_ptrs + start_n * stride_kt, keys, Tk, offs_d, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = _key_valid(Mask, b * stride_mb, stride_mt, keys, Tk, HAS_MASK)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with no real key so far have m_new = -inf: shift by 0 so that p = exp2(-inf) = 0 and alpha = 0.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = _dropout_keep(seed, rng_base, rows[:, None], keys[None, :], Tk, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(v_ptrs + start_n * stride_vt, keys, Tk, offs_d, HEAD_DIM, BLOCK_D)
        # P is rounded to v's dtype for the tensor-core dot (as FlashAttention does); accumulation stays fp32.
        acc = _dot(_cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # only a row without any real key: a real key contributes exp2(0) = 1 at the row max
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]  # acc is 0 on empty rows: their output is exactly 0
    _store_rows(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], out,
                rows, Tq, offs_d, HEAD_DIM, BLOCK_D, PRECISION)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(Lse + bh.to(tl.int64) * Tq + rows, lse, mask=rows < Tq)


def _fwd_config(block_d: int, dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an H100, not timed (no GPU where this was written).

    FlashAttention-2's tile shapes, with warps chosen so that ptxas (Triton 3.9) reports no register spills on sm_90,
    with or without dropout. Half: 128 x 64 tiles, 8 warps (4 spill at head dim 64), 3 stages of K/V prefetch (2 at
    head dim 128: 96 KB of shared memory). fp32 "ieee" dots run on FMA units with operands in registers: smaller tiles.
    """
    if dtype == torch.float32:
        return (64, 32, 8, 2) if block_d <= 64 else (32, 16, 8, 2)
    return (128, 64, 8, 3) if block_d <= 64 else (128, 64, 8, 2)


def attention_fwd(q, k, v, key_padding_mask, dropout_p, scale, seed):
    """out: (B, Tq, H, D) contiguous in q's dtype; lse: (B, H, Tq) fp32. See the module docstring.

    q: (B, Tq, H, D); k, v: (B, Tk, H, D); key_padding_mask: (B, Tk) bool or None; seed: (1,) int64 CPU tensor
    (read on the host) or None without dropout.
    """
    if unsupported_reason(q, k, v) is not None:
        return _attention_fwd_torch(q, k, v, key_padding_mask, dropout_p, scale, seed)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    batch, tq, nheads, d = q.shape
    tk = k.shape[1]
    out = torch.empty((batch, tq, nheads, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, tq), dtype=torch.float32, device=q.device)
    mask, mask_strides = mask_arg(key_padding_mask, q)
    block_d = head_block(d)
    block_m, block_n, warps, stages = _fwd_config(block_d, q.dtype)
    block_m, block_n = clamp_block(block_m, tq), clamp_block(block_n, tk)
    seed_int = seed_value(seed, dropout_p)
    with device_guard(q):
        for bh_start, bh_count in bh_chunks(batch * nheads):
            # Query blocks on grid dim 0: consecutive programs share (batch, head), so its K/V stay in L2.
            _attention_fwd_kernel[(triton.cdiv(tq, block_m), bh_count)](
                q, k, v, mask, out, lse,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *out.stride()[:3],
                nheads, tq, tk, bh_start, scale * LOG2E, dropout_p, seed_int,
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=key_padding_mask is not None,
                DROPOUT=dropout_p > 0.0, PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
            )
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed):
    """dq, dk, dv contiguous in q's, k's, v's dtypes (see triton_bwd.attention_bwd_triton)."""
    return _bwd.attention_bwd_triton(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed,
                                     fallback=_attention_bwd_torch)


# Imported here, after the helpers it takes from this module exist (either module may be imported first); importing
# it at all makes a broken backward fail the backend probe instead of the first training step.
from fastbert.ops.attention import triton_bwd as _bwd  # noqa: E402

_backend.register_impl("attention_fwd", "triton", attention_fwd)
_backend.register_impl("attention_bwd", "triton", attention_bwd)
