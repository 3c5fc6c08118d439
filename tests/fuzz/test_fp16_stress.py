"""fp16 at its extremes, on every CPU backend: attention scores of +-1e4 before scaling (one-hot softmax rows),
long sequences, softmax of +-1e4 logits, LayerNorm and GELU on values near fp16's largest (65504). Every output and
gradient must be finite and meet the accuracy rule; where fp16 arithmetic itself loses the answer (fp16 dot
products of +-1e4 scores round by +-4), the kernels, which accumulate in fp32, must also match the fp32 composition
rounded to fp16 (the best an fp16 result can be) by the same rule."""

import functools

import pytest
import torch
from _fuzz import PROFILE, Maker, forward_backward
from _ops_helpers import (
    FP16,
    FP32,
    add_layer_norm_baseline,
    assert_matches_ref,
    attention_baseline,
    bias_gelu_baseline,
    padding_mask,
    softmax_baseline,
    to_np,
)

import fastbert.ops as ops
from fastbert.reference import (
    attention_bwd_ref,
    attention_fwd_ref,
    bias_gelu_bwd_ref,
    bias_gelu_fwd_ref,
    layer_norm_bwd_ref,
    layer_norm_fwd_ref,
    softmax_bwd_ref,
    softmax_fwd_ref,
)

DEEP = PROFILE == "deep"


def _uniform(shape, bound, seed):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(FP16)


@functools.cache
def _attention_reference(shape, mask_kind, qk_std, seed, backward):
    # The float64 reference of a 4096-token sequence takes seconds: computed once, shared by the backends.
    make = Maker(seed)
    q, k, v = (to_np(make.normal(shape, FP16, qk_std if n != "v" else 1.0)) for n in "qkv")
    dout = to_np(make.normal(shape, FP16))
    mask = padding_mask(mask_kind, shape[0], shape[1])
    mask = None if mask is None else mask.numpy()
    grads = attention_bwd_ref(dout, q, k, v, mask) if backward else None
    return attention_fwd_ref(q, k, v, mask)[0], grads


def _check_attention(shape, mask_kind, qk_std, seed=0, backward=True):
    """shape (B, T, H, D); q, k ~ N(0, qk_std^2) in fp16, so q.k has std qk_std^2 * sqrt(D) before the scale."""
    b, t = shape[:2]
    make = Maker(seed)
    tensors = {n: make.normal(shape, FP16, qk_std if n != "v" else 1.0) for n in "qkv"}
    dout = make.normal(shape, FP16)
    mask = padding_mask(mask_kind, b, t)
    names = "qkv" if backward else ""

    def run(fn, inputs):
        if backward:
            return forward_backward(fn, inputs, names, dout)
        with torch.no_grad():
            return fn(**inputs), {}

    out, grads = run(lambda q, k, v: ops.attention(q, k, v, mask), tensors)
    base_out, base_grads = run(lambda q, k, v: attention_baseline(q, k, v, mask), tensors)
    wide = {n: x.float() for n, x in tensors.items()}  # the fp32 composition, rounded to fp16 below
    wide_out, wide_grads = run(lambda q, k, v: attention_baseline(q, k, v, mask), wide)
    ref_out, ref_grads = _attention_reference(shape, mask_kind, qk_std, seed, backward)
    assert_matches_ref("out", out, ref_out, base_out, FP16)
    assert_matches_ref("out (vs fp32 composition)", out, ref_out, wide_out.to(FP16), FP16)
    if backward:
        for name, ref in zip("qkv", ref_grads, strict=True):
            assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], FP16)
            assert_matches_ref(f"d{name} (vs fp32 composition)", grads[name], ref, wide_grads[name].to(FP16), FP16)


@pytest.mark.parametrize("mask_kind", ["none", "partial", "empty"])
def test_attention_scores_of_1e4(backend, mask_kind):
    # std 25: q.k has std 5e3 at head dim 64 and reaches ~2e4, within fp16 (the fp16 baseline must stay finite).
    _check_attention((2, 48, 2, 64), mask_kind, qk_std=25.0)


def test_attention_long_sequence(backend):
    # The interpreter runs every Triton program in Python: its long sequence is shorter.
    if backend == "triton":
        _check_attention((1, 512 if DEEP else 128, 2, 64), "partial", qk_std=1.0)
    else:
        _check_attention((1, 4096, 2, 64), "partial", qk_std=1.0, backward=DEEP)
        _check_attention((1, 1024, 2, 64), "partial", qk_std=1.0)


