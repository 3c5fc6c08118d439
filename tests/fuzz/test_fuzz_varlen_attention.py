"""Fuzz fastbert.ops.varlen_attention (packed sequences) against the float64 reference: random sequence lengths
(empty sequences included), int32 or int64 offsets, max_seqlen given exactly, larger, or left to the op, head dims,
scales, and transposed / sliced / expanded views of q, k, v and the incoming gradient."""

import pytest
import torch
from _fuzz import Maker, forward_backward, fuzz, layouts, limits, seeds
from _ops_helpers import DTYPES, HALF_DTYPES, assert_matches_ref, attention_baseline, dtype_id, requires_cuda, to_np
from hypothesis import strategies as st

from fastbert.ops.varlen_attention import varlen_attention
from fastbert.ops.varlen_attention.reference import varlen_attention_bwd_ref, varlen_attention_fwd_ref


def varlen_cases(lim):
    return st.fixed_dictionaries({
        "lengths": st.lists(st.integers(0, lim.seqlen), min_size=1, max_size=lim.batch + 1).filter(
            lambda lengths: sum(lengths) > 0
        ),
        "heads": st.integers(1, lim.heads),
        "headdim": st.sampled_from(lim.headdims),
        "offsets_int64": st.booleans(),
        "max_seqlen": st.sampled_from(["none", "exact", "larger"]),
        "layouts": layouts(4),  # q, k, v, dout
        "scale_factor": st.none() | st.floats(0.05, 1.5),
        "magnitude": st.floats(0.25, 2.5),
        "seed": seeds,
    })


def _baseline(q, k, v, bounds, scale):
    # The padded same-dtype composition on each sequence alone (an empty sequence has no output rows).
    outs = [attention_baseline(q[None, s:e], k[None, s:e], v[None, s:e], None, scale)[0]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    return torch.cat(outs)


def check_varlen(case, dtype, device="cpu"):
    make = Maker(case["seed"])
    lengths, h, d = case["lengths"], case["heads"], case["headdim"]
    total = sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int64 if case["offsets_int64"] else torch.int32, device=device)
    max_seqlen = {"none": None, "exact": max(lengths), "larger": max(lengths) + 3}[case["max_seqlen"]]
    lay_q, lay_k, lay_v, lay_dout = case["layouts"]
    mag = case["magnitude"]
    tensors = {
        "q": make.normal((total, h, d), dtype, mag, layout=lay_q, device=device),
        "k": make.normal((total, h, d), dtype, mag, layout=lay_k, device=device),
        "v": make.normal((total, h, d), dtype, layout=lay_v, device=device),
    }
    dout = make.normal((total, h, d), dtype, layout=lay_dout, device=device)
    scale = None if case["scale_factor"] is None else case["scale_factor"] / d**0.5

    def run(q, k, v):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale)

    out, grads = forward_backward(run, tensors, "qkv", dout)
    base_out, base_grads = forward_backward(lambda q, k, v: _baseline(q, k, v, bounds, scale), tensors, "qkv", dout)
    np_qkv = [to_np(tensors[n]) for n in "qkv"]
    ref_out, _ = varlen_attention_fwd_ref(*np_qkv, bounds, scale)
    ref_grads = varlen_attention_bwd_ref(to_np(dout), *np_qkv, bounds, scale)
    assert out.dtype == dtype and out.shape == (total, h, d)
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name, ref in zip("qkv", ref_grads, strict=True):
        assert grads[name].dtype == dtype and grads[name].shape == (total, h, d)
        assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fuzz_varlen_attention(backend, dtype):
    lim = limits(backend)
    fuzz(varlen_cases(lim), lambda case: check_varlen(case, dtype), lim)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_fuzz_varlen_attention_cuda(cuda_backend, dtype):
    lim = limits(cuda_backend, "cuda")
    fuzz(varlen_cases(lim), lambda case: check_varlen(case, dtype, "cuda"), lim)
