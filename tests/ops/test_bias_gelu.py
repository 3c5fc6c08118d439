"""fastbert.ops.bias_gelu and bias_gelu_layer_norm (fastbert::bias_gelu_fwd/_bwd, bias_gelu_layer_norm_fwd/_bwd)."""

import pytest
import torch
from _ops_helpers import (
    BF16,
    DTYPES,
    FP32,
    HALF_DTYPES,
    assert_matches_ref,
    assert_same,
    bias_gelu_baseline,
    bias_gelu_layer_norm_baseline,
    dtype_id,
    fwd_bwd,
    rand,
    requires_cuda,
    to_np,
)

import fastbert.ops as ops
from fastbert.reference import (
    bias_gelu_bwd_ref,
    bias_gelu_fwd_ref,
    bias_gelu_layer_norm_bwd_ref,
    bias_gelu_layer_norm_fwd_ref,
)

SHAPES = [(1, 1), (1, 33), (7, 17), (2, 5, 33), (3, 4, 64), (4, 3072)]
LN_SHAPES = [(1, 33), (7, 17), (2, 5, 33), (3, 4, 64), (8, 768)]
APPROXIMATIONS = ["none", "tanh"]
LN_GRAD_NAMES = ("x", "bias", "weight", "ln_bias")


def _check_bias_gelu(shape, has_bias, approximate, dtype, device="cpu", scale=2.0):
    x, dout = rand(shape, dtype, device, scale=scale), rand(shape, dtype, device)
    bias = rand(shape[-1:], dtype, device) if has_bias else None
    args = {"x": x, "bias": bias}
    names = ["x", "bias"] if has_bias else ["x"]
    out, grads = fwd_bwd(lambda x, bias: ops.bias_gelu(x, bias, approximate), args, names, dout)
    base_out, base_grads = fwd_bwd(lambda x, bias: bias_gelu_baseline(x, bias, approximate), args, names, dout)
    ref_out = bias_gelu_fwd_ref(to_np(x), to_np(bias), approximate)
    ref_grads = dict(
        zip(["x", "bias"], bias_gelu_bwd_ref(to_np(dout), to_np(x), to_np(bias), approximate), strict=True)
    )
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name in names:
        assert grads[name].dtype == dtype
        assert_matches_ref(f"d{name}", grads[name], ref_grads[name], base_grads[name], dtype)


