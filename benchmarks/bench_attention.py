"""attention: bidirectional softmax(q k^T * scale) v with a key padding mask, forward and backward.

q, k, v: (batch, seqlen, nheads, headdim), fastbert's layout. Compute-bound: figures are TFLOP/s of the useful
work (padded keys excluded: 4 * nheads * headdim * seqlen_q * real keys for the forward, 2.5x that for the
backward, flash-attention's convention), against the session's matmul rate in the same dtype. Shapes: GPU
32x512x12x64, dense and with half the keys padded; CPU 4x128x12x64 (both variants), plus a tiny 2x32x2x16 for the
NumPy reference and the Triton interpreter. Extra provider: torch SDPA.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _common import (
    NUMPY_REF,
    ON_GPU,
    TORCH_EAGER,
    TORCH_SDPA,
    OpSpec,
    additive_mask,
    autograd_backward,
    bench_params,
    generator,
    key_padding_mask,
    make_cases,
    randn,
    ref_inputs,
    run_case,
)

import fastbert.ops
from fastbert.reference import attention_bwd_ref, attention_fwd_ref

OP = "attention"
QKV = ("q", "k", "v")

if ON_GPU:
    CASES = make_cases(OP, [((32, 512, 12, 64), ""), ((32, 512, 12, 64), "pad50")], ref_rows=2)
else:
    CASES = make_cases(
        OP, [((4, 128, 12, 64), ""), ((4, 128, 12, 64), "pad50")], tiny_shapes=[((2, 32, 2, 16), "pad50")]
    )


def make_inputs(case):
    batch, seqlen, _, headdim = case.shape
    gen = generator(0)
    inputs = {name: randn(case.shape, case.dtype, gen) for name in QKV}
    inputs["mask"] = key_padding_mask(batch, seqlen, case.variant)
    # transformers builds the additive mask once per forward, outside any one layer: not timed.
    inputs["bias"] = additive_mask(inputs["mask"], case.dtype)
    inputs["scale"] = 1.0 / math.sqrt(headdim)
    if case.direction == "bwd":
        inputs["dout"] = randn(case.shape, case.dtype, gen)
    return inputs


def _eager(q, k, v, bias, scale):
    # transformers' eager BertSelfAttention: (B, H, T, D) matmul, additive mask, softmax, matmul, back to (B, T, H, D).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).contiguous()


def _sdpa(q, k, v, mask, scale):
    attn_mask = None if mask is None else mask[:, None, None, :]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).transpose(1, 2).contiguous()


def build(provider, case, inp):
    q, k, v, mask, bias, scale = inp["q"], inp["k"], inp["v"], inp["mask"], inp["bias"], inp["scale"]
    if case.direction == "fwd":
        if provider == TORCH_EAGER:
            return lambda: {"out": _eager(q, k, v, bias, scale)}
        if provider == TORCH_SDPA:
            return lambda: {"out": _sdpa(q, k, v, mask, scale)}
        if provider == NUMPY_REF:
            args = ref_inputs(case, inp, (*QKV, "mask"))
            return lambda: {"out": attention_fwd_ref(*args, scale)[0]}
        return lambda: {"out": fastbert.ops.attention(q, k, v, mask, 0.0, scale)}

    dout = inp["dout"]
    if provider == TORCH_EAGER:
        return autograd_backward(lambda q, k, v: _eager(q, k, v, bias, scale), {"q": q, "k": k, "v": v}, dout)
    if provider == TORCH_SDPA:
        return autograd_backward(lambda q, k, v: _sdpa(q, k, v, mask, scale), {"q": q, "k": k, "v": v}, dout)
    if provider == NUMPY_REF:
        args = ref_inputs(case, inp, ("dout", *QKV, "mask"))
        return lambda: dict(zip(("dq", "dk", "dv"), attention_bwd_ref(*args, scale), strict=True))
    # The backward custom op on the forward's saved out and log-sum-exp: the kernel alone, as autograd would call it.
    out, lse = torch.ops.fastbert.attention_fwd(q, k, v, mask, 0.0, scale, None)
    bwd = torch.ops.fastbert.attention_bwd
    return lambda: dict(zip(("dq", "dk", "dv"), bwd(dout, q, k, v, out, lse, mask, 0.0, scale, None), strict=True))


def reference(case, inp):
    if case.direction == "fwd":
        return {"out": attention_fwd_ref(*ref_inputs(case, inp, (*QKV, "mask")), inp["scale"])[0]}
    grads = attention_bwd_ref(*ref_inputs(case, inp, ("dout", *QKV, "mask")), inp["scale"])
    return dict(zip(("dq", "dk", "dv"), grads, strict=True))


def work(case, inp):
    batch, seqlen, nheads, headdim = case.shape
    real_keys = batch * seqlen if inp["mask"] is None else int(inp["mask"].sum())
    fwd = 4 * nheads * headdim * seqlen * real_keys  # two matmuls (q k^T and p v), 2 FLOPs per multiply-add
    return "flops", fwd if case.direction == "fwd" else 2.5 * fwd  # bwd: five matmuls, recomputing q k^T


SPEC = OpSpec(make_inputs=make_inputs, build=build, reference=reference, work=work)


@pytest.mark.parametrize(("case", "provider"), bench_params(CASES, baselines=(TORCH_EAGER, TORCH_SDPA)))
def test_attention(benchmark, bench_env, case, provider):
    run_case(benchmark, bench_env, SPEC, case, provider)
