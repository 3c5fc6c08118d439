"""Fuzz fastbert.ops.attention against the float64 reference: random shapes (size-1 and odd dims, Tq != Tk, head
dims 1..160), strides (transposed, sliced, expanded views of q, k, v and the incoming gradient), masks (random, all
real, sequences with no real key; bool or int, transposed) and scales, on every CPU backend and dtype."""

import pytest
import torch
from _fuzz import MASK_KINDS, Maker, forward_backward, fuzz, layouts, limits, seeds
from _ops_helpers import DTYPES, HALF_DTYPES, assert_matches_ref, attention_baseline, dtype_id, requires_cuda, to_np
from hypothesis import strategies as st

import fastbert.ops as ops
from fastbert.reference import attention_bwd_ref, attention_fwd_ref


def attention_cases(lim):
    return st.fixed_dictionaries({
        "batch": st.integers(1, lim.batch),
        "seqlen_q": st.integers(1, lim.seqlen),
        "seqlen_k": st.integers(1, lim.seqlen),
        "heads": st.integers(1, lim.heads),
        "headdim": st.sampled_from(lim.headdims),
        "mask": st.sampled_from(MASK_KINDS),
        "mask_int": st.booleans(),
        "mask_transposed": st.booleans(),
        "layouts": layouts(4),  # q, k, v, dout
        # A factor on the default 1/sqrt(headdim) (None: the default) and the inputs' magnitude: scores stay within
        # a few tens, where fp32 dot products are well conditioned.
        "scale_factor": st.none() | st.floats(0.05, 1.5),
        "magnitude": st.floats(0.25, 2.5),
        "seed": seeds,
    })


def check_attention(case, dtype, device="cpu"):
    make = Maker(case["seed"])
    b, tq, tk, h, d = (case[n] for n in ("batch", "seqlen_q", "seqlen_k", "heads", "headdim"))
    lay_q, lay_k, lay_v, lay_dout = case["layouts"]
    mag = case["magnitude"]
    tensors = {
        "q": make.normal((b, tq, h, d), dtype, mag, layout=lay_q, device=device),
        "k": make.normal((b, tk, h, d), dtype, mag, layout=lay_k, device=device),
        "v": make.normal((b, tk, h, d), dtype, layout=lay_v, device=device),
    }
    dout = make.normal((b, tq, h, d), dtype, layout=lay_dout, device=device)
    mask = make.key_padding_mask(case["mask"], b, tk, case["mask_int"], case["mask_transposed"], device)
    bool_mask = None if mask is None else mask != 0
    scale = None if case["scale_factor"] is None else case["scale_factor"] / d**0.5

    out, grads = forward_backward(lambda q, k, v: ops.attention(q, k, v, mask, scale=scale), tensors, "qkv", dout)
    base_out, base_grads = forward_backward(
        lambda q, k, v: attention_baseline(q, k, v, bool_mask, scale), tensors, "qkv", dout
    )
    np_qkv = [to_np(tensors[n]) for n in "qkv"]
    np_mask = None if bool_mask is None else bool_mask.cpu().numpy()
    ref_out, _ = attention_fwd_ref(*np_qkv, np_mask, scale)
    ref_grads = attention_bwd_ref(to_np(dout), *np_qkv, np_mask, scale)

    assert out.dtype == dtype and out.shape == (b, tq, h, d)
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name, ref in zip("qkv", ref_grads, strict=True):
        assert grads[name].dtype == dtype and grads[name].shape == tensors[name].shape
        assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], dtype)
    if bool_mask is not None:
        empty = ~bool_mask.any(dim=1)  # sequences without a real key: exact zeros, not just small numbers
        for name, t in [("out", out), ("dq", grads["q"]), ("dk", grads["k"]), ("dv", grads["v"])]:
            assert torch.count_nonzero(t[empty]) == 0, f"{name} is not zero on a sequence with no real key"
        for name in "kv":
            assert torch.count_nonzero(grads[name][~bool_mask]) == 0, f"d{name} is not zero on padded keys"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fuzz_attention(backend, dtype):
    lim = limits(backend)
    fuzz(attention_cases(lim), lambda case: check_attention(case, dtype), lim)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_fuzz_attention_cuda(cuda_backend, dtype):
    lim = limits(cuda_backend, "cuda")
    fuzz(attention_cases(lim), lambda case: check_attention(case, dtype, "cuda"), lim)
