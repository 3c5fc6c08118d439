"""Triton-specific cases for the row / pointwise kernels (ops/{layer_norm,bias_gelu,softmax}/triton.py).

The per-op suites already run every available backend; this file covers what is particular to the Triton kernels:
odd widths around their power-of-two blocks, single rows, parameters in another dtype than the activations (as
under autocast), the Philox dropout mask (reproducible, identical in forward and backward, independent of the
tiling), bitwise-deterministic dweight/dbias from per-program partial sums, the looped softmax for long rows and
the torch fallback for rows too long for registers. They run where the triton backend runs: CPU tensors through
the interpreter (TRITON_INTERPRET=1, small sizes) or CUDA; the BERT-size cases are CUDA only.
"""

import importlib

import pytest
import torch
from _ops_helpers import (
    BF16,
    FP32,
    add_layer_norm_baseline,
    assert_matches_ref,
    bias_gelu_baseline,
    bias_gelu_layer_norm_baseline,
    dtype_id,
    fwd_bwd,
    padding_mask,
    rand,
    requires_cuda,
    softmax_baseline,
    to_np,
)

import fastbert.ops as ops
from fastbert.reference import (
    bias_gelu_bwd_ref,
    bias_gelu_fwd_ref,
    bias_gelu_layer_norm_bwd_ref,
    bias_gelu_layer_norm_fwd_ref,
    layer_norm_bwd_ref,
    layer_norm_fwd_ref,
    softmax_bwd_ref,
    softmax_fwd_ref,
)

CPU_OK = ops.backends("cpu")["triton"].available
CUDA_OK = torch.cuda.is_available() and ops.backends("cuda")["triton"].available
pytestmark = pytest.mark.skipif(not (CPU_OK or CUDA_OK), reason="the triton backend is unavailable here")
DEVICE = "cpu" if CPU_OK else "cuda"  # the small cases run wherever Triton runs
requires_cuda_triton = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU with Triton")

WIDTHS = [1, 33, 768, 1000, 4097]  # below / at / above power-of-two blocks; 4097 > 1024-column elementwise tiles
LN_NAMES = ("x", "residual", "weight", "bias")
BGLN_NAMES = ("x", "bias", "weight", "ln_bias")
XB = ("x", "bias")


def _kernels(op):
    return importlib.import_module(f"fastbert.ops.{op}.triton")


@pytest.fixture(autouse=True)
def _triton_backend():
    ops.set_backend("triton")
    yield
    ops.set_backend(None)


# ----------------------------------------------------------------------------------------------------------------
# checks against the float64 reference (the accuracy rule of _ops_helpers)


def _check_add_layer_norm(shape, dtype, param_dtype=None, residual=True, bias=True, eps=1e-5, device=DEVICE):
    n = shape[-1]
    param_dtype = param_dtype or dtype
    args = {
        "x": rand(shape, dtype, device),
        "residual": rand(shape, dtype, device) if residual else None,
        "weight": rand((n,), param_dtype, device, scale=0.5, offset=1.0),
        "bias": rand((n,), param_dtype, device) if bias else None,
    }
    dout = rand(shape, dtype, device)
    names = [k for k in LN_NAMES if args[k] is not None]
    out, grads = fwd_bwd(lambda **a: ops.add_layer_norm(**a, eps=eps), args, names, dout)
    same = {k: None if v is None else v.to(dtype) for k, v in args.items()}  # the baseline runs in one dtype
    base_out, base_grads = fwd_bwd(lambda **a: add_layer_norm_baseline(**a, eps=eps), same, names, dout)
    np_args = [to_np(args[k]) for k in LN_NAMES]
    ref_grads = dict(zip(LN_NAMES, layer_norm_bwd_ref(to_np(dout), *np_args, eps), strict=True))
    assert out.dtype == dtype
    assert_matches_ref("out", out, layer_norm_fwd_ref(*np_args, eps)[0], base_out, dtype)
    for k in names:
        assert grads[k].dtype == args[k].dtype, f"d{k} has dtype {grads[k].dtype}, {k} has {args[k].dtype}"
        assert_matches_ref(f"d{k}", grads[k], ref_grads[k], base_grads[k], dtype)


