"""fastbert.ops.varlen_attention (custom ops fastbert::varlen_attention_fwd / _bwd) against the float64 reference.

Every available backend runs the same cases (the triton one through the interpreter on CPU, where it must not fall
back to torch): packed sequences with empty, length-1 and odd lengths, a single sequence, many short ones, head dims
16-64 and a zero-padded 40, fp32/bf16/fp16, strided views of a packed qkv projection; the dropout mask recovered
from the op's output and then checked against autograd of the same computation with that mask (forward and backward
agree), reproducible per seed, distinct per sequence and head; the padded op on the same sequences padded gives the
same result; opcheck, torch.compile(fullgraph=True), and the argument errors of the public function. The CUDA cases
(real sizes: 32 sequences of 32-512 tokens, 12 heads, head dim 64) run with a GPU.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _ops_helpers import (
    BF16,
    DTYPES,
    FP16,
    FP32,
    HALF_DTYPES,
    assert_matches_ref,
    assert_same,
    attention_baseline,
    dtype_id,
    fwd_bwd,
    rand,
    requires_cuda,
    to_np,
)

import fastbert.ops as ops
from fastbert.ops.varlen_attention.reference import varlen_attention_bwd_ref, varlen_attention_fwd_ref

LENGTHS = {
    "mixed": [5, 0, 17, 1, 33],  # an empty sequence, a single token, odd lengths, more than one 16/32-key tile
    "single": [23],
    "many": [3, 9, 0, 1, 6, 2, 8, 0, 7, 4, 5, 1],
}
TRITON_CPU = ops.backends("cpu")["triton"].available


@pytest.fixture
def kernels(backend, monkeypatch):
    """The backend under test; the triton one must run its kernels here, not the torch fallback."""
    if backend == "triton":
        module = pytest.importorskip("fastbert.ops.varlen_attention.triton")
        for name in ("_varlen_attention_fwd_torch", "_varlen_attention_bwd_torch"):
            monkeypatch.setattr(module, name, _forbidden(name))
    return backend


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"the triton backend fell back to {name}")

    return fail


def _cu(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _spans(lengths):
    starts = [0, *itertools.accumulate(lengths)]
    return [(i, s, s + n) for i, (s, n) in enumerate(zip(starts, lengths, strict=False))]


def varlen_baseline(q, k, v, cu_seqlens, scale=None, dropout_masks=None):
    """torch_D of the accuracy rule: attention_baseline on each sequence alone, in q's dtype (autograd-able).
    dropout_masks: None or one (H, L, L) tensor per sequence, 0 or 1/(1-p)."""
    lengths = torch.diff(cu_seqlens).tolist()
    outs = [
        attention_baseline(q[None, s:e], k[None, s:e], v[None, s:e], None, scale,
                           None if dropout_masks is None else dropout_masks[i][None])[0]
        for i, s, e in _spans(lengths) if e > s
    ]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _check(lengths, h, d, dtype, device="cpu", dropout=None, scale=None, baseline=None, max_seqlen=None, qkv=None):
    """Forward (out and lse) and backward of torch.ops.fastbert.varlen_attention_fwd judged by the accuracy rule.

    dropout: (p, seed, masks: one (H, L, L) tensor per sequence) or None; baseline: the same-dtype comparison
    (default varlen_baseline); qkv: (q, k, v) to use instead of fresh contiguous ones. Returns (out, lse, grads).
    """
    cu = _cu(lengths, device)
    total = sum(lengths)
    q, k, v = qkv if qkv is not None else (rand((total, h, d), dtype, device) for _ in range(3))
    dout = rand((total, h, d), dtype, device)
    p, seed, masks = dropout if dropout is not None else (0.0, None, None)
    scale_ = d**-0.5 if scale is None else scale
    max_seqlen = max(lengths) if max_seqlen is None else max_seqlen
    lse_box = []

    def run(q, k, v):
        out, lse = torch.ops.fastbert.varlen_attention_fwd(q, k, v, cu, max_seqlen, p, scale_, seed)
        lse_box.append(lse.detach())
        return out

    args = {"q": q, "k": k, "v": v}
    out, grads = fwd_bwd(run, args, "qkv", dout)
    base_masks = None if masks is None else [m.to(device=device, dtype=dtype) for m in masks]
    base = baseline or (lambda q, k, v: varlen_baseline(q, k, v, cu, scale_, base_masks))
    base_out, base_grads = fwd_bwd(base, args, "qkv", dout)
    masks_np = None if masks is None else [to_np(m) for m in masks]
    ref_out, ref_lse = varlen_attention_fwd_ref(to_np(q), to_np(k), to_np(v), cu.cpu().numpy(), scale_, masks_np)
    ref_grads = varlen_attention_bwd_ref(to_np(dout), to_np(q), to_np(k), to_np(v), cu.cpu().numpy(), scale_,
                                         masks_np)
    assert out.dtype == dtype and out.shape == (total, h, d) and out.is_contiguous()
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for name, ref in zip("qkv", ref_grads, strict=True):
        assert grads[name].dtype == dtype and grads[name].shape == (total, h, d)
        assert_matches_ref(f"d{name}", grads[name], ref, base_grads[name], dtype)
    lse = lse_box[0]
    assert lse.dtype == FP32 and lse.shape == (h, total)
    np.testing.assert_allclose(to_np(lse), ref_lse, rtol=1e-5, atol=1e-5, err_msg="lse")
    return out, lse, grads


# ----------------------------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_varlen_matches_reference(kernels, lengths, dtype):
    _check(lengths, 2, 32, dtype)


@pytest.mark.parametrize(("headdim", "dtype"), [(16, FP32), (64, BF16), (40, FP16), (40, FP32)],
                         ids=lambda x: dtype_id(x) if isinstance(x, torch.dtype) else f"d{x}")
def test_varlen_head_dims(kernels, headdim, dtype):
    # 40 is not a power of two: the Triton kernels zero-pad it to 64.
    _check([7, 0, 20, 1], 2, headdim, dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_varlen_long_sequences_and_oversized_max_seqlen(kernels, dtype):
    # 129 and 70 tokens span several query and key tiles (the last one partial); max_seqlen beyond the longest
    # sequence sizes a grid whose extra blocks must do nothing.
    _check([70, 3, 129], 1, 16, dtype, max_seqlen=200)


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_varlen_large_scores(kernels, scale):
    _check([9, 4, 12], 2, 16, FP32, scale=scale)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_varlen_packed_qkv_views(kernels, dtype):
    # q, k, v as strided views of one (total, 3, H, D) projection, v also with a non-unit head-dim stride.
    lengths, h, d = [5, 0, 17, 1], 2, 32
    total, cu = sum(lengths), _cu(lengths)
    qkv = rand((total, 3, h, d), dtype)
    v_dh = rand((total, d, h), dtype)  # (total, D, H): v's head dim has stride H
    dout = rand((total, h, d), dtype)

    def run(contiguous):
        base = qkv.detach().clone().requires_grad_(True)
        vt = v_dh.detach().clone().requires_grad_(True)
        q, k, v = base[:, 0], base[:, 1], vt.transpose(1, 2)
        assert not (q.is_contiguous() or k.is_contiguous()) and v.stride(-1) != 1
        if contiguous:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = ops.varlen_attention(q, k, v, cu, max(lengths))
        out.backward(dout)
        return out.detach(), base.grad, vt.grad

    for name, strided, dense in zip(["out", "dqkv", "dv"], run(False), run(True), strict=True):
        assert_same(name, strided, dense)
    _check(lengths, h, d, dtype, qkv=(qkv[:, 0], qkv[:, 1], v_dh.transpose(1, 2)))


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_varlen_equals_padded_attention(backend, dtype):
    # The same sequences padded to (B, T, H, D) with a key padding mask through fastbert.ops.attention.
    lengths, h, d = [5, 0, 17, 1, 33], 2, 16
    b, t, total, cu = len(lengths), max(lengths), sum(lengths), _cu(lengths)
    real = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    q, k, v, dout = (rand((total, h, d), dtype) for _ in range(4))

    def pad(x):
        out = x.new_zeros((b, t, h, d))
        out[real] = x
        return out

    out, grads = fwd_bwd(lambda q, k, v: ops.varlen_attention(q, k, v, cu), dict(q=q, k=k, v=v), "qkv", dout)
    padded = dict(q=pad(q), k=pad(k), v=pad(v))
    out_p, grads_p = fwd_bwd(lambda q, k, v: ops.attention(q, k, v, real), padded, "qkv", pad(dout))
    assert_same("out", out, out_p[real])
    for name in "qkv":
        assert_same(f"d{name}", grads[name], grads_p[name][real])


# ----------------------------------------------------------------------------------------------------------------
# dropout


def _recover_dropout_masks(lengths, h, d, p, seed, max_seqlen=None, device="cpu"):
    """The op's dropout masks, one (H, L, L) float64 CPU tensor per sequence (0 or 1/(1-p)), recovered by running it
    with v = identity over each sequence's keys: out[token q, h, j] = P[h, q, j] * mask[h, q, j]."""
    assert d >= max(lengths)
    cu, total = _cu(lengths, device), sum(lengths)
    q, k = rand((total, h, d), FP32, device), rand((total, h, d), FP32, device)
    v = torch.zeros(total, h, d)
    for _, s, e in _spans(lengths):
        v[s:e, :, : e - s] = torch.eye(e - s)[:, None, :]
    max_seqlen = max(lengths) if max_seqlen is None else max_seqlen
    out, _ = torch.ops.fastbert.varlen_attention_fwd(q, k, v.to(device), cu, max_seqlen, p, d**-0.5, seed)
    out = out.cpu()
    masks = [(out[s:e, :, : e - s].permute(1, 0, 2) != 0).double() / (1.0 - p) for _, s, e in _spans(lengths)]
    masks_np = [m.numpy() for m in masks]
    ref, _ = varlen_attention_fwd_ref(to_np(q), to_np(k), to_np(v), cu.cpu().numpy(), dropout_masks=masks_np)
    np.testing.assert_allclose(to_np(out), ref, atol=1e-6, err_msg="kept probabilities are not scaled by 1/(1-p)")
    return masks


