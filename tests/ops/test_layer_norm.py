"""fastbert.ops.add_layer_norm / layer_norm (custom ops fastbert::add_layer_norm_fwd / _bwd) vs the reference."""

import math

import pytest
import torch
from _ops_helpers import (
    BF16,
    DTYPES,
    FP32,
    HALF_DTYPES,
    add_layer_norm_baseline,
    assert_matches_ref,
    assert_same,
    dtype_id,
    fwd_bwd,
    rand,
    requires_cuda,
    to_np,
)

import fastbert.ops as ops
from fastbert.ops._utils import dropout_scale_mask
from fastbert.reference import layer_norm_bwd_ref, layer_norm_fwd_ref

# Hidden size 1 is left out on purpose: its rstd is 1/sqrt(eps) = 1e6, so any rounding in (z - mean) is amplified
# a millionfold and no fp32 tolerance means anything there.
SHAPES = [(1, 33), (7, 17), (2, 5, 33), (3, 4, 64), (16, 768), (5, 3)]
GRAD_NAMES = ("x", "residual", "weight", "bias")


def _check_add_layer_norm(shape, has_residual, has_bias, dtype, device="cpu", eps=1e-12, offset=0.0):
    hidden = shape[-1]
    x = rand(shape, dtype, device, offset=offset)
    residual = rand(shape, dtype, device) if has_residual else None
    weight = rand((hidden,), dtype, device, scale=0.5, offset=1.0)
    bias = rand((hidden,), dtype, device) if has_bias else None
    dout = rand(shape, dtype, device)
    args = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    names = [n for n in GRAD_NAMES if args[n] is not None]

    def run(x, residual, weight, bias):
        if residual is None:
            return ops.layer_norm(x, weight, bias, eps)
        return ops.add_layer_norm(x, residual, weight, bias, eps)

    out, grads = fwd_bwd(run, args, names, dout)
    base_out, base_grads = fwd_bwd(lambda **a: add_layer_norm_baseline(**a, eps=eps), args, names, dout)
    np_args = [to_np(args[n]) for n in GRAD_NAMES]
    ref_out, _, _ = layer_norm_fwd_ref(*np_args, eps)
    ref_grads = dict(zip(GRAD_NAMES, layer_norm_bwd_ref(to_np(dout), *np_args, eps), strict=True))

    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name in names:
        assert grads[name].dtype == args[name].dtype
        assert_matches_ref(f"d{name}", grads[name], ref_grads[name], base_grads[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_layer_norm_matches_reference(backend, shape, has_residual, has_bias, dtype):
    _check_add_layer_norm(shape, has_residual, has_bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("eps", "offset"), [(1e-5, 0.0), (1e-12, 20.0)], ids=["eps1e-5", "mean20"])
def test_add_layer_norm_eps_and_large_mean(backend, eps, offset, dtype):
    # A mean far from zero: a one-pass E[z^2] - E[z]^2 variance cancels catastrophically.
    _check_add_layer_norm((6, 96), True, True, dtype, eps=eps, offset=offset)


def test_add_layer_norm_fp32_params_with_bf16_input(backend):
    x, residual, dout = rand((4, 48), BF16), rand((4, 48), BF16), rand((4, 48), BF16)
    weight, bias = rand((48,), FP32, offset=1.0), rand((48,), FP32)
    args = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    out, grads = fwd_bwd(lambda **a: ops.add_layer_norm(**a), args, GRAD_NAMES, dout)
    half_args = {"x": x, "residual": residual, "weight": weight.to(BF16), "bias": bias.to(BF16)}
    base_out, base_grads = fwd_bwd(lambda **a: add_layer_norm_baseline(**a, eps=1e-12), half_args, GRAD_NAMES, dout)
    np_args = [to_np(args[n]) for n in GRAD_NAMES]
    assert out.dtype == BF16 and grads["weight"].dtype == FP32 and grads["bias"].dtype == FP32
    assert_matches_ref("out", out, layer_norm_fwd_ref(*np_args, 1e-12)[0], base_out, BF16)
    ref_grads = layer_norm_bwd_ref(to_np(dout), *np_args, 1e-12)
    for name, ref in zip(GRAD_NAMES, ref_grads, strict=True):
        assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], BF16)