def _check_bias_gelu(shape, dtype, approximate, param_dtype=None, device=DEVICE):
    x, dout = rand(shape, dtype, device, scale=2.0), rand(shape, dtype, device)
    bias = rand(shape[-1:], param_dtype or dtype, device)
    out, grads = fwd_bwd(lambda x, bias: ops.bias_gelu(x, bias, approximate), {"x": x, "bias": bias}, XB, dout)
    same = {"x": x, "bias": bias.to(dtype)}
    base_out, base_grads = fwd_bwd(lambda x, bias: bias_gelu_baseline(x, bias, approximate), same, XB, dout)
    ref_dx, ref_dbias = bias_gelu_bwd_ref(to_np(dout), to_np(x), to_np(bias), approximate)
    assert out.dtype == dtype and grads["x"].dtype == dtype and grads["bias"].dtype == bias.dtype
    assert_matches_ref("out", out, bias_gelu_fwd_ref(to_np(x), to_np(bias), approximate), base_out, dtype)
    assert_matches_ref("dx", grads["x"], ref_dx, base_grads["x"], dtype)
    assert_matches_ref("dbias", grads["bias"], ref_dbias, base_grads["bias"], dtype)


def _check_bias_gelu_layer_norm(shape, dtype, approximate, param_dtype=None, device=DEVICE, eps=1e-5):
    n, param_dtype = shape[-1], param_dtype or dtype
    args = {
        "x": rand(shape, dtype, device, scale=2.0),
        "bias": rand((n,), param_dtype, device),
        "weight": rand((n,), param_dtype, device, scale=0.5, offset=1.0),
        "ln_bias": rand((n,), param_dtype, device),
    }
    dout = rand(shape, dtype, device)

    def run(**a):
        return ops.bias_gelu_layer_norm(**a, eps=eps, approximate=approximate)

    def baseline(**a):
        return bias_gelu_layer_norm_baseline(**a, eps=eps, approximate=approximate)

    out, grads = fwd_bwd(run, args, BGLN_NAMES, dout)
    base_out, base_grads = fwd_bwd(baseline, {k: v.to(dtype) for k, v in args.items()}, BGLN_NAMES, dout)
    np_args = [to_np(args[k]) for k in BGLN_NAMES]
    ref_out = bias_gelu_layer_norm_fwd_ref(*np_args, eps, approximate)[0]
    ref_grads = bias_gelu_layer_norm_bwd_ref(to_np(dout), *np_args, eps, approximate)
    ref_grads = dict(zip(BGLN_NAMES, ref_grads, strict=True))
    assert out.dtype == dtype
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    for k in BGLN_NAMES:
        assert grads[k].dtype == args[k].dtype
        assert_matches_ref(f"d{k}", grads[k], ref_grads[k], base_grads[k], dtype)


def _check_softmax(shape, mask_kind, dtype, scale=0.3, device=DEVICE):
    scores, dout = rand(shape, dtype, device, scale=4.0), rand(shape, dtype, device)
    mask = padding_mask(mask_kind, shape[0], shape[3], device)
    args = {"scores": scores}
    probs, grads = fwd_bwd(lambda scores: ops.softmax(scores, mask, scale), args, ["scores"], dout)
    base, base_grads = fwd_bwd(lambda scores: softmax_baseline(scores, mask, scale), args, ["scores"], dout)
    ref = softmax_fwd_ref(to_np(scores), None if mask is None else mask.cpu().numpy(), scale)
    assert_matches_ref("probs", probs, ref, base, dtype)
    ref_grad = softmax_bwd_ref(to_np(dout), ref, scale)
    assert_matches_ref("dscores", grads["scores"], ref_grad, base_grads["scores"], dtype)


