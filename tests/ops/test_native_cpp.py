"""The cpp backend itself: build cache, the ``torch.ops.fastbert_ext`` kernels at odd sizes and mixed dtypes,
opcheck of every compiled op, determinism, the fused dropout mask, and argument errors.

The op-level suites (test_<op>.py) already run every fastbert op on the cpp backend; these tests call the compiled
ops directly, against the float64 reference with the accuracy rule of _ops_helpers.py, where the torch backend's
implementation of the same op is the same-dtype baseline. Skipped as a whole where the cpp backend is unavailable.
"""

import ctypes
import subprocess
import sys

import pytest
import torch
from _ops_helpers import (
    BF16,
    FP16,
    FP32,
    assert_matches_ref,
    dtype_id,
    padding_mask,
    rand,
    to_np,
    with_dresidual,
)

import fastbert.ops as ops
from fastbert import _ext
from fastbert.ops import _backend
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

_STATUS = ops.backends("cpu")["cpp"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"cpp backend unavailable: {_STATUS.reason}")

E = torch.ops.fastbert_ext if _STATUS.available else None
# Around the vector widths (8 and 16 floats) and the 4-vector unrolled reductions (64), plus BERT's sizes.
WIDTHS = [1, 3, 15, 17, 31, 33, 63, 65, 100, 767, 769]
ROWS = [1, 5, 37]


def _impl(op, backend):
    return _backend._IMPLS[op][backend]


# ----------------------------------------------------------------------------------------------------------------
# build cache


def test_loaded_library_is_the_cached_build():
    result = _ext.build()
    assert not result.compiled, "the extension the tests run was built already: build() must reuse it"
    assert result.path == _ext.library_path() and result.path.is_file()
    assert _ext.is_loaded("cpp") and _ext.load("cpp") == result.path
    assert str(result.path.parent) in _STATUS.reason


def test_a_new_process_reuses_the_cache_without_compiling():
    # _ext.py is loaded from its file so that the child does not import fastbert (and transformers).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fb_ext', {str(_ext.__file__)!r})\n"
        "ext = sys.modules['fb_ext'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(ext)\n"
        "r = ext.build(); ext.load('cpp')\n"
        "import torch; torch.ops.fastbert_ext.softmax_fwd\n"
        "print(r.compiled, r.path)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(_ext.library_path())]


def _tiny_csrc(root, value):
    """A csrc/ whose library exports fastbert_ext_stamp() -> value (no torch headers: compiles in a second)."""
    (root / "cpu").mkdir(parents=True, exist_ok=True)
    (root / "fastbert.cpp").write_text(f'extern "C" int fastbert_ext_stamp() {{ return {value}; }}\n')
    return root


def test_rebuilds_when_a_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBERT_BUILD_DIR", str(tmp_path / "cache"))
    csrc = _tiny_csrc(tmp_path / "csrc", 1)
    first = _ext.build(csrc=csrc)
    assert first.compiled and ctypes.CDLL(str(first.path)).fastbert_ext_stamp() == 1
    again = _ext.build(csrc=csrc)
    assert not again.compiled and again.path == first.path

    _tiny_csrc(csrc, 2)
    changed = _ext.build(csrc=csrc)
    assert changed.compiled and changed.path != first.path
    assert ctypes.CDLL(str(changed.path)).fastbert_ext_stamp() == 2

    # Headers, torch's CPU capability and the flags are part of the key too (checked without compiling).
    before = _ext.build_dir("cpp", csrc)
    (csrc / "cpu" / "kernels.h").write_text("// changed\n")
    assert _ext.build_dir("cpp", csrc) != before
    monkeypatch.setenv("FASTBERT_EXTRA_CFLAGS", "-DFASTBERT_TEST_FLAG")
    assert _ext.build_dir("cpp", csrc) not in (before, changed.path.parent)


_BF16_PROBE = """
#include "cpu/vec_utils.h"
// fp32 -> bf16 through the kernels' row writer: pairs of vectors (from_float2), then the single-vector tail.
extern "C" void fastbert_to_bf16(const float* x, c10::BFloat16* out, int64_t n) {
  using namespace fastbert::cpu;
  write_row(out, n, [&](int64_t d, int64_t c) { return Vec::loadu(x + d, c); });
}
"""


