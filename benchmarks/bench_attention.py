"""attention: bidirectional softmax(q k^T * scale) v with a key padding mask, forward and backward.

q, k, v: (batch, seqlen, nheads, headdim), fastbert's layout. Compute-bound: figures are TFLOP/s of the useful
work (padded keys excluded: 4 * nheads * headdim * seqlen_q * real keys for the forward, 2.5x that for the
backward, flash-attention's convention), against the session's matmul rate in the same dtype. Shapes: GPU
32x512x12x64, dense and with half the keys padded; CPU 4x128x12x64 (both variants), plus a tiny 2x32x2x16 for the
NumPy reference and the Triton interpreter. Extra provider: torch SDPA.

varlen_attention (padding-free): the same kind of batch packed back to back, q, k, v (total_tokens, nheads,
headdim) with cu_seqlens, sequence lengths uniform in [T/16, T] (variant "ragged"; GPU 32 sequences of 32-512
tokens, 12 heads, head dim 64; CPU 4 of 8-128; tiny 2 of 2-32), forward and forward+backward (what a training step
runs). Baselines get the same batch padded to T with a key padding mask: torch-eager (transformers' eager
attention), torch-sdpa, and padded-fastbert (fastbert.ops.attention under the default backend). FLOPs count the
real tokens only, so every provider's TFLOP/s compares its time on the same useful work. The reference covers the
first and the last sequence (outputs are compared on those, as views: nothing extra runs inside the timing).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _common import (
    DEVICE,
    DTYPES,
    NUMPY_REF,
    ON_GPU,
    TORCH_EAGER,
    TORCH_SDPA,
    Case,
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
    to_numpy,
)

import fastbert.ops
from fastbert.ops import _backend
from fastbert.ops.varlen_attention import check_cu_seqlens, varlen_attention_fwd
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
    # As autograd runs it, like the baselines: the backward kernel on the forward's saved out and log-sum-exp.
    leaves = {"q": q, "k": k, "v": v}
    return autograd_backward(lambda q, k, v: fastbert.ops.attention(q, k, v, mask, 0.0, scale), leaves, dout)


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


# --------------------------------------------------------------------------------------------------------------
# varlen_attention: packed sequences against padded baselines

VARLEN_OP = "varlen_attention"
PADDED_FASTBERT = "padded-fastbert"
GRADS = ("dq", "dk", "dv")
VARLEN_CASES = [
    Case(VARLEN_OP, direction, shape, dtype, "ragged", tiny=tiny)
    for shape, dtypes, tiny in (
        [((32, 512, 12, 64), DTYPES, False)]
        if ON_GPU
        else [((4, 128, 12, 64), DTYPES, False), ((2, 32, 2, 16), (torch.float32,), True)]
    )
    for dtype in dtypes
    for direction in ("fwd", "fwd+bwd")
]


def make_varlen_inputs(case):
    batch, seqlen, nheads, headdim = case.shape
    lengths = torch.randint(max(1, seqlen // 16), seqlen + 1, (batch,), generator=torch.Generator().manual_seed(0))
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    total = int(cu[-1])
    gen = generator(0)
    inputs = {name: randn((total, nheads, headdim), case.dtype, gen) for name in (*QKV, "dout")}
    # Validated once, untimed: on a GPU the public function's checks read cu_seqlens back (a host sync per call);
    # a model validates once per forward, not in every layer.
    inputs["cu_seqlens"], inputs["max_seqlen"] = check_cu_seqlens(cu.to(DEVICE), total, int(lengths.max()), DEVICE)
    inputs["lengths"] = lengths.tolist()
    inputs["scale"] = 1.0 / math.sqrt(headdim)
    real = torch.arange(seqlen)[None, :] < lengths[:, None]  # (batch, seqlen)
    inputs["mask"] = real.to(DEVICE)
    inputs["bias"] = additive_mask(inputs["mask"], case.dtype)
    for name in (*QKV, "dout"):  # the padded layout the baselines take, built outside the timing
        padded = inputs[name].new_zeros((batch, seqlen, nheads, headdim))
        padded[inputs["mask"]] = inputs[name]
        inputs[name + "_pad"] = padded
    return inputs


def _compared(inp):
    """(name suffix, sequence index, first token, length) of the sequences compared with the reference."""
    lengths, cu = inp["lengths"], [0, *torch.tensor(inp["lengths"]).cumsum(0).tolist()]
    return [(f"[{i}]", i, cu[i], lengths[i]) for i in sorted({0, len(lengths) - 1})]


def _packed_views(inp, outputs):
    return {name + tag: t[start : start + n] for name, t in outputs.items() for tag, _, start, n in _compared(inp)}


def _padded_views(inp, outputs):
    return {name + tag: t[i, :n] for name, t in outputs.items() for tag, i, _, n in _compared(inp)}


def _fastbert_varlen(q, k, v, inp):
    # The public function after its argument checks (done once in make_varlen_inputs).
    return _backend.call(
        varlen_attention_fwd, "varlen_attention_fwd", q, k, v, inp["cu_seqlens"], inp["max_seqlen"], 0.0,
        inp["scale"], None,
    )[0]


def _with_grads(forward, leaves, dout):
    """forward(**leaves) then its gradients, all timed: {"out": ..., "dq": ..., "dk": ..., "dv": ...}."""
    leaves = {name: t.detach().requires_grad_() for name, t in leaves.items()}

    def run():
        out = forward(**leaves)
        grads = torch.autograd.grad(out, list(leaves.values()), dout)
        return {"out": out.detach(), **dict(zip(GRADS, grads, strict=True))}

    return run


def build_varlen(provider, case, inp):
    scale, mask, bias = inp["scale"], inp["mask"], inp["bias"]
    if provider == NUMPY_REF:
        return lambda: varlen_reference(case, inp)
    if provider.startswith("fastbert-"):
        packed, views = {n: inp[n] for n in QKV}, _packed_views
        forward = lambda q, k, v: _fastbert_varlen(q, k, v, inp)  # noqa: E731
        dout = inp["dout"]
    else:
        packed, views, dout = {n: inp[n + "_pad"] for n in QKV}, _padded_views, inp["dout_pad"]
        forward = {
            TORCH_EAGER: lambda q, k, v: _eager(q, k, v, bias, scale),
            TORCH_SDPA: lambda q, k, v: _sdpa(q, k, v, mask, scale),
            PADDED_FASTBERT: lambda q, k, v: fastbert.ops.attention(q, k, v, mask, 0.0, scale),
        }[provider]
    if case.direction == "fwd":
        return lambda: views(inp, {"out": forward(**packed)})
    run = _with_grads(forward, packed, dout)
    return lambda: views(inp, run())


def varlen_reference(case, inp):
    ref = {}
    for tag, _, start, n in _compared(inp):
        q, k, v, dout = (to_numpy(inp[name][None, start : start + n]) for name in (*QKV, "dout"))
        ref["out" + tag] = attention_fwd_ref(q, k, v, None, inp["scale"])[0][0]
        if case.direction != "fwd":
            for name, g in zip(GRADS, attention_bwd_ref(dout, q, k, v, None, inp["scale"]), strict=True):
                ref[name + tag] = g[0]
    return ref


def varlen_work(case, inp):
    fwd = 4 * case.shape[2] * case.shape[3] * sum(n * n for n in inp["lengths"])  # real tokens only
    return "flops", fwd if case.direction == "fwd" else 3.5 * fwd  # forward + backward (2.5x the forward)


VARLEN_SPEC = OpSpec(make_inputs=make_varlen_inputs, build=build_varlen, reference=varlen_reference, work=varlen_work)


@pytest.mark.parametrize(
    ("case", "provider"), bench_params(VARLEN_CASES, baselines=(TORCH_EAGER, TORCH_SDPA, PADDED_FASTBERT))
)
def test_varlen_attention(benchmark, bench_env, case, provider):
    run_case(benchmark, bench_env, VARLEN_SPEC, case, provider)