def test_varlen_dropout_is_consistent_in_forward_and_backward(kernels):
    # The mask depends on (sequence, head, query, key) only: recovered at head dim 64 in fp32, it must be the one
    # that the forward and backward use at head dim 16 (other tiles), in fp32 and bf16.
    lengths, h, p = [5, 0, 17, 1, 33], 2, 0.3
    seed = torch.tensor([2**40 + 17])  # beyond 32 bits: both Philox key words are used
    masks = _recover_dropout_masks(lengths, h, 64, p, seed)
    kept = torch.cat([m.flatten() for m in masks])
    dropped, sigma = float((kept == 0).double().mean()), math.sqrt(p * (1 - p) / kept.numel())
    assert abs(dropped - p) < 5 * sigma, f"dropped fraction {dropped:.4f}, expected {p} +- {5 * sigma:.4f}"
    for dtype in (FP32, BF16):
        _check(lengths, h, 16, dtype, dropout=(p, seed, masks))


def test_varlen_dropout_masks_differ_across_sequences_heads_and_seeds(kernels):
    lengths, h, d, p = [8, 8, 8], 2, 16, 0.5
    masks = _recover_dropout_masks(lengths, h, d, p, torch.tensor([7]))
    slices = [m[i].flatten() for m in masks for i in range(h)]
    for i, j in itertools.combinations(range(len(slices)), 2):
        assert not torch.equal(slices[i], slices[j]), f"(sequence, head) slices {i} and {j} drew the same mask"
    again = _recover_dropout_masks(lengths, h, d, p, torch.tensor([7]), max_seqlen=40)
    assert all(torch.equal(a, b) for a, b in zip(masks, again, strict=True)), "the mask changed with max_seqlen"
    other = _recover_dropout_masks(lengths, h, d, p, torch.tensor([8]))
    assert not any(torch.equal(a, b) for a, b in zip(masks, other, strict=True)), "another seed drew the same masks"