def test_layer_norm_is_add_layer_norm_without_residual(backend):
    x, w, b = rand((3, 5, 40), FP32), rand((40,), FP32), rand((40,), FP32)
    assert torch.equal(ops.layer_norm(x, w, b, 1e-6), ops.add_layer_norm(x, None, w, b, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_layer_norm_saved_statistics(backend, dtype):
    x, residual, w = rand((2, 3, 65), dtype, offset=3.0), rand((2, 3, 65), dtype), rand((65,), dtype)
    out, mean, rstd = torch.ops.fastbert.add_layer_norm_fwd(x, residual, w, None, 1e-5, 0.0, None)
    _, ref_mean, ref_rstd = layer_norm_fwd_ref(to_np(x), to_np(residual), to_np(w), None, 1e-5)
    _, base_mean, base_rstd = torch.native_layer_norm(x + residual, (65,), w, None, 1e-5)
    # Statistics are kept in fp32 whatever the input dtype (the fake promises fp32).
    assert mean.dtype == rstd.dtype == FP32 and mean.shape == rstd.shape == x.shape[:-1]
    assert_matches_ref("mean", mean, ref_mean, base_mean.squeeze(-1), dtype)
    assert_matches_ref("rstd", rstd, ref_rstd, base_rstd.squeeze(-1), dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_add_layer_norm_non_contiguous_inputs(backend, dtype):
    n, hidden = 6, 33
    x_t, res_wide, w_wide = rand((hidden, n), dtype), rand((n, 2 * hidden), dtype), rand((2 * hidden,), dtype)
    b, dout_t = rand((hidden,), dtype), rand((hidden, n), dtype)

    def run(contiguous):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x_t, res_wide, w_wide, b)]
        x, residual, weight, bias = leaves[0].t(), leaves[1][:, ::2], leaves[2][1::2], leaves[3]
        dout = dout_t.t()
        assert not (x.is_contiguous() or residual.is_contiguous() or weight.is_contiguous() or dout.is_contiguous())
        if contiguous:
            x, residual, weight, dout = x.contiguous(), residual.contiguous(), weight.contiguous(), dout.contiguous()
        out = ops.add_layer_norm(x, residual, weight, bias, 1e-12)
        out.backward(dout)
        return [out.detach()] + [leaf.grad for leaf in leaves]

    for name, strided, dense in zip(["out", "dx", "dresidual", "dweight", "dbias"], run(False), run(True), strict=True):
        assert_same(name, strided, dense)


# ----------------------------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("has_residual", [True, False], ids=["residual", "no_residual"])
def test_add_layer_norm_dropout_matches_reference_given_its_mask(backend, has_residual):
    shape, p, seed = (64, 65), 0.3, torch.tensor([4321])
    x, dout = rand(shape, FP32), rand(shape, FP32)
    residual = rand(shape, FP32) if has_residual else None
    weight, bias = rand((65,), FP32, offset=1.0), rand((65,), FP32)
    args = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    names = [n for n in GRAD_NAMES if args[n] is not None]

    def run(x, residual, weight, bias):
        return torch.ops.fastbert.add_layer_norm_fwd(x, residual, weight, bias, 1e-12, p, seed)[0]

    out, grads = fwd_bwd(run, args, names, dout)
    # dx = dz * mask and dz is almost surely nonzero: the zeros of dx are the dropped elements.
    mask = (grads["x"] != 0).double() / (1.0 - p)
    dropped = float((mask == 0).double().mean())
    sigma = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(dropped - p) < 5 * sigma, f"dropped fraction {dropped:.4f}, expected {p} +- {5 * sigma:.4f}"
    if backend == "torch":  # the torch backend's mask is the documented dropout_scale_mask
        torch.testing.assert_close(mask.float(), dropout_scale_mask(seed, shape, p, "cpu"))

    base_out, base_grads = fwd_bwd(
        lambda **a: add_layer_norm_baseline(**a, eps=1e-12, dropout_mask=mask), args, names, dout
    )
    np_args = [to_np(args[n]) for n in GRAD_NAMES]
    ref_out, _, _ = layer_norm_fwd_ref(*np_args, 1e-12, dropout_mask=mask.numpy())
    ref_grads = layer_norm_bwd_ref(to_np(dout), *np_args, 1e-12, dropout_mask=mask.numpy())
    assert_matches_ref("out", out, ref_out, base_out, FP32)
    for name, ref in zip(GRAD_NAMES, ref_grads, strict=True):
        if name in names:
            assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], FP32)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_add_layer_norm_bwd_writes_dresidual_only_with_dropout(backend, dropout_p):
    # Without dropout d(residual) == dx: the op writes it once and returns dresidual empty; autograd hands dx to both.
    x, residual, dout = rand((6, 40), FP32), rand((6, 40), FP32), rand((6, 40), FP32)
    weight, bias = rand((40,), FP32, offset=1.0), rand((40,), FP32)
    seed = torch.tensor([123], dtype=torch.int64) if dropout_p > 0.0 else None
    _, mean, rstd = torch.ops.fastbert.add_layer_norm_fwd(x, residual, weight, bias, 1e-12, dropout_p, seed)
    dx, dres, _, _ = torch.ops.fastbert.add_layer_norm_bwd(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed)
    if dropout_p == 0.0:
        assert dres.numel() == 0
    else:
        assert dres.shape == x.shape and not torch.equal(dres, dx)  # dx is dres times the dropout mask
    leaves = [t.clone().requires_grad_() for t in (x, residual)]
    torch.manual_seed(0)
    ops.add_layer_norm(*leaves, weight, bias, 1e-12, dropout_p=dropout_p).backward(dout)
    if dropout_p == 0.0:
        assert_same("residual.grad", leaves[1].grad, leaves[0].grad)
    else:
        assert (leaves[0].grad == 0).any() and not (leaves[1].grad == 0).any()


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_add_layer_norm_dropout_is_reproducible_under_manual_seed(backend, dtype):
    x, residual, dout = rand((8, 40), dtype), rand((8, 40), dtype), rand((8, 40), dtype)
    weight, bias = rand((40,), dtype), rand((40,), dtype)
    args = {"x": x, "residual": residual, "weight": weight, "bias": bias}

    def run(seed):
        torch.manual_seed(seed)
        return fwd_bwd(lambda **a: ops.add_layer_norm(**a, dropout_p=0.4), args, GRAD_NAMES, dout)

    (out1, g1), (out2, g2), (out3, _) = run(3), run(3), run(4)
    assert torch.equal(out1, out2)
    assert all(torch.equal(g1[n], g2[n]) for n in GRAD_NAMES)
    assert not torch.equal(out1, out3), "a different seed must draw a different dropout mask"
    assert not torch.equal(out1, ops.add_layer_norm(x, residual, weight, bias)), "dropout_p=0.4 changed nothing"