def _check_bias_gelu_layer_norm(shape, has_bias, has_ln_bias, approximate, dtype, device="cpu", eps=1e-12):
    hidden = shape[-1]
    x, dout = rand(shape, dtype, device, scale=2.0), rand(shape, dtype, device)
    args = {
        "x": x,
        "bias": rand((hidden,), dtype, device) if has_bias else None,
        "weight": rand((hidden,), dtype, device, scale=0.5, offset=1.0),
        "ln_bias": rand((hidden,), dtype, device) if has_ln_bias else None,
    }
    names = [n for n in LN_GRAD_NAMES if args[n] is not None]
    out, grads = fwd_bwd(lambda **a: ops.bias_gelu_layer_norm(**a, eps=eps, approximate=approximate), args, names, dout)
    base_out, base_grads = fwd_bwd(
        lambda **a: bias_gelu_layer_norm_baseline(**a, eps=eps, approximate=approximate), args, names, dout
    )
    np_args = [to_np(args[n]) for n in LN_GRAD_NAMES]
    ref_out, _, _ = bias_gelu_layer_norm_fwd_ref(*np_args, eps, approximate)
    ref_grads = bias_gelu_layer_norm_bwd_ref(to_np(dout), *np_args, eps, approximate)
    ref_grads = dict(zip(LN_GRAD_NAMES, ref_grads, strict=True))
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name in names:
        assert grads[name].dtype == dtype
        assert_matches_ref(f"d{name}", grads[name], ref_grads[name], base_grads[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_reference(backend, shape, has_bias, approximate, dtype):
    _check_bias_gelu(shape, has_bias, approximate, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_bias_gelu_wide_input_range(backend, approximate, dtype):
    # |x| up to ~40: the erf / tanh tails, where a careless GELU derivative gives NaN or loses its sign.
    _check_bias_gelu((16, 96), True, approximate, dtype, scale=10.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize(
    ("has_bias", "has_ln_bias"),
    [(True, True), (False, True), (True, False), (False, False)],
    ids=["bias_ln_bias", "ln_bias", "bias", "neither"],
)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
def test_bias_gelu_layer_norm_matches_reference(backend, shape, has_bias, has_ln_bias, approximate, dtype):
    _check_bias_gelu_layer_norm(shape, has_bias, has_ln_bias, approximate, dtype)


def test_bias_gelu_tanh_differs_from_exact(backend):
    x = torch.linspace(-4, 4, 101).reshape(1, 101)
    diff = (ops.bias_gelu(x, None, "tanh") - ops.bias_gelu(x, None, "none")).abs().max()
    assert 1e-5 < diff < 1e-2, f"tanh and exact GELU differ by {diff}: is approximate ignored?"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_gelu_inplace_matches_bias_gelu(backend, has_bias, approximate, dtype):
    # Same result as the out-of-place op, written into x itself (no new storage), and checked against the reference.
    x, bias = rand((7, 67), dtype, scale=3.0), (rand((67,), dtype) if has_bias else None)
    expected = ops.bias_gelu(x, bias, approximate)
    ref = bias_gelu_fwd_ref(to_np(x), to_np(bias), approximate)
    target = x.clone()
    with torch.no_grad():
        got = ops.bias_gelu_(target, bias, approximate)
    assert got is target
    assert_matches_ref("out", got, ref, bias_gelu_baseline(x, bias, approximate), dtype)
    # Not bitwise for bf16 with a bias under torch: the in-place add rounds x + bias to bf16 as the out-of-place one.
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if has_bias is False or dtype == FP32 else 1e-2)


def test_bias_gelu_inplace_refuses_autograd_and_strided_inputs(backend):
    x = rand((4, 16), FP32).requires_grad_()
    with pytest.raises(ValueError, match="autograd cannot differentiate"):
        ops.bias_gelu_(x, None)
    with torch.no_grad():  # no graph recorded: allowed
        ops.bias_gelu_(x.detach().clone(), None)
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.bias_gelu_(rand((16, 4), FP32).t(), None)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_bias_gelu_non_contiguous_inputs(backend, dtype):
    n, hidden = 5, 33
    x_t, bias_wide, w_wide, ln_bias, dout_t = (
        rand((hidden, n), dtype),
        rand((2 * hidden,), dtype),
        rand((2 * hidden,), dtype, offset=1.0),
        rand((hidden,), dtype),
        rand((hidden, n), dtype),
    )

    def run(contiguous):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x_t, bias_wide, w_wide, ln_bias)]
        x, bias, weight, dout = leaves[0].t(), leaves[1][::2], leaves[2][1::2], dout_t.t()
        assert not (x.is_contiguous() or bias.is_contiguous() or weight.is_contiguous() or dout.is_contiguous())
        if contiguous:
            x, bias, weight, dout = x.contiguous(), bias.contiguous(), weight.contiguous(), dout.contiguous()
        y = ops.bias_gelu(x, bias, "tanh")
        out = ops.bias_gelu_layer_norm(x, bias, weight, leaves[3], 1e-12, "none")
        torch.autograd.backward([y, out], [dout, dout])
        return [y.detach(), out.detach()] + [leaf.grad for leaf in leaves]

    names = ["bias_gelu", "bias_gelu_layer_norm", "dx", "dbias", "dweight", "dln_bias"]
    for name, strided, dense in zip(names, run(False), run(True), strict=True):
        assert_same(name, strided, dense)


# ----------------------------------------------------------------------------------------------------------------
# custom-op contract: opcheck and torch.compile


def _leaf(shape, dtype=FP32):
    return rand(shape, dtype).requires_grad_(True)


BIAS_GELU_CASES = [
    pytest.param((_leaf((4, 33)), _leaf((33,)), "none"), id="bias_erf"),
    pytest.param((_leaf((2, 3, 17)), None, "tanh"), id="no_bias_tanh"),
    pytest.param((_leaf((3, 24), BF16), _leaf((24,), BF16), "tanh"), id="bf16"),
]
LN_CASES = [
    pytest.param((_leaf((4, 33)), _leaf((33,)), _leaf((33,)), _leaf((33,)), 1e-12, "none"), id="full"),
    pytest.param((_leaf((2, 3, 17)), None, _leaf((17,)), None, 1e-5, "tanh"), id="no_biases"),
    pytest.param((_leaf((3, 24), BF16), _leaf((24,), BF16), _leaf((24,)), None, 1e-12, "none"), id="bf16"),
]


def _detached(args):
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in args]


@pytest.mark.parametrize("args", BIAS_GELU_CASES)
def test_bias_gelu_opcheck(backend, args):
    torch.library.opcheck(torch.ops.fastbert.bias_gelu_fwd.default, args)
    x, bias, approximate = _detached(args)
    for need_dbias in (False, True):
        bwd_args = (torch.randn_like(x), x, bias, approximate, need_dbias)
        torch.library.opcheck(torch.ops.fastbert.bias_gelu_bwd.default, bwd_args)


