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
counter per (batch, head, query, group of four keys), so the backward regenerates it from the seed instead of storing
it.

Compiled with ``VARLEN=True``, the same forward and backward kernels serve packed variable-length attention
(``fastbert.ops.varlen_attention.triton``): each program takes its sequence from cu_seqlens (``_program_sequence``).

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
def _dropout_keep(seed, rng_base, rows, start_n, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) keep-mask of the dropout on P[b, h, rows, start_n + 0..BLOCK_N-1], regenerated identically
    by the forward and both backward kernels (the dK/dV kernel transposes it).

    One Philox4x32 call draws the four keys of a group (start_n is a multiple of BLOCK_N, so groups never straddle
    a tile): query q and key k take word k % 4 of counter rng_base + q * cdiv(Tk, 4) + k // 4, a distinct counter per
    (batch, head, query, key group). rng_base (see _program_sequence) is int64 and so is the sum: at
    B*H*T*T = 32*16*8192*8192 = 2^35 the counter no longer fits int32; tl.randint4x splits an int64 counter into two
    32-bit Philox words, so it stays collision-free up to 2^64. The 64-bit seed is Philox's key. An element is kept
    when the top 24 bits of its word, as a uniform in [0, 1), are >= dropout_p: probability 1 - p to within 2^-24.
    """
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    counters = rng_base + rows[:, None].to(tl.int64) * ((Tk + 3) // 4) + groups[None, :]  # (BLOCK_M, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK_M, BLOCK_N])  # a group's 4 keys side by side
    return (words >> 8).to(tl.float32) >= dropout_p * 16777216.0  # 24-bit draws are exact in fp32


@triton.jit
def _program_sequence(CuSeqlens, bh, H, Tq, Tk, VARLEN: tl.constexpr):
    """What program bh = b * H + h works on: (offset, h, Tq, Tk, row_base, rng_base).

    Padded: b is the batch index and offset = b (int64), the index that multiplies the batch strides; Tq, Tk as
    given; lse, delta and row scales (B, H, Tq) start at row_base = bh * Tq; rng_base = bh * Tq * Tk (_dropout_keep).
    VARLEN: b is a sequence of the packed (total, H, D) tensors, whose launcher passes the token stride as the batch
    stride and Tq = Tk = total: offset = cu_seqlens[b] (int64), the sequence's first token; Tq = Tk = its length;
    lse etc. are (H, total), so row_base = h * total + offset. rng_base = bh * 2^32: the dropout counter
    bh * 2^32 + q * len + k depends on (sequence, head, query, key) only, not on max_seqlen or the other sequences,
    and stays distinct while len^2 <= 2^32 (the launcher falls back to torch above that).
    """
    h = bh % H
    if VARLEN:
        start = tl.load(CuSeqlens + bh // H)
        total = Tq
        Tq = tl.load(CuSeqlens + bh // H + 1) - start
        Tk = Tq
        offset = start.to(tl.int64)
        row_base = h.to(tl.int64) * total + offset
        rng_base = bh.to(tl.int64) << 32
    else:
        offset = (bh // H).to(tl.int64)  # int64 batch offsets: packed (B, T, 3, H, D) tensors pass 2^31 elements
        row_base = bh.to(tl.int64) * Tq
        rng_base = row_base * Tk
    return offset, h, Tq, Tk, row_base, rng_base


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
    CuSeqlens,  # VARLEN: (B + 1,) int32 sequence offsets into the packed tokens (unused otherwise)
    Out,  # (B, Tq, H, D) contiguous, written in q's dtype
    Lse,  # (B, H, Tq) fp32 contiguous, written
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_mb, stride_mt, stride_ob, stride_ot, stride_oh,
    H, Tq, Tk, bh_start,  # VARLEN: Tq = Tk = total tokens; the tensors are (total, H, D), lse (H, total)
    qk_scale,  # scale * log2(e)
    dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    bh = tl.program_id(1) + bh_start
    b, h, Tq, Tk, row_base, rng_base = _program_sequence(CuSeqlens, bh, H, Tq, Tk, VARLEN)
    if VARLEN:
        if tl.program_id(0) * BLOCK_M >= Tq:  # the grid covers max_seqlen: blocks past a shorter sequence do nothing
            return
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                   rows, Tq, offs_d, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D), kept in registers for the whole loop
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

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
            keep = _dropout_keep(seed, rng_base, rows, start_n, Tk, dropout_p, BLOCK_M, BLOCK_N)
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
    tl.store(Lse + row_base + rows, lse, mask=rows < Tq)


def hopper_class(arch: int) -> bool:
    """Whether ``arch`` takes the H100 tile configs: sm_90 and sm_100 (227 KB of shared memory per block). Every other
    arch (sm_80, sm_86, sm_89, sm_120) takes the sm_80 configs, sized for 99 KB (sm_86/89/120's limit)."""
    return arch // 10 in (9, 10)


def _fwd_config(block_d: int, dtype, arch: int = 90) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per arch class (see hopper_class), not timed (no GPU where this was
    written); every config compiles without ptxas spills on its target (tests/ops/test_triton_compile.py and the
    table in benchmarks/results/triton-compile-sm80-sm90.md).

    FlashAttention-2's tile shapes with 8 warps. Half on sm_90: 128 x 64, 3 stages of K/V prefetch at head dims up to
    64, 2 at 128 (104 KB of shared memory). On sm_8x, mma.sync keeps the accumulators and the S/P tiles in registers:
    128 x 64 reaches 255 registers and spills (16-64 B at head dims 80-128, 8-120 B at 64), so the key tile is 32
    there (<= 250 registers, no spills). fp32 "ieee" dots run on FMA units with operands in registers: smaller tiles.
    """
    if dtype == torch.float32:
        if block_d <= 32:  # 64 x 32 with 8 warps holds ~80 registers and spills 4 B (sm_80; sm_90 on Triton 3.6)
            return (32, 32, 8, 2) if hopper_class(arch) else (64, 32, 4, 2)
        if block_d <= 64:  # 64 x 32 spills 8-12 B on sm_90 with dropout
            return (32, 32, 8, 2) if hopper_class(arch) else (64, 32, 8, 2)
        return (32, 16, 8, 2)
    if block_d <= 32:  # on sm_80, 8 warps spill 4 B at head dim 32, and 128 x 32 with 4 warps on Triton 3.6
        return (128, 64, 8, 3) if hopper_class(arch) else (64, 32, 4, 3)
    if block_d <= 64:
        return (128, 64, 8, 3) if hopper_class(arch) else (128, 32, 8, 3)
    return (128, 64, 8, 2) if hopper_class(arch) else (128, 32, 8, 2)


def target_arch(t) -> int:
    """Compute capability as 80, 90, ... of t's GPU: the configs' key. CPU tensors (the interpreter) take 90's tiles."""
    if t.device.type != "cuda":
        return 90
    major, minor = _cuda_capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 10 * major + minor


def attention_fwd(q, k, v, key_padding_mask, dropout_p, scale, seed):
    """out: (B, Tq, H, D) contiguous in q's dtype; lse: (B, H, Tq) fp32. See the module docstring.

    q: (B, Tq, H, D); k, v: (B, Tk, H, D); key_padding_mask: (B, Tk) bool or None; seed: (1,) int64 CPU tensor
    (read on the host) or None without dropout.
    """
    if unsupported_reason(q, k, v) is not None:
        return _attention_fwd_torch(q, k, v, key_padding_mask, dropout_p, scale, seed)
    return launch_fwd(q, k, v, key_padding_mask, None, 0, dropout_p, scale, seed)


def seq_strides(t, varlen: bool) -> tuple[int, int, int]:
    """The (batch, token, head) strides the kernels take. Packed (total, H, D) tensors pass their token stride as the
    batch stride: the kernels then multiply it by a sequence's first token instead of a batch index."""
    return (t.stride(0), t.stride(0), t.stride(1)) if varlen else tuple(t.stride()[:3])


def launch_fwd(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """Run the forward kernel on inputs that ``unsupported_reason`` accepts; returns (out, lse).

    Padded (cu_seqlens None): q (B, Tq, H, D), k, v (B, Tk, H, D) -> out (B, Tq, H, D), lse (B, H, Tq).
    Varlen: q, k, v (total, H, D), cu_seqlens (nseq + 1,) int32 on q's device, max_seqlen >= the longest sequence
    (it sizes the grid and the tiles; cu_seqlens is never read on the host) -> out (total, H, D), lse (H, total).
    """
    varlen = cu_seqlens is not None
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    nheads, d = q.shape[-2:]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if varlen:
        total = q.shape[0]
        batch, tq, tk, seq_args = cu_seqlens.numel() - 1, max_seqlen, max_seqlen, (total, total)
        lse = torch.empty((nheads, total), dtype=torch.float32, device=q.device)
    else:
        batch, tq, tk = q.shape[0], q.shape[1], k.shape[1]
        seq_args = (tq, tk)
        lse = torch.empty((batch, nheads, tq), dtype=torch.float32, device=q.device)
    mask, mask_strides = mask_arg(key_padding_mask, q)
    block_d = head_block(d)
    block_m, block_n, warps, stages = _fwd_config(block_d, q.dtype, target_arch(q))
    block_m, block_n = clamp_block(block_m, tq), clamp_block(block_n, tk)
    seed_int = seed_value(seed, dropout_p)
    strides = (*seq_strides(q, varlen), *seq_strides(k, varlen), *seq_strides(v, varlen), *mask_strides,
               *seq_strides(out, varlen))
    with device_guard(q):
        for bh_start, bh_count in bh_chunks(batch * nheads):
            # Query blocks on grid dim 0: consecutive programs share (batch, head), so its K/V stay in L2.
            _attention_fwd_kernel[(triton.cdiv(tq, block_m), bh_count)](
                q, k, v, mask, cu_seqlens if varlen else mask, out, lse, *strides,
                nheads, *seq_args, bh_start, scale * LOG2E, dropout_p, seed_int,
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=key_padding_mask is not None,
                DROPOUT=dropout_p > 0.0, PRECISION=dot_precision(q.dtype), VARLEN=varlen, num_warps=warps,
                num_stages=stages,
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
