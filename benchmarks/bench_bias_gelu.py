"""bias_gelu: gelu(x + bias), the FFN's intermediate activation; bias_gelu_layer_norm: LayerNorm(gelu(x + bias)),
the MLM head transform. Exact (erf) GELU, BERT's "gelu". Forward and backward.

Memory-bound: figures are GB/s of the tensors the op must read and write, against the session's copy bandwidth.
Shapes: GPU (tokens, intermediate) = (16384, 3072) for bias_gelu and (tokens, hidden) = (16384, 768) for the head;
CPU (1024, 3072) and (1024, 768), plus a tiny (64, 96) for the NumPy reference and the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from _common import (
    NUMPY_REF,
    ON_GPU,
    TORCH_EAGER,
    OpSpec,
    autograd_backward,
    bench_params,
    drop_row_reductions,
    generator,
    make_cases,
    nbytes,
    randn,
    ref_inputs,
    run_case,
)

import fastbert.ops
from fastbert.reference import (
    bias_gelu_bwd_ref,
    bias_gelu_fwd_ref,
    bias_gelu_layer_norm_bwd_ref,
    bias_gelu_layer_norm_fwd_ref,
)

EPS = 1e-12  # BERT's layer_norm_eps
APPROXIMATE = "none"  # exact erf GELU
TOKENS = 16384 if ON_GPU else 1024
REF_ROWS = 1024 if ON_GPU else None  # the erf reference costs ~0.1 us per element in Python
TINY = [((64, 96), "")]

GELU_CASES = make_cases("bias_gelu", [((TOKENS, 3072), "")], tiny_shapes=TINY, ref_rows=REF_ROWS)
GELU_LN_CASES = make_cases("bias_gelu_layer_norm", [((TOKENS, 768), "")], tiny_shapes=TINY, ref_rows=REF_ROWS)


def make_inputs(case):
    rows, hidden = case.shape
    gen = generator(0)
    inputs = {"x": randn((rows, hidden), case.dtype, gen), "bias": randn((hidden,), case.dtype, gen, std=0.1)}
    if case.op == "bias_gelu_layer_norm":
        inputs["weight"] = randn((hidden,), case.dtype, gen, std=0.1, mean=1.0)
        inputs["ln_bias"] = randn((hidden,), case.dtype, gen, std=0.1)
    if case.direction == "bwd":
        inputs["dout"] = randn((rows, hidden), case.dtype, gen)
    return inputs


# --------------------------------------------------------------------------------------------------------------
# bias_gelu


def _gelu_eager(x, bias):
    return F.gelu(x + bias, approximate=APPROXIMATE)


def build_gelu(provider, case, inp):
    x, bias = inp["x"], inp["bias"]
    if case.direction == "fwd":
        if provider == TORCH_EAGER:
            return lambda: {"out": _gelu_eager(x, bias)}
        if provider == NUMPY_REF:
            args = ref_inputs(case, inp, ("x", "bias"))
            return lambda: {"out": bias_gelu_fwd_ref(*args, APPROXIMATE)}
        return lambda: {"out": fastbert.ops.bias_gelu(x, bias, APPROXIMATE)}

    dout = inp["dout"]
    # fastbert::bias_gelu_bwd returns dx only (autograd sums dbias from it), so every provider computes dx alone:
    # the bias is a constant of the torch-eager graph.
    if provider == TORCH_EAGER:
        return autograd_backward(lambda x: _gelu_eager(x, bias), {"x": x}, dout)
    if provider == NUMPY_REF:
        args = ref_inputs(case, inp, ("dout", "x", "bias"))
        return lambda: {"dx": bias_gelu_bwd_ref(*args, APPROXIMATE)[0]}
    return autograd_backward(lambda x: fastbert.ops.bias_gelu(x, bias, APPROXIMATE), {"x": x}, dout)


def reference_gelu(case, inp):
    if case.direction == "fwd":
        return {"out": bias_gelu_fwd_ref(*ref_inputs(case, inp, ("x", "bias")), APPROXIMATE)}
    return {"dx": bias_gelu_bwd_ref(*ref_inputs(case, inp, ("dout", "x", "bias")), APPROXIMATE)[0]}


def work_gelu(case, inp):
    x, bias = inp["x"], inp["bias"]
    if case.direction == "fwd":
        return "bytes", 2 * nbytes(x) + nbytes(bias)  # read x, bias; write out
    return "bytes", 3 * nbytes(x) + nbytes(bias)  # read dout, x, bias; write dx


GELU = OpSpec(make_inputs=make_inputs, build=build_gelu, reference=reference_gelu, work=work_gelu)


@pytest.mark.parametrize(("case", "provider"), bench_params(GELU_CASES))
def test_bias_gelu(benchmark, bench_env, case, provider):
    run_case(benchmark, bench_env, GELU, case, provider)


# --------------------------------------------------------------------------------------------------------------
# bias_gelu_layer_norm

LN_ARGS = ("x", "bias", "weight", "ln_bias")


def _gelu_ln_eager(x, weight, ln_bias, bias):
    return F.layer_norm(F.gelu(x + bias, approximate=APPROXIMATE), (x.shape[-1],), weight, ln_bias, EPS)


def build_gelu_ln(provider, case, inp):
    x, bias, weight, ln_bias = (inp[n] for n in LN_ARGS)
    if case.direction == "fwd":
        if provider == TORCH_EAGER:
            return lambda: {"out": _gelu_ln_eager(x, weight, ln_bias, bias)}
        if provider == NUMPY_REF:
            args = ref_inputs(case, inp, LN_ARGS)
            return lambda: {"out": bias_gelu_layer_norm_fwd_ref(*args, EPS, APPROXIMATE)[0]}
        return lambda: {"out": fastbert.ops.bias_gelu_layer_norm(x, bias, weight, ln_bias, EPS, APPROXIMATE)}

    dout = inp["dout"]
    if provider == TORCH_EAGER:  # the gradients the fastbert op returns: dx, dweight, dln_bias (bias constant)
        leaves = {"x": x, "weight": weight, "ln_bias": ln_bias}
        return autograd_backward(lambda **t: _gelu_ln_eager(**t, bias=bias), leaves, dout)
    if provider == NUMPY_REF:
        args = ref_inputs(case, inp, ("dout", *LN_ARGS))
        return lambda: _ref_gelu_ln_grads(*args)
    leaves = {"x": x, "weight": weight, "ln_bias": ln_bias}
    return autograd_backward(
        lambda x, weight, ln_bias: fastbert.ops.bias_gelu_layer_norm(x, bias, weight, ln_bias, EPS, APPROXIMATE),
        leaves,
        dout,
    )


def _ref_gelu_ln_grads(dout, x, bias, weight, ln_bias):
    dx, _dbias, dweight, dln_bias = bias_gelu_layer_norm_bwd_ref(dout, x, bias, weight, ln_bias, EPS, APPROXIMATE)
    return {"dx": dx, "dweight": dweight, "dln_bias": dln_bias}


def reference_gelu_ln(case, inp):
    if case.direction == "fwd":
        return {"out": bias_gelu_layer_norm_fwd_ref(*ref_inputs(case, inp, LN_ARGS), EPS, APPROXIMATE)[0]}
    return drop_row_reductions(_ref_gelu_ln_grads(*ref_inputs(case, inp, ("dout", *LN_ARGS))), case)


def work_gelu_ln(case, inp):
    x = inp["x"]
    params = nbytes(inp["bias"], inp["weight"], inp["ln_bias"])
    stats = 2 * x.shape[0] * 4  # fp32 mean and rstd per row
    if case.direction == "fwd":
        return "bytes", 2 * nbytes(x) + params + stats  # read x; write out (+ stats)
    return "bytes", 3 * nbytes(x) + 2 * params + stats  # read dout, x, stats; write dx, dweight, dln_bias


GELU_LN = OpSpec(make_inputs=make_inputs, build=build_gelu_ln, reference=reference_gelu_ln, work=work_gelu_ln)


@pytest.mark.parametrize(("case", "provider"), bench_params(GELU_LN_CASES))
def test_bias_gelu_layer_norm(benchmark, bench_env, case, provider):
    run_case(benchmark, bench_env, GELU_LN, case, provider)
