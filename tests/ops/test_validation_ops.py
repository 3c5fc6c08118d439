"""Bad arguments to every public op (fastbert.ops): each raises a TypeError / ValueError whose message names the
argument, before any kernel runs (never a crash, a device-side assert or a silent NaN). Empty inputs are valid and
give empty or zero outputs on every backend. docs/ROBUSTNESS.md tabulates these cases; the counts there come from
the tables below (``python -m pytest tests/ops/test_validation_ops.py -q`` runs them)."""

import pytest
import torch
from _ops_helpers import FP32, rand

import fastbert.ops as ops

META = torch.device("meta")  # a second device on any machine: device mismatches are testable without a GPU

_Q = rand((2, 5, 2, 8), FP32)
_MASK = torch.ones(2, 5, dtype=torch.bool)
_X = rand((3, 8), FP32)
_W = rand((8,), FP32)
_S = rand((2, 2, 3, 5), FP32)
_CU = torch.tensor([0, 2, 5], dtype=torch.int32)
_P = rand((5, 2, 8), FP32)

# (case id, op, kwargs overriding the op's good arguments, exception, the argument the message must name)
ATTENTION = [
    ("q not a tensor", dict(q=_Q.tolist()), TypeError, "q"),
    ("q 3-D", dict(q=_Q[0]), ValueError, "q"),
    ("q float64", dict(q=_Q.double(), k=_Q.double(), v=_Q.double()), TypeError, "q"),
    ("q int32", dict(q=_Q.int(), k=_Q.int(), v=_Q.int()), TypeError, "q"),
    ("k dtype differs", dict(k=_Q.half()), TypeError, "k"),
    ("v dtype differs", dict(v=_Q.bfloat16()), TypeError, "v"),
    ("k on another device", dict(k=_Q.to(META)), ValueError, "k"),
    ("k batch differs", dict(k=_Q[:1], v=_Q[:1]), ValueError, "k"),
    ("k heads differ", dict(k=_Q[:, :, :1], v=_Q[:, :, :1]), ValueError, "k"),
    ("k headdim differs", dict(k=_Q[..., :4], v=_Q[..., :4]), ValueError, "k"),
    ("v shape differs from k", dict(v=_Q[:, :4]), ValueError, "v"),
    ("headdim 0", dict(q=_Q[..., :0], k=_Q[..., :0], v=_Q[..., :0]), ValueError, "headdim"),
    ("mask not a tensor", dict(key_padding_mask=_MASK.tolist()), TypeError, "key_padding_mask"),
    ("mask 1-D", dict(key_padding_mask=_MASK[0]), ValueError, "key_padding_mask"),
    ("mask 3-D (B, Tq, Tk)", dict(key_padding_mask=_MASK[:, None].expand(2, 5, 5)), ValueError, "key_padding_mask"),
    ("mask batch differs", dict(key_padding_mask=_MASK[:1]), ValueError, "key_padding_mask"),
    ("mask length differs", dict(key_padding_mask=_MASK[:, :4]), ValueError, "key_padding_mask"),
    ("mask on another device", dict(key_padding_mask=_MASK.to(META)), ValueError, "key_padding_mask"),
    ("dropout_p above 1", dict(dropout_p=1.01), ValueError, "dropout_p"),
    ("dropout_p negative", dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout_p NaN", dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    ("dropout_p a string", dict(dropout_p="0.1"), TypeError, "dropout_p"),
    ("scale NaN", dict(scale=float("nan")), ValueError, "scale"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale"),
    ("scale a tensor of 2", dict(scale=torch.ones(2)), TypeError, "scale"),
]

LAYER_NORM = [
    ("x not a tensor", dict(x=_X.tolist()), TypeError, "x"),
    ("x 0-dim", dict(x=_X[0, 0], residual=None, weight=_W[:1], bias=None), ValueError, "x"),
    ("x float64", dict(x=_X.double(), residual=None), TypeError, "x"),
    ("x int64", dict(x=_X.long(), residual=None), TypeError, "x"),
    ("x hidden 0", dict(x=_X[:, :0], residual=None, weight=_W[:0], bias=None), ValueError, "x"),
    ("residual dtype differs", dict(residual=_X.half()), TypeError, "residual"),
    ("residual shape differs", dict(residual=_X[:2]), ValueError, "residual"),
    ("residual on another device", dict(residual=_X.to(META)), ValueError, "residual"),
    ("weight None", dict(weight=None), TypeError, "weight"),
    ("weight too short", dict(weight=_W[:7]), ValueError, "weight"),
    ("weight 2-D", dict(weight=_W[None]), ValueError, "weight"),
    ("weight float64", dict(weight=_W.double()), TypeError, "weight"),
    ("weight on another device", dict(weight=_W.to(META)), ValueError, "weight"),
    ("bias too long", dict(bias=torch.ones(9)), ValueError, "bias"),
    ("eps 0", dict(eps=0.0), ValueError, "eps"),
    ("eps negative", dict(eps=-1e-5), ValueError, "eps"),
    ("eps NaN", dict(eps=float("nan")), ValueError, "eps"),
    ("eps inf", dict(eps=float("inf")), ValueError, "eps"),
    ("eps None", dict(eps=None), TypeError, "eps"),
    ("dropout_p 1.5", dict(dropout_p=1.5), ValueError, "dropout_p"),
]

BIAS_GELU = [
    ("x not a tensor", dict(x=_X.tolist()), TypeError, "x"),
    ("x float64", dict(x=_X.double(), bias=None), TypeError, "x"),
    ("x 0-dim", dict(x=_X[0, 0], bias=None), ValueError, "x"),
    ("x hidden 0", dict(x=_X[:, :0], bias=None), ValueError, "x"),
    ("bias too short", dict(bias=_W[:3]), ValueError, "bias"),
    ("bias 2-D", dict(bias=_W[None]), ValueError, "bias"),
    ("bias int", dict(bias=_W.int()), TypeError, "bias"),
    ("bias on another device", dict(bias=_W.to(META)), ValueError, "bias"),
    ("approximate 'erf'", dict(approximate="erf"), ValueError, "approximate"),
]

BIAS_GELU_LAYER_NORM = [
    ("x float64", dict(x=_X.double()), TypeError, "x"),
    ("weight None", dict(weight=None), TypeError, "weight"),
    ("weight too short", dict(weight=_W[:3]), ValueError, "weight"),
    ("ln_bias too short", dict(ln_bias=_W[:3]), ValueError, "ln_bias"),
    ("ln_bias on another device", dict(ln_bias=_W.to(META)), ValueError, "ln_bias"),
    ("eps 0", dict(eps=0.0), ValueError, "eps"),
    ("eps NaN", dict(eps=float("nan")), ValueError, "eps"),
    ("approximate 'exact'", dict(approximate="exact"), ValueError, "approximate"),
]

SOFTMAX = [
    ("scores not a tensor", dict(scores=_S.tolist()), TypeError, "scores"),
    ("scores 3-D", dict(scores=_S[0]), ValueError, "scores"),
    ("scores float64", dict(scores=_S.double()), TypeError, "scores"),
    ("mask 1-D", dict(key_padding_mask=_MASK[0]), ValueError, "key_padding_mask"),
    ("mask length differs", dict(key_padding_mask=_MASK[:, :4]), ValueError, "key_padding_mask"),
    ("mask on another device", dict(key_padding_mask=_MASK.to(META)), ValueError, "key_padding_mask"),
    ("scale NaN", dict(scale=float("nan")), ValueError, "scale"),
    ("scale -inf", dict(scale=float("-inf")), ValueError, "scale"),
]

VARLEN_ATTENTION = [
    ("q 4-D", dict(q=_P[None]), ValueError, "q"),
    ("q float64", dict(q=_P.double(), k=_P.double(), v=_P.double()), TypeError, "q"),
    ("k dtype differs", dict(k=_P.half()), TypeError, "k"),
    ("k tokens differ", dict(k=_P[:4]), ValueError, "k"),
    ("cu_seqlens not a tensor", dict(cu_seqlens=[0, 2, 5]), TypeError, "cu_seqlens"),
    ("cu_seqlens float", dict(cu_seqlens=_CU.float()), TypeError, "cu_seqlens"),
    ("cu_seqlens 2-D", dict(cu_seqlens=_CU[None]), ValueError, "cu_seqlens"),
    ("cu_seqlens not from 0", dict(cu_seqlens=torch.tensor([1, 2, 5], dtype=torch.int32)), ValueError, "cu_seqlens"),
    ("cu_seqlens short of the tokens", dict(cu_seqlens=_CU[:2]), ValueError, "cu_seqlens"),
    ("cu_seqlens decreasing", dict(cu_seqlens=torch.tensor([0, 4, 3, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens on another device", dict(cu_seqlens=_CU.to(META)), ValueError, "cu_seqlens"),
    ("max_seqlen below the longest", dict(max_seqlen=2), ValueError, "max_seqlen"),
    ("max_seqlen a string", dict(max_seqlen="seven"), TypeError, "max_seqlen must be an int"),
    ("max_seqlen a float", dict(max_seqlen=3.0), TypeError, "max_seqlen must be an int"),
    ("dropout_p above 1", dict(dropout_p=1.01), ValueError, "dropout_p"),
]


def _call(op, kwargs):
    good = {
        "attention": dict(q=_Q, k=_Q, v=_Q),
        "add_layer_norm": dict(x=_X, residual=_X, weight=_W, bias=_W),
        "bias_gelu": dict(x=_X, bias=_W),
        "bias_gelu_layer_norm": dict(x=_X, bias=_W, weight=_W, ln_bias=_W),
        "softmax": dict(scores=_S),
        "varlen_attention": dict(q=_P, k=_P, v=_P, cu_seqlens=_CU),
    }[op]
    return getattr(ops, op)(**(good | kwargs))


TABLES = {
    "attention": ATTENTION,
    "add_layer_norm": LAYER_NORM,
    "bias_gelu": BIAS_GELU,
    "bias_gelu_layer_norm": BIAS_GELU_LAYER_NORM,
    "softmax": SOFTMAX,
    "varlen_attention": VARLEN_ATTENTION,
}
CASES = [pytest.param(op, *case[1:], id=f"{op}: {case[0]}") for op, table in TABLES.items() for case in table]


@pytest.mark.parametrize(("op", "kwargs", "error", "argument"), CASES)
def test_bad_argument_is_refused_naming_it(op, kwargs, error, argument):
    with pytest.raises(error) as info:
        _call(op, kwargs)
    assert argument in str(info.value), f"the message does not name {argument!r}: {info.value}"


def test_the_good_arguments_run():
    # The tables override these one argument at a time: they must themselves be accepted.
    for op in TABLES:
        out = _call(op, {})
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------
# empty inputs: valid, on every backend


@pytest.mark.parametrize(
    ("q_shape", "k_shape"),
    [((0, 5, 2, 8), (0, 5, 2, 8)), ((2, 0, 2, 8), (2, 0, 2, 8)), ((2, 3, 2, 8), (2, 0, 2, 8)),
     ((2, 0, 2, 8), (2, 4, 2, 8)), ((2, 5, 0, 8), (2, 5, 0, 8))],
    ids=["batch 0", "seqlen 0", "no keys", "no queries", "heads 0"],
)
def test_attention_on_empty_inputs(backend, q_shape, k_shape):
    # PyTorch's CPU flash kernel dies with SIGFPE on zero-length sequences: the op must answer before it.
    q = rand(q_shape, FP32).requires_grad_(True)
    k, v = rand(k_shape, FP32).requires_grad_(True), rand(k_shape, FP32).requires_grad_(True)
    mask = torch.ones(k_shape[:2], dtype=torch.bool)
    out = ops.attention(q, k, v, mask)
    assert out.shape == q_shape and torch.count_nonzero(out) == 0  # no key to attend to: zeros, as a masked row
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("shape", [(0, 8), (0, 3, 8), (2, 0, 8)], ids=["rows 0", "batch 0", "seqlen 0"])
def test_row_ops_on_empty_inputs(backend, shape):
    x = rand(shape, FP32).requires_grad_(True)
    w = rand(shape[-1:], FP32).requires_grad_(True)
    for out in (ops.layer_norm(x, w, w), ops.add_layer_norm(x, x, w, w), ops.bias_gelu(x, w),
                ops.bias_gelu_layer_norm(x, w, w, w)):
        assert out.shape == x.shape
        out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("shape", [(0, 2, 3, 5), (2, 2, 0, 5), (2, 2, 3, 0)], ids=["batch 0", "no queries", "no keys"])
def test_softmax_on_empty_inputs(backend, shape):
    scores = rand(shape, FP32).requires_grad_(True)
    probs = ops.softmax(scores, torch.ones(shape[0], shape[3], dtype=torch.bool))
    assert probs.shape == shape
    probs.sum().backward()
    assert scores.grad.shape == shape


def test_varlen_attention_with_empty_sequences(backend):
    q = rand((5, 2, 8), FP32).requires_grad_(True)
    cu = torch.tensor([0, 0, 2, 2, 5, 5], dtype=torch.int32)  # empty sequences first, between and last
    out = ops.varlen_attention(q, q, q, cu)
    assert out.shape == q.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
