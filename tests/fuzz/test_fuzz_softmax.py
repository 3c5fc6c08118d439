"""Fuzz fastbert.ops.softmax (the output_attentions path) against the float64 reference: random (B, H, Tq, Tk)
shapes, strides of the scores and of the incoming gradient, masks (random, all real, sequences with no real key;
bool or int, transposed) and scales."""

import pytest
import torch
from _fuzz import MASK_KINDS, Maker, forward_backward, fuzz, layouts, limits, seeds
from _ops_helpers import DTYPES, HALF_DTYPES, assert_matches_ref, dtype_id, requires_cuda, softmax_baseline, to_np
from hypothesis import strategies as st

import fastbert.ops as ops
from fastbert.reference import softmax_bwd_ref, softmax_fwd_ref


def softmax_cases(lim):
    return st.fixed_dictionaries({
        "shape": st.tuples(st.integers(1, lim.batch), st.integers(1, lim.heads), st.integers(1, lim.seqlen),
                           st.integers(1, 4 * lim.seqlen)),
        "mask": st.sampled_from(MASK_KINDS),
        "mask_int": st.booleans(),
        "mask_transposed": st.booleans(),
        "layouts": layouts(2),  # scores, dprobs
        "scale": st.floats(0.05, 2.0),
        "magnitude": st.floats(0.25, 8.0),  # scaled logits up to ~+-50
        "seed": seeds,
    })


def check_softmax(case, dtype, device="cpu"):
    make = Maker(case["seed"])
    b, h, tq, tk = case["shape"]
    scale = case["scale"]
    scores = make.normal(case["shape"], dtype, case["magnitude"], layout=case["layouts"][0], device=device)
    dprobs = make.normal(case["shape"], dtype, layout=case["layouts"][1], device=device)
    mask = make.key_padding_mask(case["mask"], b, tk, case["mask_int"], case["mask_transposed"], device)
    bool_mask = None if mask is None else mask != 0
    probs, grads = forward_backward(lambda s: ops.softmax(s, mask, scale), {"s": scores}, ["s"], dprobs)
    base_probs, base_grads = forward_backward(lambda s: softmax_baseline(s, bool_mask, scale), {"s": scores}, ["s"],
                                              dprobs)
    np_mask = None if bool_mask is None else bool_mask.cpu().numpy()
    ref_probs = softmax_fwd_ref(to_np(scores), np_mask, scale)
    ref_dscores = softmax_bwd_ref(to_np(dprobs), ref_probs, scale)
    assert probs.dtype == dtype and probs.shape == scores.shape
    assert_matches_ref("probs", probs, ref_probs, base_probs, dtype)
    assert_matches_ref("dscores", grads["s"], ref_dscores, base_grads["s"], dtype)
    if bool_mask is not None:
        empty = ~bool_mask.any(dim=1)
        assert torch.count_nonzero(probs[empty]) == 0, "a row with no real key is not all zeros"
        assert torch.count_nonzero(probs.permute(0, 3, 1, 2)[~bool_mask]) == 0, "a padded key has probability > 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fuzz_softmax(backend, dtype):
    lim = limits(backend)
    fuzz(softmax_cases(lim), lambda case: check_softmax(case, dtype), lim)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_fuzz_softmax_cuda(cuda_backend, dtype):
    lim = limits(cuda_backend, "cuda")
    fuzz(softmax_cases(lim), lambda case: check_softmax(case, dtype, "cuda"), lim)