@pytest.mark.parametrize("args", LN_CASES)
def test_bias_gelu_layer_norm_opcheck(backend, args):
    torch.library.opcheck(torch.ops.fastbert.bias_gelu_layer_norm_fwd.default, args)
    x, bias, weight, ln_bias, eps, approximate = _detached(args)
    out, mean, rstd = torch.ops.fastbert.bias_gelu_layer_norm_fwd(x, bias, weight, ln_bias, eps, approximate)
    for need_dbias in (False, True):
        bwd_args = (torch.randn_like(out), x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias)
        torch.library.opcheck(torch.ops.fastbert.bias_gelu_layer_norm_bwd.default, bwd_args)


def test_bias_gelu_torch_compile_fullgraph(backend):
    args = {
        "x": rand((3, 5, 40), FP32),
        "bias": rand((40,), FP32),
        "weight": rand((40,), FP32, offset=1.0),
        "ln_bias": rand((40,), FP32),
    }
    dout = rand((3, 5, 40), FP32)

    def block(x, bias, weight, ln_bias):
        h = ops.bias_gelu(x, bias, "tanh")
        return ops.bias_gelu_layer_norm(h * 2.0, bias, weight, ln_bias, 1e-12, "none")

    eager_out, eager_grads = fwd_bwd(block, args, LN_GRAD_NAMES, dout)
    out, grads = fwd_bwd(torch.compile(block, fullgraph=True), args, LN_GRAD_NAMES, dout)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name in LN_GRAD_NAMES:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# argument validation

_X, _B = rand((4, 33), FP32), rand((33,), FP32)
BIAS_GELU_BAD_ARGS = [
    ("x not a tensor", dict(x=_X.tolist()), TypeError, "x must be a torch.Tensor"),
    ("x float64", dict(x=_X.double(), bias=None), TypeError, "x has dtype"),
    ("x 0-dim", dict(x=_X[0, 0], bias=_B[:1]), ValueError, "x"),
    ("bias size", dict(bias=_B[:32]), ValueError, "bias has 32 features"),
    ("bias 2-D", dict(bias=_B[None]), ValueError, "bias must have 1 dimensions"),
    ("bias float64", dict(bias=_B.double()), TypeError, "bias has dtype"),
    ("bias device", dict(bias=_B.to("meta")), ValueError, "bias is on meta"),
    ("approximate erf", dict(approximate="erf"), ValueError, "approximate"),
    ("approximate None", dict(approximate=None), ValueError, "approximate"),
]
LN_BAD_ARGS = [
    ("x 0-dim", dict(x=_X[0, 0], bias=None, weight=_B[:1], ln_bias=None), ValueError, "x"),
    ("weight None", dict(weight=None), TypeError, "weight"),
    ("weight size", dict(weight=_B[:3]), ValueError, "weight has 3 features"),
    ("ln_bias size", dict(ln_bias=_B[:3]), ValueError, "ln_bias has 3 features"),
    ("ln_bias float64", dict(ln_bias=_B.double()), TypeError, "ln_bias has dtype"),
    ("bias size", dict(bias=_B[:3]), ValueError, "bias has 3 features"),
    ("approximate sigmoid", dict(approximate="sigmoid"), ValueError, "approximate"),
]


@pytest.mark.parametrize(("kwargs", "exc", "message"), [pytest.param(*c[1:], id=c[0]) for c in BIAS_GELU_BAD_ARGS])
def test_bias_gelu_rejects_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        ops.bias_gelu(**(dict(x=_X, bias=_B, approximate="none") | kwargs))


@pytest.mark.parametrize(("kwargs", "exc", "message"), [pytest.param(*c[1:], id=c[0]) for c in LN_BAD_ARGS])
def test_bias_gelu_layer_norm_rejects_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        ops.bias_gelu_layer_norm(**(dict(x=_X, bias=_B, weight=_B, ln_bias=_B) | kwargs))


# ----------------------------------------------------------------------------------------------------------------
# CUDA at BERT-base sizes (FFN intermediate 3072, MLM head hidden 768)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_bias_gelu_cuda_real_size(cuda_backend, approximate, dtype):
    _check_bias_gelu((4096, 3072), True, approximate, dtype, device="cuda")
    _check_bias_gelu_layer_norm((4096, 768), True, True, approximate, dtype, device="cuda")