def test_varlen_dropout_is_reproducible_under_manual_seed(kernels):
    lengths = [6, 0, 11]
    cu, total = _cu(lengths), sum(lengths)
    q, k, v, dout = (rand((total, 2, 16), BF16) for _ in range(4))

    def run(seed):
        torch.manual_seed(seed)
        fn = lambda q, k, v: ops.varlen_attention(q, k, v, cu, dropout_p=0.5)  # noqa: E731
        return fwd_bwd(fn, dict(q=q, k=k, v=v), "qkv", dout)

    (out1, g1), (out2, g2), (out3, _) = run(7), run(7), run(8)
    assert torch.equal(out1, out2) and all(torch.equal(g1[n], g2[n]) for n in "qkv")
    assert not torch.equal(out1, out3), "a different seed must draw a different dropout mask"
    assert not torch.equal(out1, ops.varlen_attention(q, k, v, cu)), "dropout_p=0.5 changed nothing"


# ----------------------------------------------------------------------------------------------------------------
# triton specifics: fallback, grid split


@pytest.mark.skipif(not TRITON_CPU, reason="the triton backend is unavailable here")
@pytest.mark.parametrize(("headdim", "max_seqlen", "dropout_p"), [(160, None, 0.0), (16, 70_000, 0.2)])
def test_varlen_triton_falls_back_to_torch(monkeypatch, headdim, max_seqlen, dropout_p):
    # Head dims above 128 do not fit the tiles; dropout beyond 2^16 tokens per sequence would reuse Philox counters.
    from fastbert.ops.varlen_attention import triton as kernels

    calls = []

    def spy(name):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args: calls.append(name) or fn(*args))

    spy("_varlen_attention_fwd_torch")
    spy("_varlen_attention_bwd_torch")
    ops.set_backend("triton")
    lengths = [4, 0, 7]
    q, k, v = (rand((11, 1, headdim), FP32).requires_grad_(True) for _ in range(3))
    # check_offsets=False: a max_seqlen beyond the packed token count is refused when the offsets are read back
    out = ops.varlen_attention(q, k, v, _cu(lengths), max_seqlen, dropout_p, check_offsets=False)
    out.sum().backward()
    assert calls == ["_varlen_attention_fwd_torch", "_varlen_attention_bwd_torch"]
    assert torch.isfinite(q.grad).all() and out.shape == q.shape


