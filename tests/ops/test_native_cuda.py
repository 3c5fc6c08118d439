"""The cuda backend itself: the ``torch.ops.fastbert_ext`` CUDA kernels at odd sizes and mixed dtypes, opcheck of
every compiled op on CUDA tensors, attention and varlen attention (head dims, masks, strided views, the fallback to
torch, dropout), determinism, and argument errors.

Needs a GPU (marked cuda; skipped where the cuda backend is unavailable: no GPU, a CPU-only torch, no nvcc, a failed
build). The op suites (test_<op>.py, test_varlen_attention.py) also run every public op on the cuda backend through
the cuda_backend fixture; these tests call the compiled ops directly, against the float64 reference with the
accuracy rule of _ops_helpers.py, the torch backend's implementation of the same op being the same-dtype baseline.
"""

import pytest
import torch
from _ops_helpers import (
    BF16,
    DTYPES,
    FP16,
    FP32,
    assert_matches_ref,
    assert_same,
    dtype_id,
    padding_mask,
    rand,
    to_np,
    with_dresidual,
)

import fastbert.ops as ops
from fastbert import _ext
from fastbert.ops import _backend
from fastbert.ops.varlen_attention.reference import varlen_attention_bwd_ref, varlen_attention_fwd_ref
from fastbert.reference import (
    attention_bwd_ref,
    attention_fwd_ref,
    bias_gelu_bwd_ref,
    bias_gelu_fwd_ref,
    bias_gelu_layer_norm_bwd_ref,
    bias_gelu_layer_norm_fwd_ref,
    layer_norm_bwd_ref,
    layer_norm_fwd_ref,
    softmax_bwd_ref,
    softmax_fwd_ref,
)

_STATUS = ops.backends("cuda")["cuda"]
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _STATUS.available, reason=f"cuda backend: {_STATUS.reason}")]
E = torch.ops.fastbert_ext
DEV = "cuda"
WIDTHS = [1, 3, 33, 767, 768, 1024, 4099, 8192, 9000]  # vector widths, the register / block-per-row limits, scalar


def _torch(op):
    return _backend._IMPLS[op]["torch"]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


CUDA_OPS = {f"{op}_{d}" for op in ("add_layer_norm", "bias_gelu", "bias_gelu_layer_norm", "softmax", "attention",
                                     "varlen_attention") for d in ("fwd", "bwd")}


def test_the_library_is_loaded_and_every_op_has_a_kernel():
    assert _ext.is_loaded("cuda") and "compiled CUDA kernels" in _STATUS.reason
    assert set(_STATUS.ops) == CUDA_OPS


# ----------------------------------------------------------------------------------------------------------------
# row kernels against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", WIDTHS[1:])  # not 1: rstd = 1/sqrt(eps) amplifies any rounding
def test_add_layer_norm(n, dtype):
    x, res, dout = rand((37, n), dtype, DEV, offset=0.5), rand((37, n), dtype, DEV), rand((37, n), dtype, DEV)
    w, b = rand((n,), dtype, DEV, scale=0.5, offset=1.0), rand((n,), dtype, DEV)
    out, mean, rstd = E.add_layer_norm_fwd(x, res, w, b, 1e-5, 0.0, None)
    base = _torch("add_layer_norm_fwd")(x, res, w, b, 1e-5, 0.0, None)
    ref = layer_norm_fwd_ref(to_np(x), to_np(res), to_np(w), to_np(b), 1e-5)
    for name, got, baseline, expected in zip(["out", "mean", "rstd"], (out, mean, rstd), base, ref, strict=True):
        assert_matches_ref(name, got, expected, baseline, dtype)
    grads = with_dresidual(E.add_layer_norm_bwd(dout, x, res, w, b, mean, rstd, 0.0, None))
    base = with_dresidual(_torch("add_layer_norm_bwd")(dout, x, res, w, b, mean, rstd, 0.0, None))
    ref = layer_norm_bwd_ref(to_np(dout), to_np(x), to_np(res), to_np(w), to_np(b), 1e-5)
    for name, got, baseline, expected in zip(["dx", "dres", "dw", "db"], grads, base, ref, strict=True):
        assert got.dtype == baseline.dtype and got.is_contiguous()
        assert_matches_ref(name, got, expected, baseline, dtype)
    again = with_dresidual(E.add_layer_norm_bwd(dout, x, res, w, b, mean, rstd, 0.0, None))
    assert all(torch.equal(a, g) for a, g in zip(again, grads, strict=True)), "the backward is not deterministic"


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "b_dtype"), [(BF16, FP32, FP16), (FP16, BF16, FP32), (FP32, BF16, BF16)]
)
def test_mixed_parameter_dtypes(x_dtype, w_dtype, b_dtype):
    x, res, dout = (rand((6, 40), x_dtype, DEV) for _ in range(3))
    w, b = rand((40,), w_dtype, DEV, offset=1.0), rand((40,), b_dtype, DEV)
    out, mean, rstd = E.add_layer_norm_fwd(x, res, w, b, 1e-12, 0.0, None)
    assert out.dtype == x_dtype and mean.dtype == rstd.dtype == FP32
    dx, dres, dw, db = with_dresidual(E.add_layer_norm_bwd(dout, x, res, w, b, mean, rstd, 0.0, None))
    assert (dx.dtype, dres.dtype, dw.dtype, db.dtype) == (x_dtype, x_dtype, w_dtype, b_dtype)
    ref = layer_norm_bwd_ref(to_np(dout), to_np(x), to_np(res), to_np(w), to_np(b), 1e-12)
    base = with_dresidual(_torch("add_layer_norm_bwd")(dout, x, res, w, b, mean, rstd, 0.0, None))
    for name, got, baseline, expected in zip(["dx", "dres", "dw", "db"], (dx, dres, dw, db), base, ref, strict=True):
        assert_matches_ref(name, got, expected, baseline, got.dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [3, 65, 768, 4099])
