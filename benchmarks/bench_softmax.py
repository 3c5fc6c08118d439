"""softmax: the masked, scaled attention softmax (the output_attentions path), forward and backward.

scores: (batch, nheads, seqlen_q, seqlen_k) with a key padding mask (about half the keys padded, see
_common.key_padding_mask) and BERT's scale 1/sqrt(64). Memory-bound: GB/s against the session's copy bandwidth.
Shapes: GPU 32x12x512x512, CPU 4x12x128x128, plus a tiny 2x2x32x32 for the NumPy reference and the Triton
interpreter.
"""

from __future__ import annotations

import pytest
import torch
from _common import (
    NUMPY_REF,
    ON_GPU,
    TORCH_EAGER,
    OpSpec,
    additive_mask,
    autograd_backward,
    bench_params,
    generator,
    key_padding_mask,
    make_cases,
    nbytes,
    randn,
    ref_inputs,
    run_case,
)

import fastbert.ops
from fastbert.reference import softmax_bwd_ref, softmax_fwd_ref

OP = "softmax"
SCALE = 0.125  # 1/sqrt(headdim) for headdim 64

if ON_GPU:
    CASES = make_cases(OP, [((32, 12, 512, 512), "pad50")], ref_rows=2)
else:
    CASES = make_cases(OP, [((4, 12, 128, 128), "pad50")], tiny_shapes=[((2, 2, 32, 32), "pad50")])


def make_inputs(case):
    batch, _, _, seqlen_k = case.shape
    gen = generator(0)
    mask = key_padding_mask(batch, seqlen_k, case.variant)
    # Unscaled q.k scores of unit-variance q, k with headdim 64 have std 8; the scale brings them back to ~1.
    inputs = {"scores": randn(case.shape, case.dtype, gen, std=8.0), "mask": mask}
    # transformers adds this (batch, 1, 1, seqlen_k) bias once per forward, so it is built outside the timing.
    inputs["bias"] = additive_mask(mask, case.dtype)
    if case.direction == "bwd":
        inputs["dprobs"] = randn(case.shape, case.dtype, gen)
    return inputs


def _eager(scores, bias):
    scores = scores * SCALE
    return torch.softmax(scores if bias is None else scores + bias, dim=-1)


def _ref_probs(case, inp):
    scores, mask = ref_inputs(case, inp, ("scores", "mask"))
    return softmax_fwd_ref(scores, mask, SCALE)


def build(provider, case, inp):
    scores, mask, bias = inp["scores"], inp["mask"], inp["bias"]
    if case.direction == "fwd":
        if provider == TORCH_EAGER:
            return lambda: {"out": _eager(scores, bias)}
        if provider == NUMPY_REF:
            args = ref_inputs(case, inp, ("scores", "mask"))
            return lambda: {"out": softmax_fwd_ref(*args, SCALE)}
        return lambda: {"out": fastbert.ops.softmax(scores, mask, SCALE)}

    dprobs = inp["dprobs"]
    if provider == TORCH_EAGER:
        return autograd_backward(lambda scores: _eager(scores, bias), {"scores": scores}, dprobs)
    if provider == NUMPY_REF:
        probs, (dprobs64,) = _ref_probs(case, inp), ref_inputs(case, inp, ("dprobs",))
        return lambda: {"dscores": softmax_bwd_ref(dprobs64, probs, SCALE)}
    return autograd_backward(lambda scores: fastbert.ops.softmax(scores, mask, SCALE), {"scores": scores}, dprobs)


def reference(case, inp):
    if case.direction == "fwd":
        return {"out": _ref_probs(case, inp)}
    (dprobs,) = ref_inputs(case, inp, ("dprobs",))
    return {"dscores": softmax_bwd_ref(dprobs, _ref_probs(case, inp), SCALE)}


def work(case, inp):
    scores, mask = inp["scores"], inp["mask"]
    if case.direction == "fwd":
        return "bytes", 2 * nbytes(scores) + nbytes(mask)  # read scores, mask; write probs
    return "bytes", 3 * nbytes(scores)  # read dprobs, probs; write dscores


SPEC = OpSpec(make_inputs=make_inputs, build=build, reference=reference, work=work)


@pytest.mark.parametrize(("case", "provider"), bench_params(CASES))
def test_softmax(benchmark, bench_env, case, provider):
    run_case(benchmark, bench_env, SPEC, case, provider)