def test_softmax_logits_of_1e4(backend):
    make = Maker(1)
    scores = make.normal((2, 2, 5, 33), FP16, 5e3)
    dprobs = make.normal(scores.shape, FP16)
    mask = padding_mask("empty", 2, 33)
    probs, grads = forward_backward(lambda s: ops.softmax(s, mask, 1.0), {"s": scores}, ["s"], dprobs)
    base, base_grads = forward_backward(lambda s: softmax_baseline(s, mask, 1.0), {"s": scores}, ["s"], dprobs)
    ref = softmax_fwd_ref(to_np(scores), mask.numpy(), 1.0)
    assert_matches_ref("probs", probs, ref, base, FP16)
    assert_matches_ref("dscores", grads["s"], softmax_bwd_ref(to_np(dprobs), ref, 1.0), base_grads["s"], FP16)


@pytest.mark.parametrize("with_residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_layer_norm_near_fp16_max(backend, with_residual):
    # Values up to 6e4: their squares overflow fp16 by 5 orders of magnitude, so the statistics must be fp32.
    # The residual keeps x + residual within fp16 (the sum is formed in the activations' dtype).
    x = _uniform((6, 96), 3e4 if with_residual else 6e4, seed=2)
    residual = _uniform((6, 96), 3e4, seed=3) if with_residual else None
    weight, bias = _uniform((96,), 2.0, seed=4), _uniform((96,), 1.0, seed=5)
    dout = _uniform((6, 96), 1.0, seed=6)
    args = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    names = [n for n, v in args.items() if v is not None]
    out, grads = forward_backward(lambda **a: ops.add_layer_norm(**a, eps=1e-12), args, names, dout)
    base, base_grads = forward_backward(lambda **a: add_layer_norm_baseline(**a, eps=1e-12), args, names, dout)
    np_args = [to_np(args[n]) for n in ("x", "residual", "weight", "bias")]
    ref_out, _, _ = layer_norm_fwd_ref(*np_args, 1e-12)
    ref_grads = dict(zip(("x", "residual", "weight", "bias"), layer_norm_bwd_ref(to_np(dout), *np_args, 1e-12),
                         strict=True))
    assert_matches_ref("out", out, ref_out, base, FP16)
    for name in names:
        assert_matches_ref(f"d{name}", grads[name], ref_grads[name], base_grads[name], FP16)


def test_bias_gelu_near_fp16_max(backend):
    x, bias, dout = _uniform((4, 64), 5e4, seed=7), _uniform((64,), 1e4, seed=8), _uniform((4, 64), 1.0, seed=9)
    args = {"x": x, "bias": bias}
    out, grads = forward_backward(lambda x, bias: ops.bias_gelu(x, bias), args, ["x", "bias"], dout)
    base, base_grads = forward_backward(lambda x, bias: bias_gelu_baseline(x, bias), args, ["x", "bias"], dout)
    ref_grads = bias_gelu_bwd_ref(to_np(dout), to_np(x), to_np(bias))
    assert_matches_ref("out", out, bias_gelu_fwd_ref(to_np(x), to_np(bias)), base, FP16)
    for name, ref in zip(("x", "bias"), ref_grads, strict=True):
        assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], FP16)


@pytest.mark.parametrize("dtype", [FP32, FP16, torch.bfloat16], ids=str)
def test_layer_norm_of_a_constant_row_is_the_bias(backend, dtype):
    # A constant row (a fully padded position's embedding can be one) has zero variance: rstd = 1/sqrt(eps) = 1e6,
    # z - mean = 0 exactly, so out = bias exactly and never NaN. Its gradient is of order 1e6 (finite in fp32).
    x = torch.full((3, 40), 7.25, dtype=dtype)
    weight, bias = torch.linspace(0.5, 1.5, 40, dtype=dtype), torch.linspace(-1, 1, 40, dtype=dtype)
    out = ops.layer_norm(x, weight, bias, 1e-12)
    torch.testing.assert_close(out, bias.expand(3, 40), rtol=0, atol=0)
    if dtype == FP32:
        leaf = x.clone().requires_grad_(True)
        ops.layer_norm(leaf, weight, bias, 1e-12).backward(torch.ones(3, 40))
        assert torch.isfinite(leaf.grad).all()