# ----------------------------------------------------------------------------------------------------------------
# custom-op contract: opcheck and torch.compile


def _opcheck_cases():
    def leaf(shape, dtype=FP32, **kw):
        return rand(shape, dtype, **kw).requires_grad_(True)

    yield pytest.param((leaf((4, 33)), None, leaf((33,)), None, 1e-12, 0.0, None), id="no_residual_no_bias")
    yield pytest.param((leaf((2, 3, 33)), leaf((2, 3, 33)), leaf((33,)), leaf((33,)), 1e-5, 0.0, None), id="full")
    yield pytest.param((leaf((5, 17)), leaf((5, 17)), leaf((17,)), None, 1e-12, 0.3, torch.tensor([7])), id="dropout")
    yield pytest.param(
        (leaf((3, 24), BF16), leaf((3, 24), BF16), leaf((24,)), leaf((24,)), 1e-12, 0.0, None), id="bf16_fp32_params"
    )


@pytest.mark.parametrize("args", list(_opcheck_cases()))
def test_add_layer_norm_opcheck(backend, args):
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_fwd.default, args)
    x, residual, weight, bias, eps, p, seed = args
    with torch.no_grad():
        out, mean, rstd = torch.ops.fastbert.add_layer_norm_fwd(*args)
    detached = [None if t is None else t.detach() for t in (x, residual, weight, bias)]
    bwd_args = (torch.randn_like(out), *detached, mean, rstd, p, seed)
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_bwd.default, bwd_args)