@pytest.mark.parametrize("native", [False, True], ids=["portable", "avx512_bf16"])
def test_bf16_rounding_matches_torch(native, tmp_path, monkeypatch):
    # The kernels' fp32 -> bf16 stores (vec_utils.h): ATen's rounding sequence, or vcvtne2ps2bf16 where the build adds
    # -mavx512bf16. Both must round like torch's .to(torch.bfloat16): to nearest even (ties both ways), inf, NaN.
    if native and not _ext.cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    if _ext.cpu_capability() != "AVX512" and native:
        pytest.skip("torch does not run at AVX512 here")
    monkeypatch.setenv("FASTBERT_BUILD_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTBERT_EXTRA_CFLAGS", "" if native else "-mno-avx512bf16")
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    for header in ("vec_utils.h", "kernels.h"):
        (csrc / "cpu" / header).write_text((_ext.csrc_dir() / "cpu" / header).read_text())
    (csrc / "fastbert.cpp").write_text(_BF16_PROBE)
    lib = ctypes.CDLL(str(_ext.build(csrc=csrc).path))
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (4000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[(x.abs() >= torch.finfo(torch.float32).tiny) | ~torch.isfinite(x)]  # normal, inf, NaN (not denormal)
    ties = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.0e38, float("inf"), float("-inf"), 0.0, -0.0])
    x = torch.cat([ties, x])[: 1024 + 16 + 13]  # the paired loop, a single full vector and a masked tail
    out = torch.full(x.shape, 7.0, dtype=torch.bfloat16)  # a lane the writer skips keeps 7.0 and fails
    lib.fastbert_to_bf16(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(x.numel()))
    expected = x.to(torch.bfloat16)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


# ----------------------------------------------------------------------------------------------------------------
# kernels at odd sizes, against the reference (torch backend = baseline)


