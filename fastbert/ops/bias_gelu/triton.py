"""Triton kernels for bias + GELU and bias + GELU + LayerNorm (``fastbert::bias_gelu_*``, ``bias_gelu_layer_norm_*``).

GELU is evaluated in fp32 on x + bias (one rounding, at the store): exact erf form via tl.math.erf (libdevice
erff on GPU, math.erf under the interpreter; in Triton's core math since 3.0), or the tanh approximation written
with exp as 0.5 * (1 + tanh(u)) = sigmoid(2u): tanh is not in tl.math (only in the CUDA-only libdevice module),
and built from exp(-2|u|) it neither overflows nor cancels in the tails (no NaN, full relative accuracy).

bias_gelu: an elementwise (BLOCK_M, BLOCK_N) tile per program over a 2-D grid (row tiles, column tiles), so the
bias index is the column with no per-element division and offsets are int64 per row. 4096 elements per program
at 4 warps = 32 per thread: four 16-byte accesses in flight per thread for half dtypes, enough to stream at copy
bandwidth on H100. bias_gelu_layer_norm: the LayerNorm row kernels of layer_norm/triton.py with the GELU prologue
(the backward recomputes gelu(x + bias) instead of reading a saved activation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.ops import _backend
from fastbert.ops.layer_norm.triton import (
    _BWD_TILE_ELEMS,
    _MAX_FUSED_N,
    cast_to,
    layer_norm_grad_tile,
    layer_norm_tile,
    on_device,
    partial_programs,
    row_tile,
    rows_view,
    sum_partials,
)

_EW_TILE = 4096  # elements per elementwise program
_EW_MAX_BLOCK_N = 1024  # columns per elementwise tile (wider rows use several column tiles)
_EW_WARPS = 4

# --------------------------------------------------------------------------------------------------------------
# GELU and its derivative on fp32 tiles


@triton.jit
def _tanh_gelu_parts(h):
    """(s, q, u') for the tanh GELU: s = 0.5 (1 + tanh u) = sigmoid(2u), q = s (1 - s), u' = du/dh.

    With a = exp(-2|u|) in (0, 1]: s = 1 / (1 + a) or a / (1 + a) by the sign of u, q = a / (1 + a)^2. Nothing
    overflows and 1 - s is never formed by cancellation (it would cost ~1e-6 absolute in the fp32 gradient).
    """
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2 / pi) * (h + 0.044715 h^3)
    a = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + a)
    s = tl.where(u >= 0.0, r, a * r)
    du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)  # 0.134145 = 3 * 0.044715
    return s, a * r * r, du


@triton.jit
def gelu(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        s, _, _ = _tanh_gelu_parts(h)
        return h * s
    else:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(h, APPROX_TANH: tl.constexpr):
    """d gelu(h) / dh."""
    if APPROX_TANH:
        s, q, du = _tanh_gelu_parts(h)
        return s + 2.0 * h * q * du  # 0.5 (1 + t) + 0.5 h (1 - t^2) du, 1 - t^2 = 4 s (1 - s)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327  # + h * pdf(h), 1 / sqrt(2 pi)


@triton.jit
def _load_pre_activation(X, BIAS, offs, mask, cols, col_ok, HAS_BIAS: tl.constexpr):
    """h = x + bias in fp32, (BLOCK_M, BLOCK_N); zero where ~mask."""
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return h


# --------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _bias_gelu_kernel(
    X,  # (M, N) activation: fp32 / fp16 / bf16
    BIAS,  # (N,) any float dtype, or None when not HAS_BIAS
    DOUT,  # (M, N) x's dtype (backward only, else None)
    OUT,  # (M, N) x's dtype: gelu(x + bias) (forward) or dout * gelu'(x + bias) (backward)
    M, N,
    HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]  # int64: M * N may exceed 2^31
    h = _load_pre_activation(X, BIAS, offs, mask, cols, col_ok, HAS_BIAS)
    if BACKWARD:
        y = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32) * gelu_grad(h, APPROX_TANH)
    else:
        y = gelu(h, APPROX_TANH)
    tl.store(OUT + offs, cast_to(y, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_layer_norm_fwd_kernel(
    X,  # (M, N) activation: fp32 / fp16 / bf16
    BIAS,  # (N,) GELU input bias, or None when not HAS_BIAS
    W,  # (N,) LayerNorm weight, any float dtype
    LN_BIAS,  # (N,) LayerNorm bias, or None when not HAS_LN_BIAS
    OUT,  # (M, N) x's dtype
    MEAN, RSTD,  # (M,) fp32
    M, N, eps,
    HAS_BIAS: tl.constexpr, HAS_LN_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    y = tl.where(mask, gelu(_load_pre_activation(X, BIAS, offs, mask, cols, col_ok, HAS_BIAS), APPROX_TANH), 0.0)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = w  # placeholder, unused without ln_bias
    if HAS_LN_BIAS:
        b = tl.load(LN_BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    out, mean, rstd = layer_norm_tile(y, mask, w, b, N, eps, HAS_LN_BIAS)
    tl.store(OUT + offs, cast_to(out, OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rows < M)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _bias_gelu_layer_norm_bwd_kernel(
    DOUT,  # (M, N) x's dtype
    X,  # (M, N)
    BIAS,  # (N,) or None when not HAS_BIAS
    W,  # (N,) LayerNorm weight
    MEAN, RSTD,  # (M,) fp32, saved by the forward
    DX,  # (M, N) x's dtype: gradient of x + bias
    DW_PARTIAL,  # (P, N) fp32: this program's sum of dout * xhat
    DB_PARTIAL,  # (P, N) fp32: sum of dout, or None when not HAS_LN_BIAS
    DH_PARTIAL,  # (P, N) fp32: sum of dx (the GELU bias's gradient), or None when not HAS_DBIAS
    M, N,
    tiles_per_program,  # row tiles walked by each program, contiguous
    HAS_BIAS: tl.constexpr, HAS_LN_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dh_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        h = _load_pre_activation(X, BIAS, offs, mask, cols, col_ok, HAS_BIAS)
        y = tl.where(mask, gelu(h, APPROX_TANH), 0.0)
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dy, yhat = layer_norm_grad_tile(dout, y, mask, w, mean, rstd, N)
        dw += tl.sum(dout * yhat, axis=0)
        if HAS_LN_BIAS:
            db += tl.sum(dout, axis=0)
        dh = dy * gelu_grad(h, APPROX_TANH)
        if HAS_DBIAS:
            dh_sum += tl.sum(tl.where(mask, dh, 0.0), axis=0)
        tl.store(DX + offs, cast_to(dh, DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)
    if HAS_LN_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)
    if HAS_DBIAS:
        tl.store(DH_PARTIAL + pid * N + cols, dh_sum, mask=col_ok)


# --------------------------------------------------------------------------------------------------------------
# launchers


def _bias_gelu_launch(x, bias, dout, approximate, out=None):
    x2 = rows_view(x)
    m, n = x2.shape
    out = torch.empty_like(x2) if out is None else out.view(m, n)  # out may be x itself (elementwise)
    if out.numel() == 0:
        return out.view(x.shape)
    block_n = min(triton.next_power_of_2(n), _EW_MAX_BLOCK_N)
    block_m = min(max(_EW_TILE // block_n, 1), triton.next_power_of_2(m))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    with on_device(x):
        _bias_gelu_kernel[grid](
            x2, None if bias is None else bias.contiguous(), None if dout is None else rows_view(dout), out, m, n,
            HAS_BIAS=bias is not None, BACKWARD=dout is not None, APPROX_TANH=approximate == "tanh",
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_EW_WARPS,
        )
    return out.view(x.shape)


def _bias_gelu_fwd_triton(x, bias, approximate):
    """x: (..., N); bias: (N,) or None -> gelu(x + bias), x's shape and dtype."""
    return _bias_gelu_launch(x, bias, None, approximate)


def _bias_gelu_fwd_inplace_triton(x, bias, approximate):
    """x <- gelu(x + bias) in place (x contiguous)."""
    _bias_gelu_launch(x, bias, None, approximate, out=x)


def _bias_gelu_bwd_triton(dout, x, bias, approximate, need_dbias):
    """dout, x: (..., N) -> dout * gelu'(x + bias) (x's shape and dtype), dbias (its column sum, by torch: the
    elementwise kernel has no row reduction; empty unless need_dbias and a bias)."""
    from fastbert.ops.bias_gelu import _dbias

    dx = _bias_gelu_launch(x, bias, dout, approximate)
    return dx, _dbias(dx, bias, need_dbias)


def _bias_gelu_layer_norm_fwd_triton(x, bias, weight, ln_bias, eps, approximate):
    """x: (..., N); bias, weight, ln_bias: (N,) -> out (x's dtype), mean, rstd (x.shape[:-1], fp32)."""
    n = x.shape[-1]
    if n > _MAX_FUSED_N:  # rows too long for registers: the torch implementation
        from fastbert.ops.bias_gelu import _bias_gelu_layer_norm_fwd_torch

        return _bias_gelu_layer_norm_fwd_torch(x, bias, weight, ln_bias, eps, approximate)
    x2 = rows_view(x)
    m = x2.shape[0]
    out = torch.empty_like(x2)
    mean = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.zeros_like(mean)
    if m == 0 or n == 0:
        return out.view(x.shape), mean, rstd
    rows, block_n, num_warps = row_tile(m, n)
    with on_device(x):
        _bias_gelu_layer_norm_fwd_kernel[(triton.cdiv(m, rows),)](
            x2, None if bias is None else bias.contiguous(), weight.contiguous(),
            None if ln_bias is None else ln_bias.contiguous(), out, mean, rstd, m, n, eps,
            HAS_BIAS=bias is not None, HAS_LN_BIAS=ln_bias is not None, APPROX_TANH=approximate == "tanh",
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return out.view(x.shape), mean, rstd


def _bias_gelu_layer_norm_bwd_triton(dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias):
    """-> dx (x's dtype), dbias (bias's dtype, empty unless need_dbias and a bias), dweight (weight's dtype),
    dln_bias (ln_bias's dtype, or empty without ln_bias)."""
    n = x.shape[-1]
    if n > _MAX_FUSED_N:
        from fastbert.ops.bias_gelu import _bias_gelu_layer_norm_bwd_torch

        return _bias_gelu_layer_norm_bwd_torch(dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias)
    x2 = rows_view(x)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    has_dbias = need_dbias and bias is not None
    dln_bias = weight.new_empty(0) if ln_bias is None else torch.zeros_like(ln_bias)
    dbias = torch.zeros_like(bias) if has_dbias else x.new_empty(0)
    rows, block_n, num_warps = row_tile(m, n, _BWD_TILE_ELEMS)
    n_tiles = triton.cdiv(m, rows)
    if n_tiles == 0 or n == 0:
        return dx.view(x.shape), dbias, torch.zeros_like(weight), dln_bias
    programs, per_program = partial_programs(n_tiles, num_warps, x.device)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    db_partial = torch.empty_like(dw_partial) if ln_bias is not None else None
    dh_partial = torch.empty_like(dw_partial) if has_dbias else None
    with on_device(x):
        _bias_gelu_layer_norm_bwd_kernel[(programs,)](
            rows_view(dout), x2, None if bias is None else bias.contiguous(), weight.contiguous(),
            mean.contiguous(), rstd.contiguous(), dx, dw_partial, db_partial, dh_partial, m, n, per_program,
            HAS_BIAS=bias is not None, HAS_LN_BIAS=ln_bias is not None, HAS_DBIAS=has_dbias,
            APPROX_TANH=approximate == "tanh", ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    if ln_bias is not None:
        dln_bias = sum_partials(db_partial, ln_bias.dtype)
    if has_dbias:
        dbias = sum_partials(dh_partial, bias.dtype)
    return dx.view(x.shape), dbias, sum_partials(dw_partial, weight.dtype), dln_bias


_backend.register_impl("bias_gelu_fwd", "triton", _bias_gelu_fwd_triton)
_backend.register_impl("bias_gelu_fwd_", "triton", _bias_gelu_fwd_inplace_triton)
_backend.register_impl("bias_gelu_bwd", "triton", _bias_gelu_bwd_triton)
_backend.register_impl("bias_gelu_layer_norm_fwd", "triton", _bias_gelu_layer_norm_fwd_triton)
_backend.register_impl("bias_gelu_layer_norm_bwd", "triton", _bias_gelu_layer_norm_bwd_triton)