# ----------------------------------------------------------------------------------------------------------------
# odd widths, single rows


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("rows", [1, 3], ids=["one_row", "three_rows"])
@pytest.mark.parametrize("width", WIDTHS)
def test_add_layer_norm_odd_widths(width, rows, dtype):
    # width 1: z - mean is exactly 0, so out = bias and every gradient but dbias is exactly 0 (no 1/sqrt(eps) blowup).
    _check_add_layer_norm((rows, width), dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("rows", [1, 3], ids=["one_row", "three_rows"])
@pytest.mark.parametrize("width", WIDTHS)
def test_bias_gelu_odd_widths(width, rows, dtype, approximate):
    _check_bias_gelu((rows, width), dtype, approximate)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("width", WIDTHS)
def test_bias_gelu_layer_norm_odd_widths(width, dtype):
    _check_bias_gelu_layer_norm((2, width), dtype, "tanh" if width % 2 else "none")


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("width", WIDTHS)
def test_softmax_odd_widths(width, dtype):
    _check_softmax((2, 2, 3, width), "partial", dtype)


# ----------------------------------------------------------------------------------------------------------------
# parameters in fp32 with half activations (what autocast hands the ops)


@pytest.mark.parametrize("act_dtype", [BF16, torch.float16], ids=dtype_id)
def test_mixed_dtypes_fp32_params(act_dtype):
    _check_add_layer_norm((5, 96), act_dtype, param_dtype=FP32)
    _check_add_layer_norm((5, 96), act_dtype, param_dtype=FP32, residual=False, bias=False)
    _check_bias_gelu((5, 96), act_dtype, "none", param_dtype=FP32)
    _check_bias_gelu_layer_norm((5, 96), act_dtype, "none", param_dtype=FP32)


# ----------------------------------------------------------------------------------------------------------------
# dropout: Philox mask keyed by (seed, row, column)


def _ln_dropout(x, residual, weight, bias, p, seed):
    return torch.ops.fastbert.add_layer_norm_fwd(x, residual, weight, bias, 1e-5, p, torch.tensor([seed]))[0]


def _ln_inputs(shape, dtype=FP32, device=DEVICE):
    n = shape[-1]
    return {
        "x": rand(shape, dtype, device),
        "residual": rand(shape, dtype, device),
        "weight": rand((n,), dtype, device, offset=1.0),
        "bias": rand((n,), dtype, device),
    }


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
def test_dropout_same_seed_same_result_and_gradients(dtype):
    args, dout = _ln_inputs((6, 40), dtype), rand((6, 40), dtype, DEVICE)
    run1 = fwd_bwd(lambda **a: _ln_dropout(**a, p=0.3, seed=11), args, LN_NAMES, dout)
    run2 = fwd_bwd(lambda **a: _ln_dropout(**a, p=0.3, seed=11), args, LN_NAMES, dout)
    other = _ln_dropout(**args, p=0.3, seed=12)
    assert torch.equal(run1[0], run2[0])
    for k in LN_NAMES:
        assert torch.equal(run1[1][k], run2[1][k]), f"d{k} differs between two runs with the same seed"
    assert not torch.equal(run1[0], other), "another seed must draw another mask"


def test_dropout_mask_depends_only_on_seed_row_and_column(monkeypatch):
    # Fewer rows (another ROWS per tile) and a smaller tile budget change the tiling, never the mask.
    args = _ln_inputs((40, 33))
    full = _ln_dropout(**args, p=0.5, seed=2**40 + 3)
    head = _ln_dropout(**{**args, "x": args["x"][:5], "residual": args["residual"][:5]}, p=0.5, seed=2**40 + 3)
    assert torch.equal(full[:5], head)
    monkeypatch.setattr(_kernels("layer_norm"), "_TILE_ELEMS", 64)
    assert torch.equal(_ln_dropout(**args, p=0.5, seed=2**40 + 3), full)


@pytest.mark.parametrize("shape", [(64, 65), (3, 768)], ids=str)
def test_dropout_backward_uses_the_forward_mask(shape):
    # dx = dz * mask / (1 - p) with dz almost surely nonzero: its zeros are the dropped elements. The forward must
    # equal the reference LayerNorm evaluated with exactly that mask, and so must every gradient.
    p, args, dout = 0.25, _ln_inputs(shape), rand(shape, FP32, DEVICE)
    out, grads = fwd_bwd(lambda **a: _ln_dropout(**a, p=p, seed=777), args, LN_NAMES, dout)
    mask = (grads["x"] != 0).to(FP32) / (1.0 - p)
    base_out, base_grads = fwd_bwd(
        lambda **a: add_layer_norm_baseline(**a, eps=1e-5, dropout_mask=mask), args, LN_NAMES, dout
    )
    np_args = [to_np(args[k]) for k in LN_NAMES]
    assert_matches_ref("out", out, layer_norm_fwd_ref(*np_args, 1e-5, dropout_mask=to_np(mask))[0], base_out, FP32)
    ref_grads = layer_norm_bwd_ref(to_np(dout), *np_args, 1e-5, dropout_mask=to_np(mask))
    for k, ref in zip(LN_NAMES, ref_grads, strict=True):
        assert_matches_ref(f"d{k}", grads[k], ref, base_grads[k], FP32)


def test_dropout_rate_per_column_phase_and_row():
    # Four adjacent columns share one Philox call (one word each): every phase must drop at rate p, rows must differ.
    shape, p = (128, 256), 0.3
    args = _ln_inputs(shape)
    args["x"] = torch.ones(shape, device=DEVICE)  # dz = dout-driven; dx's zeros are the drops
    x = args["x"].clone().requires_grad_(True)
    _ln_dropout(x, args["residual"], args["weight"], args["bias"], p, 5).backward(rand(shape, FP32, DEVICE))
    dropped = (x.grad == 0).cpu()
    sigma = (p * (1 - p) / (dropped.numel() / 4)) ** 0.5
    for phase in range(4):
        rate = dropped[:, phase::4].double().mean().item()
        assert abs(rate - p) < 5 * sigma, f"column phase {phase}: dropped {rate:.4f}, expected {p} +- {5 * sigma:.4f}"
    assert not any(torch.equal(dropped[r], dropped[r + 1]) for r in range(shape[0] - 1)), "two rows share a mask"


# ----------------------------------------------------------------------------------------------------------------
# dweight / dbias from per-program partial sums: bitwise deterministic, correct across many programs


def test_partial_sums_span_many_programs_and_tiles():
    if DEVICE != "cpu":
        pytest.skip("on a GPU the program count follows the SM count")
    ln = _kernels("layer_norm")
    rows, _, num_warps = ln.row_tile(1200, 33, ln._BWD_TILE_ELEMS)
    programs, per_program = ln.partial_programs(-(-1200 // rows), num_warps, torch.device(DEVICE))
    assert programs > 1 and per_program > 1, "the determinism tests below would not exercise the row loop"


@pytest.mark.parametrize("shape", [(1200, 33), (40, 768)], ids=str)
def test_layer_norm_dweight_dbias_deterministic(shape):
    args, dout = _ln_inputs(shape), rand(shape, FP32, DEVICE)
    first = fwd_bwd(lambda **a: ops.add_layer_norm(**a, eps=1e-5), args, LN_NAMES, dout)[1]
    second = fwd_bwd(lambda **a: ops.add_layer_norm(**a, eps=1e-5), args, LN_NAMES, dout)[1]
    for k in ("weight", "bias"):
        assert torch.equal(first[k], second[k]), f"d{k} is not bitwise reproducible"
    _check_add_layer_norm(shape, FP32)


@pytest.mark.parametrize("shape", [(1200, 33), (40, 768)], ids=str)
def test_bias_gelu_layer_norm_dweight_deterministic(shape):
    args = {"x": rand(shape, FP32, DEVICE), "bias": rand(shape[-1:], FP32, DEVICE)}
    args |= {"weight": rand(shape[-1:], FP32, DEVICE, offset=1.0), "ln_bias": rand(shape[-1:], FP32, DEVICE)}
    dout = rand(shape, FP32, DEVICE)
    runs = [fwd_bwd(lambda **a: ops.bias_gelu_layer_norm(**a, eps=1e-5), args, BGLN_NAMES, dout)[1] for _ in "ab"]
    for k in BGLN_NAMES:
        assert torch.equal(runs[0][k], runs[1][k]), f"d{k} is not bitwise reproducible"
    _check_bias_gelu_layer_norm(shape, FP32, "none")


# ----------------------------------------------------------------------------------------------------------------
# long rows: looped softmax, torch fallback for LayerNorm rows beyond registers


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "partial", "empty"])
def test_softmax_rows_longer_than_a_block(monkeypatch, mask_kind, dtype):
    monkeypatch.setattr(_kernels("softmax"), "_MAX_BLOCK_N", 16)  # 37 and 100 keys: 3 and 7 chunks
    _check_softmax((3, 2, 3, 37), mask_kind, dtype)
    _check_softmax((2, 1, 2, 100), mask_kind, dtype, scale=3.0)


def test_layer_norm_rows_beyond_registers_fall_back_to_torch(monkeypatch):
    monkeypatch.setattr(_kernels("layer_norm"), "_MAX_FUSED_N", 32)
    monkeypatch.setattr(_kernels("bias_gelu"), "_MAX_FUSED_N", 32)
    args, dout = _ln_inputs((4, 33)), rand((4, 33), FP32, DEVICE)
    gl_args = {"x": args["x"], "bias": args["bias"], "weight": args["weight"], "ln_bias": args["bias"]}
    results = {}
    for backend in ("triton", "torch"):
        ops.set_backend(backend)
        results[backend] = [
            fwd_bwd(lambda **a: ops.add_layer_norm(**a, dropout_p=0.0), args, LN_NAMES, dout),
            fwd_bwd(lambda **a: ops.bias_gelu_layer_norm(**a), gl_args, BGLN_NAMES, dout),
        ]
    for (out_t, grads_t), (out_r, grads_r) in zip(results["triton"], results["torch"], strict=True):
        assert torch.equal(out_t, out_r)
        assert all(torch.equal(grads_t[k], grads_r[k]) for k in grads_t)


# ----------------------------------------------------------------------------------------------------------------
# CUDA at BERT-base sizes


@pytest.mark.cuda
@requires_cuda
@requires_cuda_triton
def test_cuda_real_size_add_layer_norm_bf16():
    _check_add_layer_norm((16384, 768), BF16, param_dtype=FP32, eps=1e-12, device="cuda")
    args, dout = _ln_inputs((16384, 768), BF16, "cuda"), rand((16384, 768), BF16, "cuda")
    runs = [fwd_bwd(lambda **a: _ln_dropout(**a, p=0.1, seed=99), args, LN_NAMES, dout) for _ in "ab"]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in LN_NAMES), "dropout backward not reproducible"
    dropped = (runs[0][1]["x"] == 0).double().mean().item()
    assert abs(dropped - 0.1) < 2e-3, f"dropped fraction {dropped:.4f}, expected 0.1"


@pytest.mark.cuda
@requires_cuda
@requires_cuda_triton
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cuda_real_size_bias_gelu_bf16(approximate):
    _check_bias_gelu((16384, 768), BF16, approximate, param_dtype=FP32, device="cuda")
    _check_bias_gelu_layer_norm((16384, 768), BF16, approximate, param_dtype=FP32, device="cuda", eps=1e-12)


@pytest.mark.cuda
@requires_cuda
@requires_cuda_triton
@pytest.mark.parametrize("seqlen_k", [8192, 10000], ids=["one_block", "looped"])
def test_cuda_long_softmax_rows(seqlen_k):
    _check_softmax((2, 2, 8, seqlen_k), "partial", BF16, device="cuda")