def _ln_case(rows, n, dtype, residual=True, bias=True, param_dtype=None):
    param_dtype = param_dtype or dtype
    x = rand((rows, n), dtype, offset=0.5)
    res = rand((rows, n), dtype) if residual else None
    w = rand((n,), param_dtype, scale=0.5, offset=1.0)
    b = rand((n,), param_dtype) if bias else None
    return x, res, w, b, rand((rows, n), dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", WIDTHS[1:])  # not 1: rstd = 1/sqrt(eps) amplifies any rounding (see test_layer_norm)
def test_add_layer_norm_odd_sizes(n, rows, dtype):
    x, res, w, b, dout = _ln_case(rows, n, dtype)
    eps = 1e-5
    out, mean, rstd = E.add_layer_norm_fwd(x, res, w, b, eps, 0.0, None)
    base = _impl("add_layer_norm_fwd", "torch")(x, res, w, b, eps, 0.0, None)
    ref = layer_norm_fwd_ref(to_np(x), to_np(res), to_np(w), to_np(b), eps)
    for name, got, baseline, expected in zip(["out", "mean", "rstd"], (out, mean, rstd), base, ref, strict=True):
        assert_matches_ref(name, got, expected, baseline, dtype)
    grads = with_dresidual(E.add_layer_norm_bwd(dout, x, res, w, b, mean, rstd, 0.0, None))
    base = with_dresidual(_impl("add_layer_norm_bwd", "torch")(dout, x, res, w, b, mean, rstd, 0.0, None))
    ref = layer_norm_bwd_ref(to_np(dout), to_np(x), to_np(res), to_np(w), to_np(b), eps)
    for name, got, baseline, expected in zip(["dx", "dres", "dw", "db"], grads, base, ref, strict=True):
        assert got.dtype == baseline.dtype and got.is_contiguous()
        assert_matches_ref(name, got, expected, baseline, dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", [5, 70])  # 70 rows: 32 row blocks of 2 or 3 rows for the dbias partial sums
def test_bias_gelu_odd_sizes(rows, n, dtype, approximate):
    x, b, dout = rand((rows, n), dtype, scale=3.0), rand((n,), dtype), rand((rows, n), dtype)
    out = E.bias_gelu_fwd(x, b, approximate)
    ref = bias_gelu_fwd_ref(to_np(x), to_np(b), approximate)
    assert_matches_ref("out", out, ref, _impl("bias_gelu_fwd", "torch")(x, b, approximate), dtype)
    dx, db = E.bias_gelu_bwd(dout, x, b, approximate, True)
    ref_dx, ref_db = bias_gelu_bwd_ref(to_np(dout), to_np(x), to_np(b), approximate)
    base_dx, base_db = _impl("bias_gelu_bwd", "torch")(dout, x, b, approximate, True)
    assert db.dtype == b.dtype and db.shape == (n,)
    assert_matches_ref("dx", dx, ref_dx, base_dx, dtype)
    assert_matches_ref("dbias", db, ref_db, base_db, dtype)
    dx_only, no_db = E.bias_gelu_bwd(dout, x, b, approximate, False)
    assert torch.equal(dx_only, dx) and no_db.numel() == 0, "need_dbias=False: the same dx and no dbias"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("n", [3, 17, 65, 769])
def test_bias_gelu_layer_norm_odd_sizes(n, dtype, approximate):
    x, b, w, lb, dout = (
        rand((37, n), dtype, scale=2.0),
        rand((n,), dtype),
        rand((n,), dtype, offset=1.0),
        rand((n,), dtype),
        rand((37, n), dtype),
    )
    out, mean, rstd = E.bias_gelu_layer_norm_fwd(x, b, w, lb, 1e-12, approximate)
    base_out, base_mean, base_rstd = _impl("bias_gelu_layer_norm_fwd", "torch")(x, b, w, lb, 1e-12, approximate)
    ref_out, _, _ = bias_gelu_layer_norm_fwd_ref(to_np(x), to_np(b), to_np(w), to_np(lb), 1e-12, approximate)
    assert_matches_ref("out", out, ref_out, base_out, dtype)
    grads = E.bias_gelu_layer_norm_bwd(dout, x, b, w, lb, mean, rstd, approximate, True)
    base = _impl("bias_gelu_layer_norm_bwd", "torch")(dout, x, b, w, lb, base_mean, base_rstd, approximate, True)
    ref = bias_gelu_layer_norm_bwd_ref(to_np(dout), to_np(x), to_np(b), to_np(w), to_np(lb), 1e-12, approximate)
    for name, got, baseline, expected in zip(["dx", "dbias", "dw", "dlb"], grads, base, ref, strict=True):
        assert_matches_ref(name, got, expected, baseline, dtype)
    without = E.bias_gelu_layer_norm_bwd(dout, x, b, w, lb, mean, rstd, approximate, False)
    assert without[1].numel() == 0, "need_dbias=False: no dbias"
    for i in (0, 2, 3):
        assert torch.equal(without[i], grads[i]), "need_dbias must not change the other gradients"


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=dtype_id)
@pytest.mark.parametrize("tk", [1, 7, 16, 17, 100, 129])
def test_softmax_odd_sizes(tk, dtype):
    scores, dprobs, mask = (
        rand((3, 2, 5, tk), dtype, scale=5.0),
        rand((3, 2, 5, tk), dtype),
        padding_mask("empty", 3, tk),
    )
    probs = E.softmax_fwd(scores, mask, 0.3)
    ref = softmax_fwd_ref(to_np(scores), mask.numpy(), 0.3)
    assert_matches_ref("probs", probs, ref, _impl("softmax_fwd", "torch")(scores, mask, 0.3), dtype)
    assert torch.count_nonzero(probs[-1]) == 0, "a sequence without real keys must give all-zero rows"
    dscores = E.softmax_bwd(dprobs, probs, 0.3)
    ref_d = softmax_bwd_ref(to_np(dprobs), ref, 0.3)
    assert_matches_ref("dscores", dscores, ref_d, _impl("softmax_bwd", "torch")(dprobs, probs, 0.3), dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize(("tk", "col"), [(7, 6), (16, 3), (33, 32), (128, 0), (128, 77)])
def test_softmax_nan_score_poisons_its_row_only(tk, col, dtype):
    """A NaN score makes its row NaN, as in torch (the row max must not drop it, whichever lane it sits in)."""
    scores = rand((2, 2, 3, tk), dtype, scale=3.0)
    scores[1, 0, 2, col] = float("nan")
    probs = E.softmax_fwd(scores, None, 0.5)
    assert torch.isnan(probs[1, 0, 2]).all()
    poisoned = torch.zeros(probs.shape, dtype=torch.bool)
    poisoned[1, 0, 2] = True
    assert torch.isfinite(probs[~poisoned]).all()
    expected = torch.softmax(scores.float() * 0.5, -1).to(dtype)
    torch.testing.assert_close(probs[~poisoned], expected[~poisoned], atol=1e-2 if dtype == BF16 else 1e-6, rtol=0)


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "b_dtype"), [(BF16, FP32, FP16), (FP16, BF16, FP32), (FP32, BF16, BF16)]
)
def test_mixed_parameter_dtypes(x_dtype, w_dtype, b_dtype):
    x, res, dout = rand((6, 40), x_dtype), rand((6, 40), x_dtype), rand((6, 40), x_dtype)
    w, b = rand((40,), w_dtype, offset=1.0), rand((40,), b_dtype)
    out, mean, rstd = E.add_layer_norm_fwd(x, res, w, b, 1e-12, 0.0, None)
    assert out.dtype == x_dtype and mean.dtype == rstd.dtype == FP32
    dx, dres, dw, db = with_dresidual(E.add_layer_norm_bwd(dout, x, res, w, b, mean, rstd, 0.0, None))
    assert (dx.dtype, dres.dtype, dw.dtype, db.dtype) == (x_dtype, x_dtype, w_dtype, b_dtype)
    ref = layer_norm_bwd_ref(to_np(dout), to_np(x), to_np(res), to_np(w), to_np(b), 1e-12)
    base = with_dresidual(_impl("add_layer_norm_bwd", "torch")(dout, x, res, w, b, mean, rstd, 0.0, None))
    for name, got, baseline, expected in zip(["dx", "dres", "dw", "db"], (dx, dres, dw, db), base, ref, strict=True):
        assert_matches_ref(name, got, expected, baseline, got.dtype)  # dw, db are rounded to their own dtypes
    y, ymean, yrstd = E.bias_gelu_layer_norm_fwd(x, b, w, None, 1e-12, "none")
    _, ydb, ydw, ydlb = E.bias_gelu_layer_norm_bwd(dout, x, b, w, None, ymean, yrstd, "none", True)
    assert y.dtype == x_dtype and ydw.dtype == w_dtype and ydlb.numel() == 0 and ydb.dtype == b_dtype
    _, gdb = E.bias_gelu_bwd(dout, x, b, "none", True)
    assert gdb.dtype == b_dtype


