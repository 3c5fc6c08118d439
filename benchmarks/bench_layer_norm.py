"""add_layer_norm: LayerNorm(x + residual), BERT's post-LN sublayer output, forward and backward.

Memory-bound: figures are GB/s of the tensors the op must read and write, against the session's copy bandwidth.
Shapes: GPU (tokens, hidden) = (16384, 1024) (bert-large) and (32 * 512, 768) (bert-base at batch 32, seqlen 512);
CPU (1024, 768), plus a tiny (64, 96) that the NumPy reference and the Triton interpreter run too.
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
from fastbert.reference import layer_norm_bwd_ref, layer_norm_fwd_ref

OP = "add_layer_norm"
EPS = 1e-12  # BERT's layer_norm_eps
GRADS = ("dx", "dresidual", "dweight", "dbias")  # the reference's gradients, in order

if ON_GPU:
    CASES = make_cases(OP, [((16384, 1024), ""), ((32 * 512, 768), "")], ref_rows=1024)
else:
    CASES = make_cases(OP, [((1024, 768), "")], tiny_shapes=[((64, 96), "")])


def make_inputs(case):
    rows, hidden = case.shape
    gen = generator(0)
    # weight around 1 and a non-zero bias, so that neither is the trivial identity.
    inputs = {
        "x": randn((rows, hidden), case.dtype, gen),
        "residual": randn((rows, hidden), case.dtype, gen),
        "weight": randn((hidden,), case.dtype, gen, std=0.1, mean=1.0),
        "bias": randn((hidden,), case.dtype, gen, std=0.1),
    }
    if case.direction == "bwd":
        inputs["dout"] = randn((rows, hidden), case.dtype, gen)
    return inputs


def _eager(x, residual, weight, bias):
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, EPS)


def build(provider, case, inp):
    x, residual, weight, bias = inp["x"], inp["residual"], inp["weight"], inp["bias"]
    if case.direction == "fwd":
        if provider == TORCH_EAGER:
            return lambda: {"out": _eager(x, residual, weight, bias)}
        if provider == NUMPY_REF:
            args = ref_inputs(case, inp, ("x", "residual", "weight", "bias"))
            return lambda: {"out": layer_norm_fwd_ref(*args, EPS)[0]}
        return lambda: {"out": fastbert.ops.add_layer_norm(x, residual, weight, bias, EPS)}

    dout = inp["dout"]
    if provider == TORCH_EAGER:
        return autograd_backward(_eager, {"x": x, "residual": residual, "weight": weight, "bias": bias}, dout)
    if provider == NUMPY_REF:
        args = ref_inputs(case, inp, ("dout", "x", "residual", "weight", "bias"))
        return lambda: dict(zip(GRADS, layer_norm_bwd_ref(*args, EPS), strict=True))
    # As autograd runs it, like the eager baseline: the kernel writes dx once and autograd hands it to x and residual.
    def forward(x, residual, weight, bias):
        return fastbert.ops.add_layer_norm(x, residual, weight, bias, EPS)

    return autograd_backward(forward, {"x": x, "residual": residual, "weight": weight, "bias": bias}, dout)


def reference(case, inp):
    if case.direction == "fwd":
        return {"out": layer_norm_fwd_ref(*ref_inputs(case, inp, ("x", "residual", "weight", "bias")), EPS)[0]}
    args = ref_inputs(case, inp, ("dout", "x", "residual", "weight", "bias"))
    return drop_row_reductions(dict(zip(GRADS, layer_norm_bwd_ref(*args, EPS), strict=True)), case)


def work(case, inp):
    x = inp["x"]
    params = nbytes(inp["weight"], inp["bias"])
    stats = 2 * x.shape[0] * 4  # fp32 mean and rstd per row
    if case.direction == "fwd":
        return "bytes", 3 * nbytes(x) + params + stats  # read x, residual; write out (+ stats)
    # read dout, x, residual, stats; write dx (also the residual's gradient), dweight, dbias
    return "bytes", 4 * nbytes(x) + 2 * params + stats


SPEC = OpSpec(make_inputs=make_inputs, build=build, reference=reference, work=work)


@pytest.mark.parametrize(("case", "provider"), bench_params(CASES))
def test_add_layer_norm(benchmark, bench_env, case, provider):
    run_case(benchmark, bench_env, SPEC, case, provider)
