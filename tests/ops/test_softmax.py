"""fastbert.ops.softmax (custom ops fastbert::softmax_fwd / softmax_bwd) against the float64 reference."""

import pytest
import torch
from _ops_helpers import (
    BF16,
    DTYPES,
    FP32,
    HALF_DTYPES,
    assert_matches_ref,
    assert_same,
    dtype_id,
    fwd_bwd,
    padding_mask,
    rand,
    requires_cuda,
    softmax_baseline,
    to_np,
)

import fastbert.ops as ops
from fastbert.reference import softmax_bwd_ref, softmax_fwd_ref

# (batch, nheads, seqlen_q, seqlen_k)
SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (1, 4, 13, 13), (3, 2, 5, 9), (2, 12, 33, 33)]
MASKS = ["none", "partial", "empty"]


def _check_softmax(shape, mask_kind, dtype, device="cpu", scale=0.125, input_scale=4.0):
    scores, dout = rand(shape, dtype, device, scale=input_scale), rand(shape, dtype, device)
    mask = padding_mask(mask_kind, shape[0], shape[3], device)
    args = {"scores": scores}
    probs, grads = fwd_bwd(lambda scores: ops.softmax(scores, mask, scale), args, ["scores"], dout)
    base_probs, base_grads = fwd_bwd(lambda scores: softmax_baseline(scores, mask, scale), args, ["scores"], dout)
    ref_probs = softmax_fwd_ref(to_np(scores), None if mask is None else mask.cpu().numpy(), scale)
    ref_grad = softmax_bwd_ref(to_np(dout), ref_probs, scale)

    assert probs.dtype == dtype and probs.shape == scores.shape
    assert_matches_ref("probs", probs, ref_probs, base_probs, dtype)
    assert grads["scores"].dtype == dtype
    assert_matches_ref("dscores", grads["scores"], ref_grad, base_grads["scores"], dtype)
    if mask is not None:
        key_is_pad = ~mask[:, None, None, :].expand(shape)  # padded keys: probability and gradient exactly 0
        for name, t in [("probs", probs), ("dscores", grads["scores"])]:
            assert torch.count_nonzero(t[key_is_pad]) == 0, f"{name} is not zero on padded keys"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_matches_reference(backend, shape, mask_kind, dtype):
    _check_softmax(shape, mask_kind, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    ("scale", "input_scale"), [(1.0, 1.0), (1.0, 40.0), (3.0, 30.0)], ids=["unit", "scores40", "scaled90"]
)
def test_softmax_scales_and_large_scores(backend, scale, input_scale, dtype):
    # Logits of order +-100 to +-300: exp overflows in fp32 unless the row max is subtracted first.
    _check_softmax((2, 3, 6, 11), "partial", dtype, scale=scale, input_scale=input_scale)


def test_softmax_rows_sum_to_one(backend):
    scores, mask = rand((3, 2, 4, 9), FP32, scale=5.0), padding_mask("empty", 3, 9)
    sums = ops.softmax(scores, mask, 0.5).sum(dim=-1)
    has_key = mask.any(dim=1)
    torch.testing.assert_close(sums[has_key], torch.ones_like(sums[has_key]), rtol=0, atol=1e-6)
    assert torch.count_nonzero(sums[~has_key]) == 0, "a fully padded sequence must give all-zero rows"


def test_softmax_int_mask_equals_bool_mask(backend):
    scores, mask = rand((2, 2, 3, 6), FP32), padding_mask("partial", 2, 6)
    assert torch.equal(ops.softmax(scores, mask.to(torch.int32)), ops.softmax(scores, mask))


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_softmax_non_contiguous_inputs(backend, dtype):
    b, h, t = 2, 3, 9
    mask = padding_mask("partial", b, t)
    scores_bqhk = rand((b, t, h, t), dtype)  # (B, Tq, H, Tk) permuted to (B, H, Tq, Tk)
    dout_wide = rand((b, h, t, 2 * t), dtype)

    def run(contiguous):
        leaf = scores_bqhk.detach().clone().requires_grad_(True)
        scores, dout = leaf.permute(0, 2, 1, 3), dout_wide[..., ::2]
        assert not (scores.is_contiguous() or dout.is_contiguous())
        if contiguous:
            scores, dout = scores.contiguous(), dout.contiguous()
        probs = ops.softmax(scores, mask, 0.3)
        probs.backward(dout)
        return probs.detach(), leaf.grad

    for name, strided, dense in zip(["probs", "dscores"], run(False), run(True), strict=True):
        assert_same(name, strided, dense)


# ----------------------------------------------------------------------------------------------------------------
# custom-op contract: opcheck and torch.compile


def _opcheck_cases():
    mask = padding_mask("empty", 2, 7)
    yield pytest.param((rand((2, 3, 5, 7), FP32).requires_grad_(True), None, 1.0), id="no_mask")
    yield pytest.param((rand((2, 3, 5, 7), FP32).requires_grad_(True), mask, 0.125), id="masked")
    yield pytest.param((rand((2, 1, 4, 7), BF16).requires_grad_(True), mask, 0.5), id="bf16")


@pytest.mark.parametrize("args", list(_opcheck_cases()))
def test_softmax_opcheck(backend, args):
    torch.library.opcheck(torch.ops.fastbert.softmax_fwd.default, args)
    scores, mask, scale = args
    with torch.no_grad():
        probs = torch.ops.fastbert.softmax_fwd(scores, mask, scale)
    torch.library.opcheck(torch.ops.fastbert.softmax_bwd.default, (torch.randn_like(probs), probs, scale))


def test_softmax_torch_compile_fullgraph(backend):
    scores, dout, mask = rand((2, 3, 6, 6), FP32), rand((2, 3, 6, 6), FP32), padding_mask("empty", 2, 6)

    def block(scores):
        return ops.softmax(scores * 2.0, mask, 0.5) * 3.0

    eager_out, eager_grads = fwd_bwd(block, {"scores": scores}, ["scores"], dout)
    out, grads = fwd_bwd(torch.compile(block, fullgraph=True), {"scores": scores}, ["scores"], dout)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["scores"], eager_grads["scores"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# argument validation

_S = rand((2, 3, 4, 5), FP32)
BAD_ARGS = [
    ("scores not a tensor", dict(scores=_S.tolist()), TypeError, "scores must be a torch.Tensor"),
    ("scores 3-D", dict(scores=_S[0]), ValueError, "scores must have 4 dimensions"),
    ("scores float64", dict(scores=_S.double()), TypeError, "scores has dtype"),
    ("mask shape", dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask has shape"),
    ("mask ndim", dict(key_padding_mask=torch.ones(2, 1, 5, dtype=torch.bool)), ValueError, "key_padding_mask must"),
    (
        "mask device",
        dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device="meta")),
        ValueError,
        "key_padding_mask is on meta",
    ),
]


@pytest.mark.parametrize(("kwargs", "exc", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD_ARGS])
def test_softmax_rejects_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        ops.softmax(**(dict(scores=_S) | kwargs))


# ----------------------------------------------------------------------------------------------------------------
# CUDA at BERT-base sizes


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_softmax_cuda_real_size(cuda_backend, mask_kind, dtype):
    _check_softmax((8, 12, 512, 512), mask_kind, dtype, device="cuda")