def test_empty_leading_dimensions():
    x, w = torch.empty((0, 33)), rand((33,), FP32)
    out, mean, rstd = E.add_layer_norm_fwd(x, None, w, None, 1e-12, 0.0, None)
    assert out.shape == (0, 33) and mean.shape == rstd.shape == (0,)
    dx, dres, dw, db = E.add_layer_norm_bwd(x, x, None, w, None, mean, rstd, 0.0, None)
    assert dx.shape == (0, 33) and dres.numel() == db.numel() == 0 and torch.equal(dw, torch.zeros(33))
    assert E.bias_gelu_fwd(x, None, "none").shape == (0, 33)
    assert E.softmax_fwd(torch.empty((0, 2, 3, 4)), None, 1.0).shape == (0, 2, 3, 4)


# ----------------------------------------------------------------------------------------------------------------
# opcheck of every compiled op (schema, fake, dispatch)


def _opcheck_cases():
    x, res, w, b = rand((4, 33), FP32), rand((4, 33), FP32), rand((33,), FP32, offset=1.0), rand((33,), FP32)
    xb = rand((3, 2, 24), BF16)
    out, mean, rstd = E.add_layer_norm_fwd(x, res, w, b, 1e-12, 0.0, None)
    seed = torch.tensor([123])
    yield "add_layer_norm_fwd", (x, res, w, b, 1e-12, 0.0, None)
    yield "add_layer_norm_fwd", (xb, None, rand((24,), FP32), None, 1e-5, 0.2, seed)
    yield "add_layer_norm_bwd", (x, x, res, w, b, mean, rstd, 0.0, None)
    yield "add_layer_norm_bwd", (x, x, None, w, None, mean, rstd, 0.3, seed)
    yield "bias_gelu_fwd", (x, b, "none")
    yield "bias_gelu_fwd", (xb, None, "tanh")
    yield "bias_gelu_fwd_", (x.clone(), b, "none")
    yield "bias_gelu_fwd_", (xb.clone(), None, "tanh")
    yield "bias_gelu_bwd", (x, x, b, "tanh", False)
    yield "bias_gelu_bwd", (xb, xb, rand((24,), FP32), "none", True)
    yield "bias_gelu_layer_norm_fwd", (x, b, w, b, 1e-12, "none")
    gout, gmean, grstd = E.bias_gelu_layer_norm_fwd(x, None, w, None, 1e-12, "tanh")
    yield "bias_gelu_layer_norm_bwd", (x, x, None, w, None, gmean, grstd, "tanh", True)
    gout, gmean, grstd = E.bias_gelu_layer_norm_fwd(x, b, w, b, 1e-12, "none")
    yield "bias_gelu_layer_norm_bwd", (x, x, b, w, b, gmean, grstd, "none", True)
    scores = rand((2, 3, 4, 7), FP32)
    yield "softmax_fwd", (scores, padding_mask("empty", 2, 7), 0.125)
    yield "softmax_fwd", (scores.to(BF16), None, 1.0)
    yield "softmax_bwd", (scores, torch.softmax(scores, -1), 0.5)