def test_bias_gelu_and_layer_norm(n, dtype, approximate):
    x, dout = rand((37, n), dtype, DEV, scale=2.0), rand((37, n), dtype, DEV)
    b, w, lb = rand((n,), dtype, DEV), rand((n,), dtype, DEV, offset=1.0), rand((n,), dtype, DEV)
    y = E.bias_gelu_fwd(x, b, approximate)
    ref_y = bias_gelu_fwd_ref(to_np(x), to_np(b), approximate)
    assert_matches_ref("gelu", y, ref_y, _torch("bias_gelu_fwd")(x, b, approximate), dtype)
    dx, db = E.bias_gelu_bwd(dout, x, b, approximate, True)
    ref_dx, ref_db = bias_gelu_bwd_ref(to_np(dout), to_np(x), to_np(b), approximate)
    base_dx, base_db = _torch("bias_gelu_bwd")(dout, x, b, approximate, True)
    assert_matches_ref("dgelu", dx, ref_dx, base_dx, dtype)
    assert_matches_ref("dbias", db, ref_db, base_db, dtype)
    out, mean, rstd = E.bias_gelu_layer_norm_fwd(x, b, w, lb, 1e-12, approximate)
    ref_out, _, _ = bias_gelu_layer_norm_fwd_ref(to_np(x), to_np(b), to_np(w), to_np(lb), 1e-12, approximate)
    base_out, base_mean, base_rstd = _torch("bias_gelu_layer_norm_fwd")(x, b, w, lb, 1e-12, approximate)
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    grads = E.bias_gelu_layer_norm_bwd(dout, x, b, w, lb, mean, rstd, approximate, True)
    base = _torch("bias_gelu_layer_norm_bwd")(dout, x, b, w, lb, base_mean, base_rstd, approximate, True)
    ref = bias_gelu_layer_norm_bwd_ref(to_np(dout), to_np(x), to_np(b), to_np(w), to_np(lb), 1e-12, approximate)
    for name, got, baseline, expected in zip(["dx", "dbias", "dw", "dlb"], grads, base, ref, strict=True):
        assert_matches_ref(name, got, expected, baseline, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tk", [1, 7, 17, 129, 8191, 9000])
def test_softmax(tk, dtype):
    scores, dprobs = rand((3, 2, 5, tk), dtype, DEV, scale=5.0), rand((3, 2, 5, tk), dtype, DEV)
    mask = padding_mask("empty", 3, tk, DEV)
    probs = E.softmax_fwd(scores, mask, 0.3)
    ref = softmax_fwd_ref(to_np(scores), mask.cpu().numpy(), 0.3)
    assert_matches_ref("probs", probs, ref, _torch("softmax_fwd")(scores, mask, 0.3), dtype)
    assert torch.count_nonzero(probs[-1]) == 0, "a sequence without real keys must give all-zero rows"
    dscores = E.softmax_bwd(dprobs, probs, 0.3)
    ref_d = softmax_bwd_ref(to_np(dprobs), ref, 0.3)
    assert_matches_ref("dscores", dscores, ref_d, _torch("softmax_bwd")(dprobs, probs, 0.3), dtype)


def test_empty_inputs():
    x, w = torch.empty((0, 33), device=DEV), rand((33,), FP32, DEV)
    out, mean, rstd = E.add_layer_norm_fwd(x, None, w, None, 1e-12, 0.0, None)
    assert out.shape == (0, 33) and mean.shape == rstd.shape == (0,)
    dx, dres, dw, db = E.add_layer_norm_bwd(x, x, None, w, None, mean, rstd, 0.0, None)
    assert dx.shape == (0, 33) and dres.numel() == db.numel() == 0 and torch.equal(dw, torch.zeros(33, device=DEV))
    assert E.softmax_fwd(torch.empty((0, 2, 3, 4), device=DEV), None, 1.0).shape == (0, 2, 3, 4)
    q = torch.empty((2, 0, 2, 16), device=DEV, dtype=FP16)
    o, lse = E.attention_fwd(q, q, q, None, 0.0, 0.25, None)
    assert o.shape == q.shape and lse.shape == (2, 2, 0)


# ----------------------------------------------------------------------------------------------------------------
# attention


def _attention_check(shape, mask_kind, dtype, p=0.0, strided=False):
    b, tq, tk, h, d = shape
    q, dout = rand((b, tq, h, d), dtype, DEV), rand((b, tq, h, d), dtype, DEV)
    if strided:  # views of a packed projection (B, T, 2, H, D) and a heads-first (B, H, T, D) tensor
        kv = rand((b, tk, 2, h, d), dtype, DEV)
        k, v = kv[:, :, 0], rand((b, h, tk, d), dtype, DEV).transpose(1, 2)
    else:
        k, v = rand((b, tk, h, d), dtype, DEV), rand((b, tk, h, d), dtype, DEV)
    mask, scale, seed = padding_mask(mask_kind, b, tk, DEV), d**-0.5, torch.tensor([77])
    out, lse = E.attention_fwd(q, k, v, mask, p, scale, seed)
    dq, dk, dv = E.attention_bwd(dout, q, k, v, out, lse, mask, p, scale, seed)
    assert all(g.is_contiguous() and g.dtype == dtype for g in (out, dq, dk, dv))
    drop = None
    if p > 0:  # the kernels' own mask, recovered from a forward with v = identity over the keys (d >= tk)
        eye = torch.eye(tk, d, device=DEV, dtype=dtype)[None, :, None, :].expand(b, tk, h, d).contiguous()
        probs = E.attention_fwd(q, k, eye, mask, p, scale, seed)[0][..., :tk].permute(0, 2, 1, 3)
        drop = ((probs != 0).double() / (1 - p)).cpu().numpy()
    mask_np = None if mask is None else mask.cpu().numpy()
    ref_out, ref_lse = attention_fwd_ref(to_np(q), to_np(k), to_np(v), mask_np, scale, drop)
    ref_grads = attention_bwd_ref(to_np(dout), to_np(q), to_np(k), to_np(v), mask_np, scale, drop)
    base_drop = None if drop is None else torch.from_numpy(drop).to(DEV)
    base = _baseline_grads(q, k, v, dout, mask, scale, base_drop)
    assert_matches_ref("out", out, ref_out, base[0], dtype)
    for name, got, ref, bl in zip(["dq", "dk", "dv"], (dq, dk, dv), ref_grads, base[1:], strict=True):
        assert_matches_ref(name, got, ref, bl, dtype)
    again = E.attention_bwd(dout, q, k, v, out, lse, mask, p, scale, seed)
    assert all(torch.equal(a, g) for a, g in zip(again, (dq, dk, dv), strict=True)), "not deterministic"
    return out, lse, ref_lse


def _baseline_grads(q, k, v, dout, mask, scale, drop):
    from _ops_helpers import attention_baseline, fwd_bwd

    out, grads = fwd_bwd(lambda q, k, v: attention_baseline(q, k, v, mask, scale, drop), dict(q=q, k=k, v=v), "qkv",
                         dout)
    return out, grads["q"], grads["k"], grads["v"]


# (batch, seqlen_q, seqlen_k, nheads, headdim): head dims 8-128 (40, 80 zero-padded), partial and odd tiles
SHAPES = [(1, 1, 1, 1, 16), (2, 17, 17, 2, 32), (2, 77, 130, 3, 64), (1, 200, 77, 2, 128), (2, 40, 40, 2, 40),
          (2, 33, 50, 1, 8), (1, 65, 65, 2, 80)]


@pytest.mark.parametrize("mask_kind", ["none", "partial", "empty"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_attention(shape, mask_kind, dtype):
    _attention_check(shape, mask_kind, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_attention_dropout_and_strided_views(dtype):
    _attention_check((2, 50, 70, 3, 128), "partial", dtype, p=0.2, strided=True)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_attention_strided_equals_contiguous(dtype):
    qkv = rand((2, 45, 3, 4, 64), dtype, DEV)
    q, k, v = qkv.unbind(2)
    mask = padding_mask("partial", 2, 45, DEV)
    strided = E.attention_fwd(q, k, v, mask, 0.1, 0.125, torch.tensor([3]))
    dense = E.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), mask, 0.1, 0.125, torch.tensor([3]))
    for name, a, b in zip(["out", "lse"], strided, dense, strict=True):
        assert_same(name, a, b)


@pytest.mark.parametrize("headdim", [12, 136])
def test_unsupported_head_dims_run_the_torch_implementation(headdim):
    q, k, v = (rand((2, 9, 2, headdim), BF16, DEV).requires_grad_(True) for _ in range(3))
    ops.set_backend("cuda")
    assert ops.resolved_backend("attention_fwd", "cuda") == "cuda"
    out = ops.attention(q, k, v, padding_mask("partial", 2, 9, DEV))
    out.float().sum().backward()
    ops.set_backend("torch")
    expected = ops.attention(q.detach(), k.detach(), v.detach(), padding_mask("partial", 2, 9, DEV))
    torch.testing.assert_close(out.detach(), expected)
    with pytest.raises(RuntimeError, match="headdim must be a multiple of 8"):
        E.attention_fwd(q.detach(), k.detach(), v.detach(), None, 0.0, 1.0, None)


# ----------------------------------------------------------------------------------------------------------------
# varlen attention: the packed kernels equal the padded ones on the same sequences, bit for bit (dropout included)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_varlen_equals_padded_kernels(dtype, p):
    lengths, h, d = [5, 0, 64, 1, 77, 130], 3, 64
    cu, total, longest = _cu(lengths), sum(lengths), max(lengths)
    q, k, v, dout = (rand((total, h, d), dtype, DEV) for _ in range(4))
    seed, scale = torch.tensor([2024]), 0.2
    out, lse = E.varlen_attention_fwd(q, k, v, cu, longest, p, scale, seed)
    grads = E.varlen_attention_bwd(dout, q, k, v, out, lse, cu, longest, p, scale, seed)

    def pad(t):
        padded = t.new_zeros((len(lengths), longest, *t.shape[1:]))
        for i, (s, n) in enumerate(zip(cu.tolist()[:-1], lengths, strict=True)):
            padded[i, :n] = t[s : s + n]
        return padded

    mask = torch.arange(longest, device=DEV)[None, :] < torch.tensor(lengths, device=DEV)[:, None]
    pq, pk, pv, pdout = (pad(t) for t in (q, k, v, dout))
    pout, plse = E.attention_fwd(pq, pk, pv, mask, p, scale, seed)
    pgrads = E.attention_bwd(pdout, pq, pk, pv, pout, plse, mask, p, scale, seed)
    for i, (s, n) in enumerate(zip(cu.tolist()[:-1], lengths, strict=True)):
        assert torch.equal(out[s : s + n], pout[i, :n]), f"out of sequence {i}"
        assert torch.equal(lse[:, s : s + n], plse[i, :, :n]), f"lse of sequence {i}"
        for name, g, pg in zip("qkv", grads, pgrads, strict=True):
            assert torch.equal(g[s : s + n], pg[i, :n]), f"d{name} of sequence {i}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_varlen_matches_reference_through_the_public_op(dtype):
    lengths, h, d = [3, 0, 66, 1, 20], 2, 40
    cu, total, scale = _cu(lengths), sum(lengths), 40**-0.5
    q, k, v, dout = (rand((total, h, d), dtype, DEV) for _ in range(4))
    ops.set_backend("cuda")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = ops.varlen_attention(*leaves, cu, max(lengths))
    out.backward(dout)
    cu_np = cu.cpu().numpy()
    ref_out, _ = varlen_attention_fwd_ref(to_np(q), to_np(k), to_np(v), cu_np)
    ref_grads = varlen_attention_bwd_ref(to_np(dout), to_np(q), to_np(k), to_np(v), cu_np)
    base_out, base_lse = _torch("varlen_attention_fwd")(q, k, v, cu, max(lengths), 0.0, scale, None)
    base_grads = _torch("varlen_attention_bwd")(dout, q, k, v, base_out, base_lse, cu, max(lengths), 0.0, scale, None)
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name, leaf, ref, bl in zip("qkv", leaves, ref_grads, base_grads, strict=True):
        assert_matches_ref(f"d{name}", leaf.grad, ref, bl, dtype)


# ----------------------------------------------------------------------------------------------------------------
# opcheck of every compiled op on CUDA tensors (schema, fake, dispatch)


def _opcheck_cases():
    x, res, b = rand((4, 33), FP32, DEV), rand((4, 33), FP32, DEV), rand((33,), FP32, DEV)
    w, xb, seed = rand((33,), FP32, DEV, offset=1.0), rand((3, 2, 24), BF16, DEV), torch.tensor([123])
    out, mean, rstd = E.add_layer_norm_fwd(x, res, w, b, 1e-12, 0.0, None)
    yield "add_layer_norm_fwd", (x, res, w, b, 1e-12, 0.0, None)
    yield "add_layer_norm_fwd", (xb, None, rand((24,), FP32, DEV), None, 1e-5, 0.2, seed)
    yield "add_layer_norm_bwd", (x, x, res, w, b, mean, rstd, 0.3, seed)
    yield "bias_gelu_fwd", (xb, None, "tanh")
    yield "bias_gelu_bwd", (x, x, b, "none", True)
    _, gmean, grstd = E.bias_gelu_layer_norm_fwd(x, b, w, None, 1e-12, "none")
    yield "bias_gelu_layer_norm_fwd", (x, b, w, b, 1e-12, "tanh")
    yield "bias_gelu_layer_norm_bwd", (x, x, b, w, None, gmean, grstd, "none", True)
    scores = rand((2, 3, 4, 7), FP16, DEV)
    yield "softmax_fwd", (scores, padding_mask("empty", 2, 7, DEV), 0.125)
    yield "softmax_bwd", (scores, torch.softmax(scores.float(), -1).half(), 0.5)
    q, kpm = rand((2, 9, 2, 16), BF16, DEV), padding_mask("empty", 2, 9, DEV)
    o, lse = E.attention_fwd(q, q, q, kpm, 0.1, 0.25, seed)
    yield "attention_fwd", (q, q, q, kpm, 0.1, 0.25, seed)
    yield "attention_bwd", (q, q, q, q, o, lse, kpm, 0.1, 0.25, seed)
    cu, pq = _cu([3, 0, 6]), rand((9, 2, 32), FP32, DEV)
    o, lse = E.varlen_attention_fwd(pq, pq, pq, cu, 6, 0.0, 0.2, None)
    yield "varlen_attention_fwd", (pq, pq, pq, cu, 6, 0.2, 0.2, seed)
    yield "varlen_attention_bwd", (pq, pq, pq, pq, o, lse, cu, 6, 0.0, 0.2, None)


@pytest.mark.parametrize(("name", "args"), list(_opcheck_cases()) if _STATUS.available else [],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_fastbert_ext_opcheck(name, args):
    torch.library.opcheck(getattr(E, name).default, args)


def test_every_cuda_op_is_opchecked():
    names = {name for name, _ in _opcheck_cases()}
    assert names == {op for op in _backend.op_names() if _backend._has_impl(op, "cuda")}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: E.bias_gelu_fwd(torch.ones(2, 3, device=DEV), None, "erf"), "approximate"),
        (lambda: E.bias_gelu_fwd(torch.ones(2, 3, device=DEV), torch.ones(3), "none"), "bias must be on"),
        (lambda: E.add_layer_norm_fwd(torch.ones(2, 3, device=DEV), None, torch.ones(3, device=DEV), None, 1e-5,
                                      0.5, None), "seed"),
        (lambda: E.softmax_fwd(torch.ones(2, 3, 4, device=DEV), None, 1.0), "scores must be"),
        (lambda: E.attention_fwd(*(torch.ones(1, 2, 1, 16, device=DEV),) * 2, torch.ones(1, 3, 1, 16, device=DEV),
                                 None, 0.0, 1.0, None), "k, v"),
        (lambda: E.varlen_attention_fwd(*(torch.ones(4, 1, 16, device=DEV),) * 3, torch.tensor([0, 4], device=DEV),
                                        0, 0.0, 1.0, None), "max_seqlen"),
    ],
)
def test_compiled_ops_reject_bad_arguments(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
