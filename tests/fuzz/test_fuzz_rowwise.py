"""Fuzz the row-wise ops against the float64 reference: add_layer_norm / layer_norm, bias_gelu and
bias_gelu_layer_norm, with random ranks (1-D to 4-D), sizes (size-1 leading dims, odd hidden sizes), optional
residual / biases, fp32 parameters under half activations, eps, mean offsets, and transposed, sliced or expanded
views of every input and of the incoming gradient."""

import pytest
from _fuzz import Maker, forward_backward, fuzz, layouts, limits, seeds
from _ops_helpers import (
    DTYPES,
    FP32,
    HALF_DTYPES,
    add_layer_norm_baseline,
    assert_matches_ref,
    bias_gelu_baseline,
    bias_gelu_layer_norm_baseline,
    dtype_id,
    requires_cuda,
    to_np,
)
from hypothesis import strategies as st

import fastbert.ops as ops
from fastbert.reference import (
    bias_gelu_bwd_ref,
    bias_gelu_fwd_ref,
    bias_gelu_layer_norm_bwd_ref,
    bias_gelu_layer_norm_fwd_ref,
    layer_norm_bwd_ref,
    layer_norm_fwd_ref,
)

LN_NAMES = ("x", "residual", "weight", "bias")
GELU_LN_NAMES = ("x", "bias", "weight", "ln_bias")


def rowwise_cases(lim):
    return st.fixed_dictionaries({
        # At least 8 features: the rows of a LayerNorm need an O(1) spread (see _fuzz's docstring).
        "shape": st.tuples(*[st.integers(1, lim.rows)] * 3).flatmap(
            lambda lead: st.tuples(st.integers(0, 3), st.integers(8, lim.hidden)).map(
                lambda rank_hidden: (*lead[: rank_hidden[0]], rank_hidden[1])
            )
        ),
        "optional": st.tuples(st.booleans(), st.booleans()),  # residual / bias present; ln_bias / bias present
        "fp32_params": st.booleans(),
        "eps": st.sampled_from([1e-12, 1e-6, 1e-5]),
        # A mean far from 0 (a one-pass variance cancels catastrophically). fp32 uses a tenth of it: at |mean| ~ 20
        # every implementation's error is the rounding of the mean (ulp(20) = 2e-6, above the 1e-6 atol), and the
        # rule's 2x comparison turns into a coin flip between equally good implementations (torch's own included);
        # tests/ops/test_layer_norm.py keeps a fixed fp32 case at mean 20. bias_gelu_layer_norm uses a tenth too:
        # GELU maps x << 0 to ~0, and a row of near-zeros has no spread to normalize.
        "offset": st.floats(-20.0, 20.0),
        "scale": st.floats(0.5, 3.0),
        "approximate": st.sampled_from(["none", "tanh"]),
        "layouts": layouts(6),  # x, residual, weight, bias, second bias (ln_bias), dout
        "seed": seeds,
    })


def _inputs(case, dtype, device, offset_factor=1.0):
    """x, residual, dout: the case's shape in ``dtype``; weight, bias, bias2: (hidden,), fp32 or ``dtype``."""
    make = Maker(case["seed"])
    shape, hidden = case["shape"], case["shape"][-1]
    lay = case["layouts"]
    param_dtype = FP32 if case["fp32_params"] else dtype
    return {
        "x": make.normal(shape, dtype, case["scale"], case["offset"] * offset_factor, lay[0], device),
        "residual": make.normal(shape, dtype, layout=lay[1], device=device),
        "weight": make.normal((hidden,), param_dtype, 0.5, 1.0, lay[2], device),
        "bias": make.normal((hidden,), param_dtype, layout=lay[3], device=device),
        "bias2": make.normal((hidden,), param_dtype, layout=lay[4], device=device),
        "dout": make.normal(shape, dtype, layout=lay[5], device=device),
    }


def _baseline_args(args, dtype, params):
    # The same-dtype baseline computes in the activations' dtype: fp32 parameters are rounded to it there.
    return args | {n: args[n].to(dtype) for n in params if args[n] is not None}


