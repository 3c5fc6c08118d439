"""Triton backward of fused attention (FlashAttention-2 style); the forward and the shared helpers are in triton.py.

Three kernels, none with atomics, so gradients are bitwise deterministic:

1. ``_attention_bwd_delta_kernel``: delta = rowsum(dO * O) in fp32, (B, H, Tq). It equals sum_k P * dP (the
   softmax-backward row term) with dropout too, because O already carries the dropout mask.
2. ``_attention_bwd_dq_kernel``: one program per (query block, batch*head); loops over all key blocks for dQ.
3. ``_attention_bwd_dkdv_kernel``: one program per (key block, batch*head); loops over all query blocks,
   recomputes P^T = exp2(S^T * scale*log2e - lse*log2e) from the saved lse and accumulates dK, dV in fp32.

P is recomputed from lse (never stored), the dropout mask regenerated from the seed (``_dropout_keep``). Every dtype
takes the exact path, PRECISE (the launcher explains why): the dQ kernel first recomputes each row's sum of P and
its delta from the same dot products as the gradient kernels (it then replaces the delta kernel), see the comment
there. Block sizes: ``_bwd_config``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.ops.attention.triton import (
    LOG2E,
    _cast,
    _dot,
    _dropout_keep,
    _key_valid,
    _load_rows,
    _program_sequence,
    _store_rows,
    bh_chunks,
    clamp_block,
    device_guard,
    dot_precision,
    head_block,
    hopper_class,
    last_dim_contiguous,
    mask_arg,
    seed_value,
    seq_strides,
    target_arch,
    unsupported_reason,
)

# --------------------------------------------------------------------------------------------------------------
# backward kernels


@triton.jit
def _attention_bwd_delta_kernel(
    Out, dOut,  # (B, Tq, H, D) each, any strides with unit head-dim stride
    Delta,  # (B, H, Tq) fp32 contiguous, written
    stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, stride_gh,
    H, Tq, bh_start,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1) + bh_start
    b, h = (bh // H).to(tl.int64), bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                   rows, Tq, offs_d, HEAD_DIM, BLOCK_D)
    do = _load_rows(dOut + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :],
                    rows, Tq, offs_d, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_dkdv_kernel(
    Q, dOut,  # (B, Tq, H, D) each
    K, V,  # (B, Tk, H, D) each
    Lse, Delta,  # (B, H, Tq) fp32 contiguous: the forward's log-sum-exp, rowsum(dO * O)
    RowScale,  # (B, H, Tq) fp32 contiguous, from the dQ kernel (read with PRECISE only)
    Mask,  # (B, Tk) uint8, nonzero = real key (unused without HAS_MASK)
    CuSeqlens,  # VARLEN: (B + 1,) int32 sequence offsets (see _program_sequence)
    dK, dV,  # (B, Tk, H, D) contiguous, written in k's / v's dtype
    stride_qb, stride_qt, stride_qh, stride_gb, stride_gt, stride_gh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_mb, stride_mt, stride_dkb, stride_dkt, stride_dkh,
    H, Tq, Tk, bh_start,  # VARLEN: Tq = Tk = total tokens; the tensors are (total, H, D), lse etc. (H, total)
    qk_scale,  # scale * log2(e)
    scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    bh = tl.program_id(1) + bh_start
    b, h, Tq, Tk, row_base, rng_base = _program_sequence(CuSeqlens, bh, H, Tq, Tk, VARLEN)
    if VARLEN:
        if tl.program_id(0) * BLOCK_N >= Tk:  # a key block past this sequence's end (the grid covers max_seqlen)
            return
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kt + offs_d[None, :],
                   keys, Tk, offs_d, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vt + offs_d[None, :],
                   keys, Tk, offs_d, HEAD_DIM, BLOCK_D)
    valid = _key_valid(Mask, b * stride_mb, stride_mt, keys, Tk, HAS_MASK)  # (BLOCK_N,)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = dOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :]
    keep_scale = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Tq, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(q_ptrs + start_m * stride_qt, rows, Tq, offs_d, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_ptrs + start_m * stride_gt, rows, Tq, offs_d, HEAD_DIM, BLOCK_D)
        lse = tl.load(Lse + row_base + rows, mask=rows < Tq, other=float("inf"))
        # A row with no real key has lse = -inf; +inf instead makes its P exactly 0 (not exp(inf - inf) = NaN).
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(Delta + row_base + rows, mask=rows < Tq, other=0.0)
        # Work transposed, (BLOCK_N, BLOCK_M), so dK and dV come out of plain dots without transposing accumulators.
        s_t = _dot(k, tl.trans(q), None, PRECISION) * qk_scale
        s_t = tl.where(valid[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if PRECISE:  # see the dQ kernel; the S tiles here are the transposes of its tiles, so the sums match
            p_t = p_t * tl.load(RowScale + row_base + rows, mask=rows < Tq, other=0.0)[None, :]
        dp_t = _dot(v, tl.trans(do), None, PRECISION)  # dO V^T, before the dropout mask
        if DROPOUT:
            # The mask in the forward's (query, key) orientation, transposed: the same draws as the other kernels.
            keep = tl.trans(_dropout_keep(seed, rng_base, rows, tl.program_id(0) * BLOCK_N, Tk, dropout_p, BLOCK_M,
                                          BLOCK_N))
            # dV sums the dropped probabilities; the 1/(1-p) factor is applied once at the end.
            dv = _dot(_cast(tl.where(keep, p_t, 0.0), do.dtype, PRECISION), do, dv, PRECISION)
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            dv = _dot(_cast(p_t, do.dtype, PRECISION), do, dv, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward; zero wherever P is zero
        dk = _dot(_cast(ds_t, q.dtype, PRECISION), q, dk, PRECISION)
    if DROPOUT:
        dv = dv * keep_scale
    dk = dk * scale
    out_off = b * stride_dkb + h * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :]  # dK, dV: same layout
    _store_rows(dK + out_off, dk, keys, Tk, offs_d, HEAD_DIM, BLOCK_D, PRECISION)
    _store_rows(dV + out_off, dv, keys, Tk, offs_d, HEAD_DIM, BLOCK_D, PRECISION)


@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_dq_kernel(
    Q, dOut,  # (B, Tq, H, D) each
    K, V,  # (B, Tk, H, D) each
    Lse, Delta,  # (B, H, Tq) fp32 contiguous
    RowScale,  # (B, H, Tq) fp32 contiguous, written with PRECISE: 1 / sum_k exp(s - lse) per row
    Mask,  # (B, Tk) uint8 (unused without HAS_MASK)
    CuSeqlens,  # VARLEN: (B + 1,) int32 sequence offsets (see _program_sequence)
    dQ,  # (B, Tq, H, D) contiguous, written in q's dtype
    stride_qb, stride_qt, stride_qh, stride_gb, stride_gt, stride_gh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_mb, stride_mt, stride_dqb, stride_dqt, stride_dqh,
    H, Tq, Tk, bh_start,  # VARLEN: Tq = Tk = total tokens, as in the dK/dV kernel
    qk_scale, scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    bh = tl.program_id(1) + bh_start
    b, h, Tq, Tk, row_base, rng_base = _program_sequence(CuSeqlens, bh, H, Tq, Tk, VARLEN)
    if VARLEN:
        if tl.program_id(0) * BLOCK_M >= Tq:  # a query block past this sequence's end
            return
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                   rows, Tq, offs_d, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_rows(dOut + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :],
                    rows, Tq, offs_d, HEAD_DIM, BLOCK_D)
    lse = tl.load(Lse + row_base + rows, mask=rows < Tq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # see the dK/dV kernel
    keep_scale = 1.0 / (1.0 - dropout_p)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    if PRECISE:
        # fp32: lse is a rounded ~|lse|-sized number, so exp(s - lse) is off by up to ~|lse| * 2^-24 relative per
        # row (1e-5 at scores ~100), more than the fp32 reference rule allows. A first pass over the keys
        # renormalizes each row by its own sum of exp(s - lse), from the same dot products the two gradient kernels
        # recompute, which cancels that error, and takes delta = sum_k P * dP from those P (rowsum(dO * O) would
        # carry the forward's rounding instead). Half precision skips it: there the errors are far below the dtype's.
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        row_dot = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, Tk, BLOCK_N):
            keys = start_n + offs_n
            k = _load_rows(k_ptrs + start_n * stride_kt, keys, Tk, offs_d, HEAD_DIM, BLOCK_D)
            v = _load_rows(v_ptrs + start_n * stride_vt, keys, Tk, offs_d, HEAD_DIM, BLOCK_D)
            valid = _key_valid(Mask, b * stride_mb, stride_mt, keys, Tk, HAS_MASK)
            s = tl.where(valid[None, :], _dot(q, tl.trans(k), None, PRECISION) * qk_scale, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dp = _dot(do, tl.trans(v), None, PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, rng_base, rows, start_n, Tk, dropout_p, BLOCK_M, BLOCK_N)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            row_sum += tl.sum(p, axis=1)
            row_dot += tl.sum(p * dp, axis=1)
        inv_row_sum = 1.0 / tl.where(row_sum == 0.0, 1.0, row_sum)  # 0 only on rows without a real key
        tl.store(RowScale + row_base + rows, inv_row_sum, mask=rows < Tq)
        delta = row_dot * inv_row_sum
        tl.store(Delta + row_base + rows, delta, mask=rows < Tq)
    else:
        delta = tl.load(Delta + row_base + rows, mask=rows < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Tk, BLOCK_N):
        keys = start_n + offs_n
        k = _load_rows(k_ptrs + start_n * stride_kt, keys, Tk, offs_d, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_ptrs + start_n * stride_vt, keys, Tk, offs_d, HEAD_DIM, BLOCK_D)
        valid = _key_valid(Mask, b * stride_mb, stride_mt, keys, Tk, HAS_MASK)
        s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        if PRECISE:
            p = p * inv_row_sum[:, None]
        dp = _dot(do, tl.trans(v), None, PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, rng_base, rows, start_n, Tk, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, k.dtype, PRECISION), k, dq, PRECISION)
    _store_rows(dQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :], dq * scale,
                rows, Tq, offs_d, HEAD_DIM, BLOCK_D, PRECISION)


# --------------------------------------------------------------------------------------------------------------
# launcher


def _bwd_config(block_d: int, dtype, arch: int = 90) -> tuple[tuple[int, int], tuple[int, int], int, int]:
    """((dK/dV BLOCK_M, BLOCK_N), (dQ BLOCK_M, BLOCK_N), num_warps, num_stages) per arch class (hopper_class), not
    timed (no GPU where this was written); every config compiles without ptxas spills on sm_80 and sm_90 (Triton
    3.9; tests/ops/test_triton_compile.py). On sm_8x the dK/dV kernel streams 16 query rows instead of 32 at head
    dims up to 64, which removes its 8-16 B of spills there.

    The program's own block (keys for dK/dV, queries for dQ) is large, to reuse it across the inner loop; the streamed
    block is small, to keep the fp32 accumulators and the S/P/dP tiles in registers (Triton tutorial 06's 32 x 128 and
    128 x 32). fp32 (FMA dots, operands in registers) uses small square tiles, the same in both kernels, which
    PRECISE needs (identical dot inputs, identical rounding).
    """
    if dtype == torch.float32:
        # ptxas holds these FMA kernels near 80 registers with 8 warps and spills 4-16 B in one variant or another
        # (dropout, varlen); the configs below are the ones found spill-free in every variant (the table).
        if block_d <= 64:
            return ((32, 32), (32, 32), 8, 2) if hopper_class(arch) else ((32, 32), (32, 32), 4, 2)
        return ((16, 16), (16, 16), 8, 1) if hopper_class(arch) else ((16, 16), (16, 16), 4, 2)
    if block_d <= 64:
        return ((32, 128), (128, 32), 8, 3) if hopper_class(arch) else ((16, 128), (128, 32), 8, 2)
    # sm_8x: 32 streamed query rows in dK/dV spill 12 B at head dims 80-96 with dropout on Triton 3.6; 16 do not.
    return ((32, 64), (128, 32), 8, 2) if hopper_class(arch) else ((16, 64), (128, 32), 8, 2)


def attention_bwd_triton(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed, fallback):
    """dq, dk, dv: (B, T, H, D) contiguous in q's / k's / v's dtype. Same contract as the torch implementation.

    dout, out: (B, Tq, H, D); q: (B, Tq, H, D); k, v: (B, Tk, H, D); lse: (B, H, Tq) fp32 from the forward;
    key_padding_mask: (B, Tk) bool or None. ``fallback`` (the torch implementation) runs unsupported inputs.
    """
    if unsupported_reason(q, k, v) is not None or dout.shape != q.shape or out.shape != q.shape:
        return fallback(dout, q, k, v, out, lse, key_padding_mask, dropout_p, scale, seed)
    return launch_bwd(dout, q, k, v, out, lse, key_padding_mask, None, 0, dropout_p, scale, seed)


def launch_bwd(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """Run the backward kernels on inputs the forward's checks accept; returns (dq, dk, dv).

    Padded (cu_seqlens None): (B, T, H, D) tensors, lse (B, H, Tq). Varlen: (total, H, D) tensors, lse (H, total),
    cu_seqlens (nseq + 1,) int32 on q's device, max_seqlen >= the longest sequence (see triton.launch_fwd).
    """
    varlen = cu_seqlens is not None
    q, k, v, dout, out = (last_dim_contiguous(t) for t in (q, k, v, dout, out))
    nheads, d = q.shape[-2:]
    if varlen:
        total = q.shape[0]
        batch, tq, tk, seq_args = cu_seqlens.numel() - 1, max_seqlen, max_seqlen, (total, total)
    else:
        batch, tq, tk = q.shape[0], q.shape[1], k.shape[1]
        seq_args = (tq, tk)
    lse = lse.float().contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    # Every dtype takes the exact path: in fp16/bf16, delta = rowsum(dO * O) from the half-precision O does not
    # cancel on nearly one-hot rows (bf16 gradients up to 3x over the accuracy rule, fp16 dq 20x worse at scores of
    # 1e4, found by tests/fuzz). It costs one more pass over K/V in the dQ kernel.
    precise = True
    row_scale = torch.empty(lse.shape, dtype=torch.float32, device=q.device) if precise else delta
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    mask, mask_strides = mask_arg(key_padding_mask, q)
    block_d = head_block(d)
    (kv_m, kv_n), (q_m, q_n), warps, stages = _bwd_config(block_d, q.dtype, target_arch(q))
    kv_m, kv_n, q_m, q_n = clamp_block(kv_m, tq), clamp_block(kv_n, tk), clamp_block(q_m, tq), clamp_block(q_n, tk)
    seed_int = seed_value(seed, dropout_p)
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, HAS_MASK=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
                  PRECISE=precise, PRECISION=dot_precision(q.dtype), VARLEN=varlen, num_warps=warps,
                  num_stages=stages)
    strides = (*seq_strides(q, varlen), *seq_strides(dout, varlen), *seq_strides(k, varlen),
               *seq_strides(v, varlen), *mask_strides)
    cu = cu_seqlens if varlen else mask  # never read without VARLEN
    with device_guard(q):
        if not precise:  # PRECISE computes delta in the dQ kernel
            # rowsum(dO * O) is per token: packed tensors run as one batch of `total` rows, whose (1, H, total)
            # output is the (H, total) layout of varlen lse.
            o4, do4 = (out[None], dout[None]) if varlen else (out, dout)
            rows = o4.shape[1]
            for bh_start, bh_count in bh_chunks(o4.shape[0] * nheads):
                _attention_bwd_delta_kernel[(triton.cdiv(rows, 128), bh_count)](
                    o4, do4, delta, *o4.stride()[:3], *do4.stride()[:3], nheads, rows, bh_start,
                    HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=128, num_warps=4,
                )
        for bh_start, bh_count in bh_chunks(batch * nheads):
            # dQ first: with PRECISE it writes the row scales that the dK/dV kernel reads.
            _attention_bwd_dq_kernel[(triton.cdiv(tq, q_m), bh_count)](
                q, dout, k, v, lse, delta, row_scale, mask, cu, dq, *strides, *seq_strides(dq, varlen),
                nheads, *seq_args, bh_start, scale * LOG2E, scale, dropout_p, seed_int,
                BLOCK_M=q_m, BLOCK_N=q_n, **common,
            )
            _attention_bwd_dkdv_kernel[(triton.cdiv(tk, kv_n), bh_count)](
                q, dout, k, v, lse, delta, row_scale, mask, cu, dk, dv, *strides, *seq_strides(dk, varlen),
                nheads, *seq_args, bh_start, scale * LOG2E, scale, dropout_p, seed_int,
                BLOCK_M=kv_m, BLOCK_N=kv_n, **common,
            )
    return dq, dk, dv