@pytest.mark.skipif(not TRITON_CPU, reason="the triton backend is unavailable here")
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)  # fp32 skips the delta kernel (PRECISE): bf16 runs it
def test_varlen_triton_batch_head_grid_split(monkeypatch, dtype):
    # A grid limit of 3 splits 4 sequences * 2 heads into chunks 3, 3, 2: each program's sequence comes from the
    # absolute (sequence, head) index, and the delta kernel's (H, total) grid is split too.
    from fastbert.ops.attention import triton as attention_kernels

    monkeypatch.setattr(attention_kernels, "MAX_GRID_Y", 3)
    ops.set_backend("triton")
    _check([5, 0, 9, 2], 2, 16, dtype)


# ----------------------------------------------------------------------------------------------------------------
# custom-op contract: opcheck and torch.compile


def _opcheck_cases():
    lengths, h, d = [3, 0, 5], 2, 16
    for name, dtype, p, seed in [("plain", FP32, 0.0, None), ("dropout", FP32, 0.2, torch.tensor([5])),
                                 ("bf16", BF16, 0.0, None)]:
        q, k, v = (rand((sum(lengths), h, d), dtype).requires_grad_(True) for _ in range(3))
        yield pytest.param((q, k, v, _cu(lengths), max(lengths), p, d**-0.5, seed), id=name)


@pytest.mark.parametrize("args", list(_opcheck_cases()))
def test_varlen_opcheck(args):
    ops.set_backend("torch")
    torch.library.opcheck(torch.ops.fastbert.varlen_attention_fwd.default, args)
    q, k, v, cu, max_seqlen, p, scale, seed = args
    with torch.no_grad():
        out, lse = torch.ops.fastbert.varlen_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, max_seqlen, p, scale, seed)
    torch.library.opcheck(torch.ops.fastbert.varlen_attention_bwd.default, bwd_args)


def test_varlen_torch_compile_fullgraph(kernels):
    lengths = [5, 0, 7]
    cu, total = _cu(lengths), sum(lengths)
    q, k, v, dout = (rand((total, 2, 16), FP32) for _ in range(4))

    def block(q, k, v):
        return ops.varlen_attention(q * 2.0, k, v, cu, max_seqlen=7).relu()

    compiled = torch.compile(block, fullgraph=True)
    eager_out, eager_grads = fwd_bwd(block, dict(q=q, k=k, v=v), "qkv", dout)
    out, grads = fwd_bwd(compiled, dict(q=q, k=k, v=v), "qkv", dout)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name in "qkv":
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# argument validation