def test_layer_norm_torch_compile_fullgraph(backend):
    x, residual, dout = rand((3, 5, 48), FP32), rand((3, 5, 48), FP32), rand((3, 5, 48), FP32)
    weight, bias = rand((48,), FP32, offset=1.0), rand((48,), FP32)

    def block(x, residual, weight, bias):
        return ops.layer_norm(ops.add_layer_norm(x, residual, weight, bias) * 3.0, weight, None, 1e-5)

    args = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    eager_out, eager_grads = fwd_bwd(block, args, GRAD_NAMES, dout)
    out, grads = fwd_bwd(torch.compile(block, fullgraph=True), args, GRAD_NAMES, dout)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# argument validation

_X, _W = rand((4, 33), FP32), rand((33,), FP32)
BAD_ARGS = [
    ("x not a tensor", dict(x=_X.tolist()), TypeError, "x must be a torch.Tensor"),
    ("x 0-dim", dict(x=_X[0, 0], residual=None, weight=_W[:1]), ValueError, "x must have at least one dimension"),
    ("x float64", dict(x=_X.double(), residual=None), TypeError, "x has dtype"),
    ("x int", dict(x=_X.int(), residual=None), TypeError, "x has dtype"),
    ("residual dtype", dict(residual=_X.to(BF16)), TypeError, "residual has dtype"),
    ("residual shape", dict(residual=_X[:2]), ValueError, "residual has shape"),
    ("residual device", dict(residual=_X.to("meta")), ValueError, "residual is on meta"),
    ("weight None", dict(weight=None), TypeError, "weight"),
    ("weight 2-D", dict(weight=_W[None]), ValueError, "weight must have 1 dimensions"),
    ("weight size", dict(weight=_W[:32]), ValueError, "weight has 32 features"),
    ("weight float64", dict(weight=_W.double()), TypeError, "weight has dtype"),
    ("bias size", dict(bias=_W[:5]), ValueError, "bias has 5 features"),
    ("bias device", dict(bias=_W.to("meta")), ValueError, "bias is on meta"),
    ("dropout above 1", dict(dropout_p=1.5), ValueError, "dropout_p"),
    ("dropout negative", dict(dropout_p=-0.5), ValueError, "dropout_p"),
]


@pytest.mark.parametrize(("kwargs", "exc", "message"), [pytest.param(*case[1:], id=case[0]) for case in BAD_ARGS])
def test_add_layer_norm_rejects_bad_arguments(kwargs, exc, message):
    args = dict(x=_X, residual=_X, weight=_W, bias=_W) | kwargs
    with pytest.raises(exc, match=message):
        ops.add_layer_norm(**args)


def test_layer_norm_rejects_missing_weight():
    with pytest.raises(TypeError, match="weight"):
        ops.layer_norm(_X, None, None)


# ----------------------------------------------------------------------------------------------------------------
# CUDA at BERT-base sizes


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("has_residual", [True, False], ids=["residual", "no_residual"])
def test_add_layer_norm_cuda_real_size(cuda_backend, has_residual, dtype):
    _check_add_layer_norm((16384, 768), has_residual, True, dtype, device="cuda")