@pytest.mark.parametrize(
    ("name", "args"), list(_opcheck_cases()) if _STATUS.available else [], ids=lambda v: v if isinstance(v, str) else ""
)
def test_fastbert_ext_opcheck(name, args):
    torch.library.opcheck(getattr(E, name).default, args)


def test_every_compiled_op_has_a_cpp_implementation():
    names = {name for name, _ in _opcheck_cases()}
    assert names == {op for op in _backend.op_names() if _backend._has_impl(op, "cpp")}
    assert not _backend._has_impl("attention_fwd", "cpp"), "attention runs torch's CPU flash kernel (see native.py)"


# ----------------------------------------------------------------------------------------------------------------
# determinism and the dropout mask


def _all_outputs(threads, dropout_p):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, res, w, b, dout = _ln_case(300, 769, FP32)  # 230k elements: several parallel tasks
    seed = torch.tensor([2024])
    out, mean, rstd = E.add_layer_norm_fwd(x, res, w, b, 1e-12, dropout_p, seed)
    grads = E.add_layer_norm_bwd(dout, x, res, w, b, mean, rstd, dropout_p, seed)
    y, ym, yr = E.bias_gelu_layer_norm_fwd(x, b, w, b, 1e-12, "none")
    ygrads = E.bias_gelu_layer_norm_bwd(dout, x, b, w, b, ym, yr, "none", True)
    ggrads = E.bias_gelu_bwd(dout, x, b, "none", True)
    return [out, mean, rstd, *grads, y, *ygrads, *ggrads]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_bitwise_deterministic_across_runs_and_thread_counts(dropout_p):
    threads = torch.get_num_threads()
    try:
        first, second, single = _all_outputs(2, dropout_p), _all_outputs(2, dropout_p), _all_outputs(1, dropout_p)
    finally:
        torch.set_num_threads(threads)
    for i, (a, b, c) in enumerate(zip(first, second, single, strict=True)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"
        assert torch.equal(a, c), f"output {i} differs between 2 threads and 1 (gradients must sum in fixed blocks)"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics_and_seeds(p):
    rows, n = 256, 96
    ones, w = torch.ones((rows, n)), torch.ones(n)

    def kept(seed):
        # LayerNorm sees z = x * mask with x = 1: kept elements are the ones whose dx is non-zero.
        out, mean, rstd = E.add_layer_norm_fwd(ones, None, w, None, 1e-5, p, torch.tensor([seed]))
        dx = E.add_layer_norm_bwd(rand((rows, n), FP32), ones, None, w, None, mean, rstd, p, torch.tensor([seed]))[0]
        return dx != 0

    mask = kept(7)
    frac = 1.0 - mask.double().mean().item()
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(frac - p) < 5 * sigma, f"dropped {frac:.4f}, expected {p}"
    assert torch.equal(mask, kept(7)) and not torch.equal(mask, kept(8))
    assert not torch.equal(mask[0], mask[1]), "rows must draw different masks"
    assert not torch.equal(mask[:, 0], mask[:, 1]), "columns must draw different masks"


def test_seed_is_ignored_without_dropout():
    x, res, w, b, _ = _ln_case(4, 40, FP32)
    a = E.add_layer_norm_fwd(x, res, w, b, 1e-12, 0.0, None)[0]
    assert torch.equal(a, E.add_layer_norm_fwd(x, res, w, b, 1e-12, 0.0, torch.tensor([5]))[0])


# ----------------------------------------------------------------------------------------------------------------
# argument errors name the argument


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: E.bias_gelu_fwd(torch.ones(2, 3), None, "erf"), "approximate"),
        (lambda: E.bias_gelu_fwd(torch.ones(2, 3, dtype=torch.float64), None, "none"), "x must be float32"),
        (lambda: E.bias_gelu_fwd(torch.ones(2, 3), torch.ones(4), "none"), "bias must have shape"),
        (
            lambda: E.add_layer_norm_fwd(torch.ones(2, 3), torch.ones(3, 3), torch.ones(3), None, 1e-5, 0.0, None),
            "residual has shape",
        ),
        (lambda: E.add_layer_norm_fwd(torch.ones(2, 3), None, torch.ones(3), None, 1e-5, 0.5, None), "seed"),
        (lambda: E.softmax_fwd(torch.ones(2, 3, 4), None, 1.0), "scores must be"),
        (lambda: E.softmax_fwd(torch.ones(2, 1, 3, 4), torch.ones(2, 5, dtype=torch.bool), 1.0), "key_padding_mask"),
    ],
)
def test_compiled_ops_reject_bad_arguments(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
