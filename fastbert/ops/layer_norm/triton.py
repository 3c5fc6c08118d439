"""Triton kernels for ``fastbert::add_layer_norm_fwd`` / ``add_layer_norm_bwd``: LayerNorm(dropout(x) + residual).

Also the row-kernel toolkit that bias_gelu/triton.py reuses for its fused GELU + LayerNorm: tile sizing, the
LayerNorm forward/backward math on a register tile, the Philox dropout mask and the dweight/dbias partial sums.

Blocking: a program owns a (ROWS, BLOCK_N) tile, BLOCK_N = next_power_of_2(N) so a whole row sits in registers
(one read of each input, statistics in two passes over registers, no variance cancellation). Short rows are
packed ROWS to a tile so every program moves ~_TILE_ELEMS elements; num_warps = tile / 256 gives each thread 8
contiguous elements (one 16-byte load for half dtypes, two for fp32) and a full row of 768-1024 four warps,
which keeps enough loads in flight per SM to approach copy bandwidth on H100 (not measured yet: the benchmarks
will tell; compiled for sm_90 the accesses are 16-byte ld.global.v4 and nothing spills below 8192 columns, where
the backward spills 8-24 bytes). Rows longer than _MAX_FUSED_N would spill heavily; they run the torch
implementation instead (no BERT comes near).

Dropout: keep[row, col] = Philox4x32-10(key=seed, counter=(col // 4, row, 0, 0))[col % 4] >= ceil(p * 2^24)
on the top 24 bits. The counter holds row and column separately, so no flat int32 offset can overflow (rows
and columns each below 2^32) and the mask does not depend on the tiling: the backward regenerates exactly the
forward's mask. One Philox call yields four words, used for four adjacent columns: Philox is ~60 integer ops
per call, and one call per element would make training-mode LayerNorm compute-bound on H100.

Backward: each of P programs walks a contiguous block of row tiles and keeps dweight/dbias partial sums in fp32
registers, written once to a (P, N) buffer that torch sums: deterministic (fixed P, fixed order), no atomics.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from fastbert.ops import _backend

_TILE_ELEMS = 1024  # elements per program tile: 8 per thread at 4 warps
# Backward row tiles are 4x larger (16 warps): each program walks many tiles, and fewer, fatter programs keep the
# (programs, N) dweight/dbias partials small (2 programs per SM: ~2.5% extra traffic at 16384 x 768).
_BWD_TILE_ELEMS = 4096
# Longest row kept in registers: 16 warps x 32 threads x 16 fp32 per tensor. Compiled for sm_90, the backward at
# 16384 spills ~1 KB of stack per thread; rows beyond this run the torch implementation.
_MAX_FUSED_N = 8192
_MAX_WARPS = 16
# Triton's interpreter (3.x) rounds fp32 -> bf16 casts toward zero; GPUs round to nearest even. cast_to rounds by
# hand under the interpreter so that CI checks the numerics the GPU will produce.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# --------------------------------------------------------------------------------------------------------------
# launch configuration (shared with bias_gelu/triton.py and softmax/triton.py)


def row_tile(n_rows: int, n_cols: int, tile_elems: int | None = None) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, num_warps) for a kernel that keeps whole rows of n_cols elements in registers."""
    tile_elems = _TILE_ELEMS if tile_elems is None else tile_elems
    block_n = max(triton.next_power_of_2(n_cols), 16)  # >= 4 columns: dropout draws four at a time
    rows = min(max(tile_elems // block_n, 1), triton.next_power_of_2(max(n_rows, 1)))
    num_warps = min(max(rows * block_n // 256, 1), _MAX_WARPS)
    return rows, block_n, num_warps


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def partial_programs(n_tiles: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """(programs, tiles_per_program) for a backward that reduces over rows into per-program partial sums.

    On a GPU: enough programs for ~32 resident warps per SM (loads in flight to hide latency) and no more, so the
    (P, N) partial buffer stays small next to the activations. The interpreter runs programs one by one: a handful
    suffices.
    """
    if device.type == "cuda":
        target = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        target *= max(32 // num_warps, 1)
    else:
        target = 8
    per_program = triton.cdiv(n_tiles, min(n_tiles, target))
    return triton.cdiv(n_tiles, per_program), per_program


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (nothing to do for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dropout_args(dropout_p: float, seed) -> tuple[int, int, float]:
    """(seed, drop_threshold, scale) kernel arguments; seed is a (1,) int64 CPU tensor (.item() never syncs a GPU)."""
    if dropout_p <= 0.0:
        return 0, 0, 1.0
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor ((1,) int64, e.g. fastbert.ops._utils.new_seed())")
    return int(seed.reshape(-1)[0].item()), math.ceil(dropout_p * 2**24), 1.0 / (1.0 - dropout_p)


# --------------------------------------------------------------------------------------------------------------
# jit helpers (shared)


@triton.jit
def cast_to(v, DTYPE: tl.constexpr):
    """v (fp32) cast to DTYPE with round-to-nearest-even, also under the interpreter (see _INTERPRET)."""
    if _INTERPRET and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # RNE on the 16 dropped bits (finite values; NaN is not preserved)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def dropout_keep(seed, rows, drop_threshold, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(ROWS, BLOCK_N) bool mask of kept elements for rows `rows` (ROWS,) and columns 0..BLOCK_N-1."""
    groups = tl.arange(0, BLOCK_N // 4)
    c0 = groups[None, :] + rows[:, None] * 0  # (ROWS, BLOCK_N // 4) counter word 0: column group
    c1 = rows[:, None] + groups[None, :] * 0  # counter word 1: row
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # Interleave the four words: column 4 * g + k takes word k of group g.
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [ROWS, BLOCK_N])
    return (r >> 8).to(tl.int32) >= drop_threshold


@triton.jit
def layer_norm_tile(z, mask, w, b, N, eps, HAS_BIAS: tl.constexpr):
    """z (ROWS, BLOCK_N) fp32, zero where ~mask; w, b (BLOCK_N,) fp32 -> (out fp32, mean (ROWS,), rstd (ROWS,))."""
    mean = tl.sum(z, axis=1) / N
    centered = tl.where(mask, z - mean[:, None], 0.0)
    # Two passes over registers: var = E[(z - mean)^2] does not cancel when |mean| >> std.
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    out = centered * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        out += b[None, :]
    return out, mean, rstd


@triton.jit
def layer_norm_grad_tile(dout, z, mask, w, mean, rstd, N):
    """Gradient through out = LayerNorm(z): dout, z (ROWS, BLOCK_N) fp32 (zero where ~mask), w (BLOCK_N,) fp32,
    mean, rstd (ROWS,) -> (dz, xhat), with xhat = (z - mean) * rstd zeroed where ~mask (for dweight)."""
    xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dout * w[None, :]
    c1 = tl.sum(xhat * wdy, axis=1) / N
    c2 = tl.sum(wdy, axis=1) / N
    dz = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    return dz, xhat


# --------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def pre_norm_sum(X, RESIDUAL, offs, mask, keep, drop_scale, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """z = dropout(x) + residual in fp32, zero where ~mask; keep: the dropout mask (unused without dropout)."""
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        z = tl.where(keep, z * drop_scale, 0.0)
    if HAS_RESIDUAL:
        z += tl.load(RESIDUAL + offs, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not mean a fresh specialization
def _add_layer_norm_fwd_kernel(
    X,  # (M, N) activation: fp32 / fp16 / bf16
    RESIDUAL,  # (M, N) x's dtype, or None when not HAS_RESIDUAL
    W,  # (N,) any float dtype
    B,  # (N,) any float dtype, or None when not HAS_BIAS
    OUT,  # (M, N) x's dtype
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    M, N,  # rows, features (row stride = N: inputs are contiguous)
    eps,  # fp32
    seed,  # int: Philox key of the dropout mask
    drop_threshold,  # int32: drop where the 24-bit draw < ceil(p * 2^24)
    drop_scale,  # fp32: 1 / (1 - p)
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]  # int64: M * N may exceed 2^31
    keep = mask
    if HAS_DROPOUT:
        keep = dropout_keep(seed, rows, drop_threshold, ROWS, BLOCK_N)
    z = pre_norm_sum(X, RESIDUAL, offs, mask, keep, drop_scale, HAS_RESIDUAL, HAS_DROPOUT)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = w  # placeholder, unused without bias
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    out, mean, rstd = layer_norm_tile(z, mask, w, b, N, eps, HAS_BIAS)
    tl.store(OUT + offs, cast_to(out, OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rows < M)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not mean a fresh specialization
def _add_layer_norm_bwd_kernel(
    DOUT,  # (M, N) x's dtype
    X,  # (M, N)
    RESIDUAL,  # (M, N) or None when not HAS_RESIDUAL
    W,  # (N,) any float dtype
    MEAN, RSTD,  # (M,) fp32, saved by the forward
    DX,  # (M, N) x's dtype
    DRESIDUAL,  # (M, N) residual's dtype with dropout; else None (the residual's gradient is dx)
    DW_PARTIAL,  # (P, N) fp32: this program's sum over its rows of dout * xhat
    DB_PARTIAL,  # (P, N) fp32: sum of dout, or None when not HAS_BIAS
    M, N,
    tiles_per_program,  # row tiles walked by each program, contiguous
    seed, drop_threshold, drop_scale,  # as in the forward: the same mask is regenerated
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        # Rows past M (last program) load as zeros and contribute nothing.
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        keep = mask
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows, drop_threshold, ROWS, BLOCK_N)
        z = pre_norm_sum(X, RESIDUAL, offs, mask, keep, drop_scale, HAS_RESIDUAL, HAS_DROPOUT)
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dz, xhat = layer_norm_grad_tile(dout, z, mask, w, mean, rstd, N)
        dw += tl.sum(dout * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dout, axis=0)
        if HAS_DROPOUT:
            if HAS_RESIDUAL:
                tl.store(DRESIDUAL + offs, cast_to(dz, DRESIDUAL.dtype.element_ty), mask=mask)
            dz = tl.where(keep, dz * drop_scale, 0.0)
        tl.store(DX + offs, cast_to(dz, DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)


# --------------------------------------------------------------------------------------------------------------
# launchers


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """(M, N) contiguous view of a (..., N) tensor (copies only when it is not contiguous)."""
    return t.contiguous().view(math.prod(t.shape[:-1]), t.shape[-1])


def sum_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, N) fp32 per-program partial sums -> (N,) in `dtype` (torch's reduction is deterministic)."""
    return partial.sum(dim=0).to(dtype)


def _add_layer_norm_fwd_triton(x, residual, weight, bias, eps, dropout_p, seed):
    """x, residual: (..., N); weight, bias: (N,) -> out (..., N) in x's dtype, mean, rstd x.shape[:-1] fp32."""
    n = x.shape[-1]
    if n > _MAX_FUSED_N:
        from fastbert.ops.layer_norm import _add_layer_norm_fwd_torch

        return _add_layer_norm_fwd_torch(x, residual, weight, bias, eps, dropout_p, seed)
    x2 = rows_view(x)
    m = x2.shape[0]
    out = torch.empty_like(x2)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if m == 0 or n == 0:
        return out.view(x.shape), mean.zero_(), rstd.zero_()
    rows, block_n, num_warps = row_tile(m, n)
    seed_i, threshold, scale = dropout_args(dropout_p, seed)
    with on_device(x):
        _add_layer_norm_fwd_kernel[(triton.cdiv(m, rows),)](
            x2, None if residual is None else rows_view(residual), weight.contiguous(),
            None if bias is None else bias.contiguous(), out, mean, rstd, m, n, eps, seed_i, threshold, scale,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return out.view(x.shape), mean, rstd


def _add_layer_norm_bwd_triton(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed):
    """-> dx (x's dtype), dresidual (residual's dtype with dropout, else empty), dweight, dbias (parameters' dtypes,
    or empty)."""
    n = x.shape[-1]
    if n > _MAX_FUSED_N:
        from fastbert.ops.layer_norm import _add_layer_norm_bwd_torch

        return _add_layer_norm_bwd_torch(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed)
    x2 = rows_view(x)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    separate_dresidual = residual is not None and dropout_p > 0.0  # else the residual's gradient is dx
    dresidual = torch.empty_like(rows_view(residual)) if separate_dresidual else x.new_empty(0)
    rows, block_n, num_warps = row_tile(m, n, _BWD_TILE_ELEMS)
    n_tiles = triton.cdiv(m, rows)
    dbias = weight.new_empty(0) if bias is None else torch.zeros_like(bias)
    if n_tiles == 0 or n == 0:  # nothing to normalize: zero gradients
        dresidual = dresidual.view(residual.shape) if separate_dresidual else dresidual
        return dx.view(x.shape), dresidual, torch.zeros_like(weight), dbias
    programs, per_program = partial_programs(n_tiles, num_warps, x.device)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    db_partial = torch.empty_like(dw_partial) if bias is not None else None
    seed_i, threshold, scale = dropout_args(dropout_p, seed)
    with on_device(x):
        _add_layer_norm_bwd_kernel[(programs,)](
            rows_view(dout), x2, None if residual is None else rows_view(residual), weight.contiguous(),
            mean.contiguous(), rstd.contiguous(), dx, dresidual if separate_dresidual else None, dw_partial,
            db_partial, m, n, per_program, seed_i, threshold, scale,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    if separate_dresidual:
        dresidual = dresidual.view(residual.shape)
    if bias is not None:
        dbias = sum_partials(db_partial, bias.dtype)
    return dx.view(x.shape), dresidual, sum_partials(dw_partial, weight.dtype), dbias


_backend.register_impl("add_layer_norm_fwd", "triton", _add_layer_norm_fwd_triton)
_backend.register_impl("add_layer_norm_bwd", "triton", _add_layer_norm_bwd_triton)
