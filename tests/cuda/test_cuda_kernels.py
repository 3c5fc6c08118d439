"""The CUDA kernels of csrc/cuda against the float64 NumPy references, through the ctypes harness (no torch binding).

Skipped without nvcc or a visible CUDA GPU. The first run compiles csrc/cuda/*.cu for the local GPU (-arch=native,
cached in ~/.cache/fastbert/cuda-harness). Inputs are rounded to the kernel's dtype first, so the reference sees
exactly what the kernel sees; dropout masks come from the NumPy model of the documented Philox mapping, so a
mask that differs in a single element fails the comparison. Tolerance: max |kernel - ref| <= tol[dtype] *
max(1, max |ref|) (fp32 2e-5, fp16 4e-3, bf16 3e-2; gradients that sum over a sequence get twice that).

    pytest tests/cuda -v                       # on a GPU machine
    FASTBERT_CUDA_ARCH=sm_90 pytest tests/cuda # a fixed arch instead of native
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import (
    CUDA_ERROR_INVALID_VALUE,
    DTYPES,
    F32,
    GELU,
    U8,
    Lib,
    Strides,
    Tensor,
    attention_keep,
    build_library,
    gpu_available,
    keep_scale,
    nvcc_path,
    ptr,
    rows_keep,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(nvcc_path() is None, reason="nvcc is not on PATH"),
    pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU visible"),
]

TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
ACT_PARAM = [("float32", "float32"), ("float16", "float16"), ("float16", "float32"), ("bfloat16", "bfloat16"),
             ("bfloat16", "float32")]
EPS = 1e-12


@pytest.fixture(scope="module")
def lib():
    library = Lib(build_library())
    if library.fbh_device_count() < 1:
        pytest.skip("the CUDA runtime sees no device")
    return library


def assert_close(name, got, ref, dtype, factor=1.0):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    if got.size == 0:
        return
    assert np.isfinite(got).all(), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite values (unwritten?)"
    err = float(np.abs(got - ref).max())
    bound = factor * TOL[dtype] * max(1.0, float(np.abs(ref).max()))
    assert err <= bound, f"{name}: max |err| = {err:.3g} > {bound:.3g} ({dtype})"


def assert_lse_close(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref)), "lse: -inf rows differ"
    finite = np.isfinite(ref)
    assert_close("lse", got[finite], ref[finite], "float32", factor=2.0)


# --------------------------------------------------------------------------------------------------------------
# add_layer_norm

LN_SHAPES = [(1, 8), (7, 33), (64, 768), (33, 384), (16, 1024), (6, 2048), (5, 4096), (3, 8192), (2, 12288),
             (2, 20000)]
LN_VARIANTS = {"residual-bias": (True, True, 0.0), "plain": (False, False, 0.0), "dropout": (True, True, 0.1),
               "dropout-nobias": (True, False, 0.25)}


def _add_layer_norm_case(lib, act, param, rows, hidden, variant, offset=0):
    from fastbert.ops.layer_norm.reference import layer_norm_bwd_ref, layer_norm_fwd_ref

    has_residual, has_bias, p = LN_VARIANTS[variant]
    dt, pt = DTYPES[act], DTYPES[param]
    rng = np.random.default_rng(rows * 7919 + hidden)
    x = dt.quantize(rng.standard_normal((rows, hidden)) * 2 + 0.5)
    res = dt.quantize(rng.standard_normal((rows, hidden))) if has_residual else None
    w = pt.quantize(1 + 0.5 * rng.standard_normal(hidden))
    b = pt.quantize(0.5 * rng.standard_normal(hidden)) if has_bias else None
    dout = dt.quantize(rng.standard_normal((rows, hidden)))
    seed = 1000 + rows
    mask = rows_keep(seed, rows, hidden, p) * keep_scale(p) if p > 0 else None

    X, DOUT = Tensor.from_values(lib, x, dt, offset), Tensor.from_values(lib, dout, dt, offset)
    R = None if res is None else Tensor.from_values(lib, res, dt, offset)
    W, B = Tensor.from_values(lib, w, pt), None if b is None else Tensor.from_values(lib, b, pt)
    OUT, MEAN, RSTD = Tensor(lib, (rows, hidden), dt, offset), Tensor(lib, (rows,), F32), Tensor(lib, (rows,), F32)
    lib.check(lib.fastbert_add_layer_norm_fwd(OUT.ptr, MEAN.ptr, RSTD.ptr, X.ptr, ptr(R), W.ptr, ptr(B), rows, hidden,
                                              EPS, p, seed, dt.code, pt.code, None), "add_layer_norm_fwd")
    out_ref, mean_ref, rstd_ref = layer_norm_fwd_ref(x, res, w, b, EPS, dropout_mask=mask)
    assert_close("out", OUT.get(), out_ref, act)
    assert_close("mean", MEAN.get(), mean_ref, "float32")
    assert_close("rstd", RSTD.get(), rstd_ref, "float32")

    ws_bytes = lib.fastbert_layer_norm_bwd_workspace_size(rows, hidden)
    WS = Tensor(lib, (max(ws_bytes // 4, 1),), F32)
    DX = Tensor(lib, (rows, hidden), dt, offset)
    DRES = None if res is None else Tensor(lib, (rows, hidden), dt, offset)
    DW, DB = Tensor(lib, (hidden,), pt), None if b is None else Tensor(lib, (hidden,), pt)
    lib.check(lib.fastbert_add_layer_norm_bwd(DX.ptr, ptr(DRES), DW.ptr, ptr(DB), DOUT.ptr, X.ptr, ptr(R), W.ptr,
                                              MEAN.ptr, RSTD.ptr, rows, hidden, p, seed, WS.ptr, ws_bytes, dt.code,
                                              pt.code, None), "add_layer_norm_bwd")
    dx_ref, dres_ref, dw_ref, db_ref = layer_norm_bwd_ref(dout, x, res, w, b, EPS, dropout_mask=mask)
    assert_close("dx", DX.get(), dx_ref, act)
    if res is not None:
        assert_close("dresidual", DRES.get(), dres_ref, act)
    assert_close("dweight", DW.get(), dw_ref, param, factor=2.0)
    if b is not None:
        assert_close("dbias", DB.get(), db_ref, param, factor=2.0)

    # deterministic: a second backward gives the same bits
    DW2 = Tensor(lib, (hidden,), pt)
    lib.check(lib.fastbert_add_layer_norm_bwd(DX.ptr, ptr(DRES), DW2.ptr, ptr(DB), DOUT.ptr, X.ptr, ptr(R), W.ptr,
                                              MEAN.ptr, RSTD.ptr, rows, hidden, p, seed, WS.ptr, ws_bytes, dt.code,
                                              pt.code, None))
    assert np.array_equal(DW.raw(), DW2.raw())


@pytest.mark.parametrize("variant", list(LN_VARIANTS))
@pytest.mark.parametrize("rows,hidden", LN_SHAPES)
@pytest.mark.parametrize("act,param", ACT_PARAM)
def test_add_layer_norm(lib, act, param, rows, hidden, variant):
    _add_layer_norm_case(lib, act, param, rows, hidden, variant)


@pytest.mark.parametrize("rows,hidden", [(9, 768), (4, 1024), (3, 4096)])
@pytest.mark.parametrize("act,param", [("float16", "float32"), ("float32", "float32")])
def test_add_layer_norm_misaligned(lib, act, param, rows, hidden):
    """Pointers off by one element take the scalar kernels; same results."""
    _add_layer_norm_case(lib, act, param, rows, hidden, "dropout", offset=1)


# --------------------------------------------------------------------------------------------------------------
# bias_gelu and bias_gelu_layer_norm

GELU_SHAPES = [(1, 1), (3, 7), (64, 768), (128, 3072), (5, 4099)]


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,hidden", GELU_SHAPES)
@pytest.mark.parametrize("act,param", ACT_PARAM)
def test_bias_gelu(lib, act, param, rows, hidden, approximate, has_bias):
    from fastbert.ops.bias_gelu.reference import bias_gelu_bwd_ref, bias_gelu_fwd_ref

    dt, pt = DTYPES[act], DTYPES[param]
    rng = np.random.default_rng(rows + hidden)
    x = dt.quantize(rng.standard_normal((rows, hidden)) * 2)
    b = pt.quantize(rng.standard_normal(hidden)) if has_bias else None
    dout = dt.quantize(rng.standard_normal((rows, hidden)))
    X, DOUT = Tensor.from_values(lib, x, dt), Tensor.from_values(lib, dout, dt)
    B = None if b is None else Tensor.from_values(lib, b, pt)
    OUT, DX = Tensor(lib, x.shape, dt), Tensor(lib, x.shape, dt)
    lib.check(lib.fastbert_bias_gelu_fwd(OUT.ptr, X.ptr, ptr(B), rows, hidden, GELU[approximate], dt.code, pt.code,
                                         None))
    lib.check(lib.fastbert_bias_gelu_bwd(DX.ptr, DOUT.ptr, X.ptr, ptr(B), rows, hidden, GELU[approximate], dt.code,
                                         pt.code, None))
    assert_close("out", OUT.get(), bias_gelu_fwd_ref(x, b, approximate), act)
    assert_close("dx", DX.get(), bias_gelu_bwd_ref(dout, x, b, approximate)[0], act)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 33), (64, 768), (16, 1024), (4, 4096), (2, 10000)])
@pytest.mark.parametrize("act,param", ACT_PARAM)
def test_bias_gelu_layer_norm(lib, act, param, rows, hidden, approximate):
    from fastbert.ops.bias_gelu.reference import bias_gelu_layer_norm_bwd_ref, bias_gelu_layer_norm_fwd_ref

    dt, pt = DTYPES[act], DTYPES[param]
    rng = np.random.default_rng(3 * rows + hidden)
    x = dt.quantize(rng.standard_normal((rows, hidden)) * 2)
    b, w, lb = (pt.quantize(s * rng.standard_normal(hidden) + c) for s, c in ((1.0, 0.0), (0.5, 1.0), (0.5, 0.0)))
    dout = dt.quantize(rng.standard_normal((rows, hidden)))
    X, DOUT = Tensor.from_values(lib, x, dt), Tensor.from_values(lib, dout, dt)
    B, W, LB = (Tensor.from_values(lib, a, pt) for a in (b, w, lb))
    OUT, MEAN, RSTD = Tensor(lib, x.shape, dt), Tensor(lib, (rows,), F32), Tensor(lib, (rows,), F32)
    lib.check(lib.fastbert_bias_gelu_layer_norm_fwd(OUT.ptr, MEAN.ptr, RSTD.ptr, X.ptr, B.ptr, W.ptr, LB.ptr, rows,
                                                    hidden, EPS, GELU[approximate], dt.code, pt.code, None))
    out_ref, mean_ref, rstd_ref = bias_gelu_layer_norm_fwd_ref(x, b, w, lb, EPS, approximate)
    assert_close("out", OUT.get(), out_ref, act)
    assert_close("mean", MEAN.get(), mean_ref, "float32")
    assert_close("rstd", RSTD.get(), rstd_ref, "float32")

    ws_bytes = lib.fastbert_layer_norm_bwd_workspace_size(rows, hidden)
    WS = Tensor(lib, (ws_bytes // 4,), F32)
    DX, DB, DW, DLB = Tensor(lib, x.shape, dt), *(Tensor(lib, (hidden,), pt) for _ in range(3))
    lib.check(lib.fastbert_bias_gelu_layer_norm_bwd(DX.ptr, DB.ptr, DW.ptr, DLB.ptr, DOUT.ptr, X.ptr, B.ptr, W.ptr,
                                                    MEAN.ptr, RSTD.ptr, rows, hidden, GELU[approximate], WS.ptr,
                                                    ws_bytes, dt.code, pt.code, None))
    dx_ref, db_ref, dw_ref, dlb_ref = bias_gelu_layer_norm_bwd_ref(dout, x, b, w, lb, EPS, approximate)
    assert_close("dx", DX.get(), dx_ref, act)
    assert_close("dbias", DB.get(), db_ref, param, factor=2.0)
    assert_close("dweight", DW.get(), dw_ref, param, factor=2.0)
    assert_close("dln_bias", DLB.get(), dlb_ref, param, factor=2.0)


# --------------------------------------------------------------------------------------------------------------
# softmax

SOFTMAX_SHAPES = [(2, 3, 5, 1), (2, 2, 7, 77), (3, 4, 16, 128), (2, 2, 3, 1000), (1, 1, 4, 4096), (2, 1, 2, 8192),
                  (1, 1, 2, 9000), (2, 1, 3, 8191)]


def padding_mask(rng, batch, seqlen, fully_masked_row=True):
    """(batch, seqlen) uint8: random lengths (padding at the end), batch row 0 all padding when batch > 1."""
    lengths = rng.integers(1, seqlen + 1, size=batch)
    if fully_masked_row and batch > 1:
        lengths[0] = 0
    return (np.arange(seqlen)[None, :] < lengths[:, None]).astype(np.uint8)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("act", list(DTYPES))
def test_softmax(lib, act, shape, masked):
    from fastbert.ops.softmax.reference import softmax_bwd_ref, softmax_fwd_ref

    dt = DTYPES[act]
    batch, nheads, tq, tk = shape
    rng = np.random.default_rng(sum(shape))
    scores = dt.quantize(rng.standard_normal(shape) * 4)
    mask = padding_mask(rng, batch, tk) if masked else None
    scale = 0.7
    S, P = Tensor.from_values(lib, scores, dt), Tensor(lib, shape, dt)
    # a mask with a wider row stride than seqlen_k (a slice of a longer mask)
    M = None
    if mask is not None:
        wide = np.zeros((batch, tk + 3), dtype=np.uint8)
        wide[:, :tk] = mask
        M = Tensor(lib, wide.shape, U8)
        lib.fbh_memcpy_htod(M.ptr, wide.ctypes.data, wide.nbytes)
    lib.check(lib.fastbert_softmax_fwd(P.ptr, S.ptr, ptr(M), tk + 3, batch, nheads, tq, tk, scale, dt.code, None))
    probs_ref = softmax_fwd_ref(scores, mask, scale)
    assert_close("probs", P.get(), probs_ref, act)
    if mask is not None and batch > 1:
        assert np.all(P.get()[0] == 0.0), "a row with no real key must be zeros"

    probs = dt.quantize(probs_ref)
    dprobs = dt.quantize(rng.standard_normal(shape))
    PR, DP, DS = Tensor.from_values(lib, probs, dt), Tensor.from_values(lib, dprobs, dt), Tensor(lib, shape, dt)
    lib.check(lib.fastbert_softmax_bwd(DS.ptr, DP.ptr, PR.ptr, batch * nheads * tq, tk, scale, dt.code, None))
    assert_close("dscores", DS.get(), softmax_bwd_ref(dprobs, probs, scale), act)


# --------------------------------------------------------------------------------------------------------------
# attention

# (batch, seqlen_q, seqlen_k, nheads, headdim)
ATTN_SHAPES = [(1, 1, 1, 1, 16), (2, 17, 17, 2, 32), (2, 64, 64, 3, 64), (2, 128, 128, 2, 64), (1, 200, 77, 2, 128),
               (2, 77, 200, 2, 80), (1, 33, 50, 1, 8), (2, 40, 40, 2, 40), (1, 256, 256, 2, 128)]


def _attention_case(lib, act, shape, masked, p, layout, offset=0):
    from fastbert.ops.attention.reference import attention_bwd_ref, attention_fwd_ref

    dt = DTYPES[act]
    batch, tq, tk, nheads, d = shape
    rng = np.random.default_rng(batch * 1000 + tq * 10 + tk + d)
    q = dt.quantize(rng.standard_normal((batch, tq, nheads, d)))
    k = dt.quantize(rng.standard_normal((batch, tk, nheads, d)))
    v = dt.quantize(rng.standard_normal((batch, tk, nheads, d)))
    dout = dt.quantize(rng.standard_normal((batch, tq, nheads, d)))
    mask = padding_mask(rng, batch, tk) if masked else None
    scale, seed = 1.0 / np.sqrt(d), 4242 + tq
    drop = attention_keep(seed, batch, nheads, tq, tk, p) * keep_scale(p) if p > 0 else None

    def upload(a):
        """a: (B, T, H, D) values; returns (tensor keeping the storage alive, pointer, strides)."""
        b_, t_, h_, d_ = a.shape
        if layout == "contiguous":
            t = Tensor.from_values(lib, a, dt, offset)
            return t, t.ptr, Strides(t_ * h_ * d_, h_ * d_, d_)
        # head-major storage (B, H, T, D) seen as (B, T, H, D): every stride differs from the contiguous one
        t = Tensor.from_values(lib, np.ascontiguousarray(a.transpose(0, 2, 1, 3)), dt, offset)
        return t, t.ptr, Strides(h_ * t_ * d_, d_, t_ * d_)

    (Q, qp, qs), (K, kp, ks), (V, vp, vs), (DO, dop, dos) = (upload(a) for a in (q, k, v, dout))
    M = None
    if mask is not None:
        M = Tensor(lib, mask.shape, U8)
        lib.fbh_memcpy_htod(M.ptr, mask.ctypes.data, mask.nbytes)
    OUT, LSE = Tensor(lib, (batch, tq, nheads, d), dt, offset), Tensor(lib, (batch, nheads, tq), F32)
    os_ = Strides(tq * nheads * d, nheads * d, d)
    lib.check(lib.fastbert_attention_fwd(OUT.ptr, LSE.ptr, qp, kp, vp, ptr(M), batch, tq, tk, nheads, d, qs, ks, vs,
                                         os_, tk, scale, p, seed, dt.code, None), "attention_fwd")
    out_ref, lse_ref = attention_fwd_ref(q, k, v, mask, scale, dropout_mask=drop)
    assert_close("out", OUT.get(), out_ref, act)
    assert_lse_close(LSE.get(), lse_ref)
    if mask is not None and batch > 1:
        assert np.all(OUT.get()[0] == 0.0), "a query with no real key must give zeros"

    ws = lib.fastbert_attention_bwd_workspace_size(batch, nheads, tq)
    WS = Tensor(lib, (ws // 4,), F32)
    grads = [Tensor(lib, a.shape, dt, offset) for a in (q, k, v)]
    gs = [Strides(a.shape[1] * nheads * d, nheads * d, d) for a in (q, k, v)]

    def backward():
        return lib.fastbert_attention_bwd(grads[0].ptr, grads[1].ptr, grads[2].ptr, dop, qp, kp, vp, OUT.ptr, LSE.ptr,
                                          ptr(M), batch, tq, tk, nheads, d, qs, ks, vs, os_, dos, *gs, tk, scale, p,
                                          seed, WS.ptr, ws, dt.code, None)

    lib.check(backward(), "attention_bwd")
    refs = attention_bwd_ref(dout, q, k, v, mask, scale, dropout_mask=drop)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs, strict=True):
        assert_close(name, got.get(), ref, act, factor=2.0)
    first = [g.raw().copy() for g in grads]
    lib.check(backward(), "attention_bwd (again)")
    for name, g, f in zip(("dq", "dk", "dv"), grads, first, strict=True):
        assert np.array_equal(g.raw(), f), f"{name} is not deterministic"


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("act", list(DTYPES))
def test_attention(lib, act, shape, masked):
    _attention_case(lib, act, shape, masked, 0.0, "contiguous")


@pytest.mark.parametrize("shape", [(2, 64, 64, 2, 64), (1, 77, 130, 3, 32), (2, 128, 128, 2, 128)])
@pytest.mark.parametrize("act", list(DTYPES))
def test_attention_dropout(lib, act, shape):
    _attention_case(lib, act, shape, True, 0.2, "contiguous")


@pytest.mark.parametrize("shape", [(2, 50, 70, 3, 64), (1, 64, 64, 2, 16)])
@pytest.mark.parametrize("act", list(DTYPES))
def test_attention_strided(lib, act, shape):
    _attention_case(lib, act, shape, True, 0.1, "head-major")


@pytest.mark.parametrize("shape", [(2, 50, 70, 3, 64), (1, 33, 33, 1, 40)])
@pytest.mark.parametrize("act", list(DTYPES))
def test_attention_misaligned(lib, act, shape):
    """Pointers off by one element: element loads instead of cp.async / float4."""
    _attention_case(lib, act, shape, True, 0.0, "contiguous", offset=1)


# --------------------------------------------------------------------------------------------------------------
# argument checks: cudaErrorInvalidValue, nothing launched (the outputs keep their NaN fill)


def test_invalid_arguments_launch_nothing(lib):
    dt = DTYPES["float16"]
    X, W = Tensor.from_values(lib, np.ones((4, 64)), dt), Tensor.from_values(lib, np.ones(64), dt)
    OUT, MEAN, RSTD = Tensor(lib, (4, 64), dt), Tensor(lib, (4,), F32), Tensor(lib, (4,), F32)

    def ln(rows=4, hidden=64, p=0.0, act=1, param=1, out=OUT.ptr):
        return lib.fastbert_add_layer_norm_fwd(out, MEAN.ptr, RSTD.ptr, X.ptr, None, W.ptr, None, rows, hidden, EPS,
                                               p, 0, act, param, None)

    for bad in (dict(hidden=0), dict(rows=-1), dict(p=1.0), dict(p=-0.5), dict(act=7), dict(param=2), dict(out=None)):
        assert ln(**bad) == CUDA_ERROR_INVALID_VALUE, bad
    assert ln(rows=0, out=None) == 0  # empty: success, no launch
    lib.check(0)
    assert np.isnan(OUT.get()).all()

    assert lib.fastbert_add_layer_norm_bwd(OUT.ptr, None, W.ptr, None, X.ptr, X.ptr, None, W.ptr, MEAN.ptr, RSTD.ptr,
                                           4, 64, 0.0, 0, None, 0, 1, 1, None) == CUDA_ERROR_INVALID_VALUE

    for d, ok in ((8, 1), (12, 0), (16, 1), (40, 1), (128, 1), (136, 0), (0, 0)):
        assert lib.fastbert_attention_supported(d, 1) == ok, d
    s = Strides(64, 64, 64)
    Q, L = Tensor.from_values(lib, np.ones((1, 1, 1, 64)), dt), Tensor(lib, (1, 1, 1), F32)
    for d, p, stride in ((12, 0.0, 1), (64, 1.0, 1), (64, 0.0, 0)):
        M = Tensor(lib, (1, 1), U8)
        err = lib.fastbert_attention_fwd(OUT.ptr, L.ptr, Q.ptr, Q.ptr, Q.ptr, M.ptr, 1, 1, 1, 1, d, s, s, s, s, stride,
                                         1.0, p, 0, 1, None)
        assert err == CUDA_ERROR_INVALID_VALUE, (d, p, stride)
    assert lib.fastbert_softmax_fwd(OUT.ptr, X.ptr, X.ptr, 3, 1, 1, 4, 64, 1.0, 1, None) == CUDA_ERROR_INVALID_VALUE
    lib.check(0)
    assert np.isnan(OUT.get()).all() and np.isnan(L.get()).all()