def check_add_layer_norm(case, dtype, device="cpu"):
    t = _inputs(case, dtype, device, offset_factor=0.1 if dtype == FP32 else 1.0)
    x, dout = t["x"], t["dout"]
    has_residual, has_bias = case["optional"]
    eps = case["eps"]
    args = {"x": x, "residual": t["residual"] if has_residual else None, "weight": t["weight"],
            "bias": t["bias"] if has_bias else None}
    names = [n for n in LN_NAMES if args[n] is not None]
    out, grads = forward_backward(lambda **a: ops.add_layer_norm(**a, eps=eps), args, names, dout)
    base_args = _baseline_args(args, dtype, ("weight", "bias"))
    base_out, base_grads = forward_backward(lambda **a: add_layer_norm_baseline(**a, eps=eps), base_args, names, dout)
    np_args = [to_np(args[n]) for n in LN_NAMES]
    ref_out, _, _ = layer_norm_fwd_ref(*np_args, eps)
    ref_grads = dict(zip(LN_NAMES, layer_norm_bwd_ref(to_np(dout), *np_args, eps), strict=True))
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name in names:
        assert grads[name].dtype == args[name].dtype and grads[name].shape == args[name].shape
        assert_matches_ref(f"d{name}", grads[name], ref_grads[name], base_grads[name], dtype)


def check_bias_gelu(case, dtype, device="cpu"):
    t = _inputs(case, dtype, device)
    x, dout = t["x"], t["dout"]
    approximate = case["approximate"]
    args = {"x": x, "bias": t["bias"].to(dtype) if case["optional"][1] else None}  # bias_gelu: one dtype
    names = [n for n in ("x", "bias") if args[n] is not None]
    out, grads = forward_backward(lambda x, bias: ops.bias_gelu(x, bias, approximate), args, names, dout)
    base_out, base_grads = forward_backward(lambda x, bias: bias_gelu_baseline(x, bias, approximate), args, names,
                                            dout)
    ref_out = bias_gelu_fwd_ref(to_np(x), to_np(args["bias"]), approximate)
    ref_grads = bias_gelu_bwd_ref(to_np(dout), to_np(x), to_np(args["bias"]), approximate)
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name, ref in zip(("x", "bias"), ref_grads, strict=True):
        if name in names:
            assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], dtype)


def check_bias_gelu_layer_norm(case, dtype, device="cpu"):
    t = _inputs(case, dtype, device, offset_factor=0.1)
    x, dout = t["x"], t["dout"]
    has_ln_bias, has_bias = case["optional"]
    eps, approximate = case["eps"], case["approximate"]
    args = {"x": x, "bias": t["bias"] if has_bias else None, "weight": t["weight"],
            "ln_bias": t["bias2"] if has_ln_bias else None}
    names = [n for n in GELU_LN_NAMES if args[n] is not None]

    def run(**a):
        return ops.bias_gelu_layer_norm(**a, eps=eps, approximate=approximate)

    out, grads = forward_backward(run, args, names, dout)
    base_out, base_grads = forward_backward(
        lambda **a: bias_gelu_layer_norm_baseline(**a, eps=eps, approximate=approximate),
        _baseline_args(args, dtype, ("bias", "weight", "ln_bias")), names, dout,
    )
    np_args = [to_np(args[n]) for n in GELU_LN_NAMES]
    ref_out, _, _ = bias_gelu_layer_norm_fwd_ref(*np_args, eps, approximate)
    ref_grads = bias_gelu_layer_norm_bwd_ref(to_np(dout), *np_args, eps, approximate)
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name, ref in zip(GELU_LN_NAMES, ref_grads, strict=True):
        if name in names:
            assert grads[name].dtype == args[name].dtype
            assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], dtype)


CHECKS = {
    "add_layer_norm": check_add_layer_norm,
    "bias_gelu": check_bias_gelu,
    "bias_gelu_layer_norm": check_bias_gelu_layer_norm,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", list(CHECKS))
def test_fuzz_rowwise(backend, op, dtype):
    lim = limits(backend)
    fuzz(rowwise_cases(lim), lambda case: CHECKS[op](case, dtype), lim)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", list(CHECKS))
def test_fuzz_rowwise_cuda(cuda_backend, op, dtype):
    lim = limits(cuda_backend, "cuda")
    fuzz(rowwise_cases(lim), lambda case: CHECKS[op](case, dtype, "cuda"), lim)
