"""The varlen (packed) attention launchers of csrc/cuda against the float64 NumPy reference, through the ctypes harness.

Skipped without nvcc or a visible CUDA GPU (see test_cuda_kernels.py for the harness and the tolerance rule).
Sequences of awkward lengths (0, 1, partial tiles, several tiles) are packed back to back; outputs start as NaN, so
a row the kernels never write fails the finiteness check, and the reference attends within each sequence only, so a
block that reads another sequence's keys fails the comparison. Dropout masks come from the NumPy model of the
attention mapping with b = the sequence index, which is also what padded attention draws at batch row b.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import (
    CUDA_ERROR_INVALID_VALUE,
    DTYPES,
    F32,
    I32,
    U8,
    Lib,
    Strides,
    Tensor,
    attention_keep,
    build_library,
    gpu_available,
    keep_scale,
    nvcc_path,
)

from fastbert.ops.varlen_attention.reference import varlen_attention_bwd_ref, varlen_attention_fwd_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(nvcc_path() is None, reason="nvcc is not on PATH"),
    pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU visible"),
]

# Sequence lengths of one packed batch: empty sequences, a single token, tile edges (64) and multi-tile sequences.
LENGTHS = {
    "mixed": [5, 0, 64, 1, 77, 130, 0],
    "one": [33],
    "tiles": [64, 128, 63, 65],
    "short": [1, 2, 3, 0, 8, 17],
}


TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}  # as in test_cuda_kernels.py


def assert_close(name, got, ref, dtype, factor=1.0):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite values (unwritten?)"
    err = float(np.abs(got - ref).max(initial=0.0))
    bound = factor * TOL[dtype] * max(1.0, float(np.abs(ref).max(initial=0.0)))
    assert err <= bound, f"{name}: max |err| = {err:.3g} > {bound:.3g} ({dtype})"


def assert_lse_close(got, ref):
    assert np.isfinite(ref).all(), "every packed token has at least itself to attend to"
    assert_close("lse", got, ref, "float32", factor=2.0)


@pytest.fixture(scope="module")
def lib():
    library = Lib(build_library())
    if library.fbh_device_count() < 1:
        pytest.skip("the CUDA runtime sees no device")
    return library


def _masks(seed, lengths, nheads, p):
    """Per-sequence (nheads, L, L) dropout scale masks (0 or 1/(1-p)), or None without dropout."""
    if p == 0.0:
        return None
    longest = max(lengths)
    keep = attention_keep(seed, len(lengths), nheads, longest, longest, p)
    return [keep[i, :, :n, :n] * keep_scale(p) for i, n in enumerate(lengths)]


def _varlen_case(lib, act, lengths, nheads, d, p, layout="packed", slack=0):
    dt = DTYPES[act]
    total = int(sum(lengths))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    batch, max_seqlen = len(lengths), max(lengths) + slack  # max_seqlen may be any upper bound
    rng = np.random.default_rng(total * 31 + d + nheads)
    q, k, v, dout = (dt.quantize(rng.standard_normal((total, nheads, d))) for _ in range(4))
    scale, seed = 1.0 / np.sqrt(d), 977 + total
    masks = _masks(seed, lengths, nheads, p)

    if layout == "packed":
        tensors = [Tensor.from_values(lib, a, dt) for a in (q, k, v)]
        ptrs = [t.ptr for t in tensors]
        in_strides = [Strides(0, nheads * d, d)] * 3
    else:  # "fused": q, k, v interleaved per token as a QKV projection writes them, (total, 3, H, D)
        fused = Tensor.from_values(lib, np.stack([q, k, v], axis=1), dt)
        tensors = [fused]
        ptrs = [fused.ptr + i * nheads * d * dt.itemsize for i in range(3)]
        in_strides = [Strides(0, 3 * nheads * d, d)] * 3
    CU = Tensor.from_values(lib, cu, I32)
    DO = Tensor.from_values(lib, dout, dt)
    dense = Strides(0, nheads * d, d)
    OUT, LSE = Tensor(lib, (total, nheads, d), dt), Tensor(lib, (nheads, total), F32)
    lib.check(lib.fastbert_varlen_attention_fwd(OUT.ptr, LSE.ptr, *ptrs, CU.ptr, batch, max_seqlen, total, nheads, d,
                                                *in_strides, dense, scale, p, seed, dt.code, None),
              "varlen_attention_fwd")
    out_ref, lse_ref = varlen_attention_fwd_ref(q, k, v, cu, scale, dropout_masks=masks)
    assert_close("out", OUT.get(), out_ref, act)
    assert_lse_close(LSE.get(), lse_ref)

    ws = lib.fastbert_attention_bwd_workspace_size(1, nheads, total)
    WS = Tensor(lib, (max(ws // 4, 1),), F32)
    grads = [Tensor(lib, (total, nheads, d), dt) for _ in range(3)]

    def backward():
        return lib.fastbert_varlen_attention_bwd(*(g.ptr for g in grads), DO.ptr, *ptrs, OUT.ptr, LSE.ptr, CU.ptr,
                                                 batch, max_seqlen, total, nheads, d, *in_strides, dense, dense,
                                                 dense, dense, dense, scale, p, seed, WS.ptr, ws, dt.code, None)

    lib.check(backward(), "varlen_attention_bwd")
    refs = varlen_attention_bwd_ref(dout, q, k, v, cu, scale, dropout_masks=masks)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs, strict=True):
        assert_close(name, got.get(), ref, act, factor=2.0)
    first = [g.raw().copy() for g in grads]
    lib.check(backward(), "varlen_attention_bwd (again)")
    for name, g, f in zip(("dq", "dk", "dv"), grads, first, strict=True):
        assert np.array_equal(g.raw(), f), f"{name} is not deterministic"
    return OUT.get(), LSE.get()


@pytest.mark.parametrize("d", [16, 40, 64, 128])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
@pytest.mark.parametrize("act", list(DTYPES))
def test_varlen_attention(lib, act, lengths, d):
    _varlen_case(lib, act, LENGTHS[lengths], 2, d, 0.0)


@pytest.mark.parametrize("act", list(DTYPES))
def test_varlen_attention_dropout(lib, act):
    _varlen_case(lib, act, LENGTHS["mixed"], 3, 64, 0.2)


@pytest.mark.parametrize("act", list(DTYPES))
def test_varlen_attention_fused_qkv_and_loose_max_seqlen(lib, act):
    """q, k, v as strided views of one (total, 3, H, D) buffer; max_seqlen larger than the longest sequence."""
    out, lse = _varlen_case(lib, act, LENGTHS["mixed"], 2, 64, 0.1, layout="fused", slack=70)
    again, lse_again = _varlen_case(lib, act, LENGTHS["mixed"], 2, 64, 0.1, layout="packed")
    assert np.array_equal(out, again) and np.array_equal(lse, lse_again), "layout or max_seqlen changed the result"


@pytest.mark.parametrize("act", ["float16", "float32"])
def test_varlen_matches_padded_attention(lib, act):
    """Packed sequences give bit for bit what padded attention gives on the same sequences (dropout included)."""
    dt, lengths, nheads, d, p = DTYPES[act], [7, 64, 30], 2, 32, 0.15
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(5)
    q, k, v = (dt.quantize(rng.standard_normal((total, nheads, d))) for _ in range(3))
    scale, seed = 0.3, 31337
    out_v, _ = _run_varlen_fwd(lib, dt, q, k, v, cu, longest, scale, p, seed)

    padded = [np.zeros((batch, longest, nheads, d)) for _ in range(3)]
    mask = np.zeros((batch, longest), dtype=np.uint8)
    for i, n in enumerate(lengths):
        for full, src in zip(padded, (q, k, v), strict=True):
            full[i, :n] = src[cu[i]:cu[i + 1]]
        mask[i, :n] = 1
    Q, K, V = (Tensor.from_values(lib, a, dt) for a in padded)
    M = Tensor(lib, mask.shape, U8)
    lib.fbh_memcpy_htod(M.ptr, mask.ctypes.data, mask.nbytes)
    OUT, LSE = Tensor(lib, (batch, longest, nheads, d), dt), Tensor(lib, (batch, nheads, longest), F32)
    s = Strides(longest * nheads * d, nheads * d, d)
    lib.check(lib.fastbert_attention_fwd(OUT.ptr, LSE.ptr, Q.ptr, K.ptr, V.ptr, M.ptr, batch, longest, longest, nheads,
                                         d, s, s, s, s, longest, scale, p, seed, dt.code, None))
    out_p = OUT.raw()
    for i, n in enumerate(lengths):
        assert np.array_equal(out_v[cu[i]:cu[i + 1]], out_p[i, :n]), f"sequence {i} differs from padded attention"


def _run_varlen_fwd(lib, dt, q, k, v, cu, max_seqlen, scale, p, seed):
    total, nheads, d = q.shape
    Q, K, V = (Tensor.from_values(lib, a, dt) for a in (q, k, v))
    CU = Tensor.from_values(lib, cu, I32)
    OUT, LSE = Tensor(lib, (total, nheads, d), dt), Tensor(lib, (nheads, total), F32)
    s = Strides(0, nheads * d, d)
    lib.check(lib.fastbert_varlen_attention_fwd(OUT.ptr, LSE.ptr, Q.ptr, K.ptr, V.ptr, CU.ptr, len(cu) - 1, max_seqlen,
                                                total, nheads, d, s, s, s, s, scale, p, seed, dt.code, None))
    return OUT.raw(), LSE.raw()


def test_varlen_invalid_arguments_launch_nothing(lib):
    dt = DTYPES["bfloat16"]
    X = Tensor.from_values(lib, np.ones((4, 1, 64)), dt)
    CU = Tensor.from_values(lib, np.array([0, 4]), I32)
    OUT, LSE = Tensor(lib, (4, 1, 64), dt), Tensor(lib, (1, 4), F32)
    s = Strides(0, 64, 64)

    def fwd(batch=1, max_seqlen=4, total=4, d=64, p=0.0, cu=CU.ptr):
        return lib.fastbert_varlen_attention_fwd(OUT.ptr, LSE.ptr, X.ptr, X.ptr, X.ptr, cu, batch, max_seqlen, total,
                                                 1, d, s, s, s, s, 0.125, p, 0, dt.code, None)

    for bad in (dict(batch=0), dict(max_seqlen=0), dict(d=12), dict(p=1.0), dict(cu=None), dict(total=-1),
                dict(total=1 << 31)):
        assert fwd(**bad) == CUDA_ERROR_INVALID_VALUE, bad
    assert fwd(batch=0, total=0, max_seqlen=0, cu=None) == 0  # nothing to do: success, no launch
    lib.check(0)
    assert np.isnan(OUT.get()).all() and np.isnan(LSE.get()).all()
    grads = [Tensor(lib, (4, 1, 64), dt) for _ in range(3)]
    err = lib.fastbert_varlen_attention_bwd(*(g.ptr for g in grads), X.ptr, X.ptr, X.ptr, X.ptr, X.ptr, LSE.ptr,
                                            CU.ptr, 1, 4, 4, 1, 64, *([s] * 8), 0.125, 0.0, 0, None, 0, dt.code, None)
    assert err == CUDA_ERROR_INVALID_VALUE, "a missing workspace must be refused"