_Q = rand((12, 2, 16), FP32)
_CU = _cu([5, 0, 7])
BAD_ARGS = [
    ("cu_seqlens float", dict(cu_seqlens=_CU.float()), TypeError, "cu_seqlens has dtype"),
    ("cu_seqlens list", dict(cu_seqlens=[0, 5, 12]), TypeError, "cu_seqlens must be a torch.Tensor"),
    ("cu_seqlens 2-D", dict(cu_seqlens=_CU[None]), ValueError, "cu_seqlens must be 1-D"),
    ("cu_seqlens device", dict(cu_seqlens=_CU.to("meta")), ValueError, "cu_seqlens is on meta"),
    ("cu_seqlens decreasing", dict(cu_seqlens=_cu([7, -2, 7])), ValueError, "cu_seqlens must rise"),
    ("cu_seqlens short of total", dict(cu_seqlens=_cu([5, 5])), ValueError, r"cu_seqlens .*packed tokens \(12\)"),
    ("cu_seqlens past total", dict(cu_seqlens=_cu([5, 9])), ValueError, r"cu_seqlens .*packed tokens \(12\)"),
    ("cu_seqlens not from 0", dict(cu_seqlens=torch.tensor([2, 5, 12], dtype=torch.int32)), ValueError,
     "cu_seqlens must rise from 0"),
    ("max_seqlen too small", dict(max_seqlen=6), ValueError, "max_seqlen=6 is shorter than the longest"),
    ("q 4-D", dict(q=_Q[None]), ValueError, "q must have 3 dimensions"),
    ("k dtype", dict(k=_Q.half()), TypeError, "k has dtype"),
    ("k tokens", dict(k=_Q[:10]), ValueError, r"q \(12, 2, 16\), k \(10, 2, 16\)"),
    ("v heads", dict(v=_Q[:, :1]), ValueError, r"and v \(12, 1, 16\) must all be"),
    ("dropout above 1", dict(dropout_p=1.5), ValueError, "dropout_p"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale must be a finite float"),
    ("headdim 0", dict(q=_Q[..., :0], k=_Q[..., :0], v=_Q[..., :0]), ValueError, "headdim must be >= 1"),
]


@pytest.mark.parametrize(("kwargs", "exc", "message"), [pytest.param(*case[1:], id=case[0]) for case in BAD_ARGS])
def test_varlen_rejects_bad_arguments(kwargs, exc, message):
    args = dict(q=_Q, k=_Q, v=_Q, cu_seqlens=_CU) | kwargs
    with pytest.raises(exc, match=message):
        ops.varlen_attention(**args)


# ----------------------------------------------------------------------------------------------------------------
# CUDA at real sizes

# BERT pretraining-like batch: 32 sequences of 32 to 512 tokens (fixed draw), 12 heads, head dim 64.
REAL_LENGTHS = torch.randint(32, 513, (32,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_varlen_cuda_real_size(cuda_backend, dtype):
    _check(REAL_LENGTHS, 12, 64, dtype, device="cuda")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_varlen_cuda_against_sdpa_on_padded_input(cuda_backend, dtype):
    # The rule with torch's fused SDPA on the same sequences padded (a key padding mask) as the same-dtype baseline.
    lengths = REAL_LENGTHS
    b, t = len(lengths), max(lengths)
    real = torch.arange(t, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]

    def sdpa(q, k, v):
        padded = []
        for x in (q, k, v):
            x_pad = x.new_zeros((b, t, *x.shape[1:]))
            x_pad[real] = x
            padded.append(x_pad.transpose(1, 2))
        out = F.scaled_dot_product_attention(*padded, attn_mask=real[:, None, None, :])
        return out.transpose(1, 2)[real]

    _check(lengths, 12, 64, dtype, device="cuda", baseline=sdpa)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize(("lengths", "headdim", "dtype"), [([2049, 0, 1000, 1], 128, BF16), ([777, 3, 513], 80, FP16),
                                                           ([257, 130, 1], 64, FP32)])
def test_varlen_cuda_long_ragged(cuda_backend, lengths, headdim, dtype):
    _check(lengths, 3, headdim, dtype, device="cuda")


@pytest.mark.cuda
@requires_cuda
def test_varlen_cuda_dropout_is_consistent_in_forward_and_backward(cuda_backend):
    lengths, h, p = [100, 128, 7, 0, 64], 4, 0.1
    seed = torch.tensor([2**40 + 3])
    masks = _recover_dropout_masks(lengths, h, 128, p, seed, device="cuda")
    for dtype, d in ((FP32, 64), (BF16, 64), (FP16, 128)):
        _check(lengths, h, d, dtype, device="cuda", dropout=(p, seed, masks))
