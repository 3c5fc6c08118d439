"""Backend selection: fastbert.ops.backends(), set_backend, $FASTBERT_BACKEND, auto, and the errors that say why.

``_backend._resolve`` is cached per (op, device type, requested backend); the requested name is read from
``set_backend`` / the environment on every call, so an env change takes effect at the next op without clearing
anything. The availability probes (``_backend._probe``) are cached for the process: a test that changes what a
probe looks at (TRITON_INTERPRET, the probe table) must clear that cache, before and after.
"""

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from _ops_helpers import FP32, assert_same, rand
from torch.utils._python_dispatch import TorchDispatchMode

import fastbert
import fastbert.ops as ops
from fastbert.ops import BackendUnavailableError, _backend

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))

OP_NAMES = [
    "add_layer_norm_bwd",
    "add_layer_norm_fwd",
    "attention_bwd",
    "attention_fwd",
    "bias_gelu_bwd",
    "bias_gelu_fwd",
    "bias_gelu_layer_norm_bwd",
    "bias_gelu_layer_norm_fwd",
    "softmax_bwd",
    "softmax_fwd",
]


@pytest.fixture
def fresh_backend_state(monkeypatch):
    """No override, no env var, empty probe/resolve caches and warning memory; all restored afterwards."""
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    ops.set_backend(None)
    _backend._probe.cache_clear()
    yield monkeypatch
    ops.set_backend(None)
    _backend._probe.cache_clear()
    _backend._resolve.cache_clear()


def _run_every_public_op():
    """One call of every public op on small CPU fp32 tensors, forward and backward."""
    x = rand((2, 4, 16), FP32).requires_grad_(True)
    w = rand((16,), FP32)
    q = rand((2, 4, 2, 8), FP32).requires_grad_(True)
    outs = [
        ops.attention(q, q, q),
        ops.add_layer_norm(x, x, w, w),
        ops.layer_norm(x, w, None),
        ops.bias_gelu(x, w),
        ops.bias_gelu_layer_norm(x, w, w, w),
        ops.softmax(q.transpose(1, 2), None, 0.5),
    ]
    torch.autograd.backward([o.sum() for o in outs])
    assert all(torch.isfinite(o).all() for o in outs)
    return outs


def test_backends_reports_torch_with_every_op(fresh_backend_state):
    report = ops.backends("cpu")
    assert set(report) == {"torch", "triton", "cuda", "cpp"}
    torch_status = report["torch"]
    assert torch_status.available and torch_status.name == "torch"
    assert set(OP_NAMES) <= set(torch_status.ops)
    assert "available" in str(torch_status) and "attention_fwd" in str(torch_status)
    for name, status in report.items():
        assert status.reason.startswith("[cpu]"), status.reason
        if not status.available:
            assert len(status.reason) > len("[cpu] "), f"{name} is unavailable without a reason"


def test_backends_defaults_to_the_visible_device(fresh_backend_state):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert all(s.reason.startswith(f"[{expected}]") for s in ops.backends().values())
    assert fastbert.backends is ops.backends


def test_cuda_and_cpp_are_unavailable_on_the_wrong_device(fresh_backend_state):
    assert not ops.backends("cpu")["cuda"].available
    assert "CUDA tensors only" in ops.backends("cpu")["cuda"].reason
    assert not ops.backends("cuda")["cpp"].available
    assert "CPU tensors only" in ops.backends("cuda")["cpp"].reason


@pytest.mark.parametrize("name", ["triton", "cuda", "cpp"])
def test_explicit_unavailable_backend_raises_with_reason(fresh_backend_state, name):
    if name == "triton":
        fresh_backend_state.delenv("TRITON_INTERPRET", raising=False)
    status = ops.backends("cpu")[name]
    if status.available:
        pytest.skip(f"{name} is available for CPU tensors here")
    ops.set_backend(name)
    with pytest.raises(BackendUnavailableError) as info:
        ops.layer_norm(rand((2, 8), FP32), rand((8,), FP32), None)
    message = str(info.value)
    assert f"FASTBERT_BACKEND={name}" in message and "cpu" in message
    assert "auto" in message, "the error should say how to fall back"
    # The reason backends() gives is the reason in the error (minus the device prefix and any 'no kernels' note).
    core = status.reason.removeprefix("[cpu] ").split(";")[0]
    assert core in message, f"reason {core!r} missing from {message!r}"


def test_triton_on_cpu_needs_the_interpreter(fresh_backend_state):
    fresh_backend_state.delenv("TRITON_INTERPRET", raising=False)
    status = ops.backends("cpu")["triton"]
    assert not status.available
    assert "TRITON_INTERPRET=1" in status.reason or "not installed" in status.reason


_INTERPRETER_CHECK = """
import torch, fastbert.ops as ops
from fastbert.ops import BackendUnavailableError
import test_backend as t
ops.set_backend("triton")
if ops.backends("cpu")["triton"].ops:  # kernels registered: the interpreter runs them, and they must agree
    outs = t._run_every_public_op()
    ops.set_backend("torch")
    torch.manual_seed(0)
    for out, expected in zip(outs, t._run_every_public_op(), strict=True):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    print("agree")
else:
    assert not ops.backends("cpu")["triton"].available
    try:
        t._run_every_public_op()
    except BackendUnavailableError as exc:
        assert "no fastbert kernels are registered" in str(exc), exc
        print("unavailable")
"""


def test_triton_interpreter_without_kernels_is_still_unavailable():
    # Triton decides interpreted or compiled when a kernel is defined (at import), so TRITON_INTERPRET cannot be
    # switched on in this process: on a GPU machine the kernels here are compiled for the GPU and would be launched
    # with CPU pointers. A fresh process with the interpreter on and no GPU visible runs the check instead.
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "FASTBERT_BACKEND": "auto"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_HERE, _REPO, env.get("PYTHONPATH")) if p)
    torch.manual_seed(0)
    proc = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(0)\n" + _INTERPRETER_CHECK],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] in ("agree", "unavailable"), proc.stdout


def test_no_test_switches_the_interpreter_on_in_process():
    # Turning TRITON_INTERPRET on after kernels were defined runs GPU-compiled kernels on CPU tensors on a GPU
    # machine (tests/conftest.py sets it before anything imports triton, and only where no GPU is visible).
    offenders = []
    for root, _, files in os.walk(os.path.join(_REPO, "tests")):
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".py") or path == os.path.join(_REPO, "tests", "conftest.py"):
                continue
            with open(path) as f:
                text = f.read()
            if re.search(r"setenv\(\s*[\"']TRITON_INTERPRET[\"']\s*,\s*[\"']1", text) or \
                    re.search(r"environ\[\s*[\"']TRITON_INTERPRET[\"']\s*\]\s*=\s*[\"']1", text):
                offenders.append(os.path.relpath(path, _REPO))
    assert not offenders, f"these tests turn TRITON_INTERPRET on in-process: {offenders}"


# ----------------------------------------------------------------------------------------------------------------
# auto falls back when a Triton kernel fails to compile or launch

TRITON_DEVICE = "cpu" if ops.backends("cpu")["triton"].available else "cuda"
TRITON_OK = ops.backends(TRITON_DEVICE)["triton"].available if TRITON_DEVICE == "cpu" or torch.cuda.is_available() \
    else False


def _fail_triton_kernels(monkeypatch, *names):
    """auto tries triton first on the device where Triton runs here, and the named LayerNorm kernels fail to compile
    (as a kernel needing more shared memory than the GPU has does)."""
    errors = pytest.importorskip("triton.runtime.errors")
    from fastbert.ops.layer_norm import triton as ln_triton

    def out_of_resources(*args, **kwargs):
        raise errors.OutOfResources(200_000, 101_376, "shared memory")

    monkeypatch.setitem(_backend.AUTO_ORDER, TRITON_DEVICE, ("triton", "torch"))
    for name in names:
        monkeypatch.setattr(getattr(ln_triton, name), "run", out_of_resources)
    monkeypatch.setattr(_backend, "_FAILED", {})
    _backend._resolve.cache_clear()


@pytest.mark.skipif(not TRITON_OK, reason="the triton backend is unavailable here")
def test_auto_falls_back_when_a_triton_kernel_fails_with_one_warning(fresh_backend_state):
    _fail_triton_kernels(fresh_backend_state, "_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel")
    x, w = rand((4, 16), FP32, TRITON_DEVICE), rand((16,), FP32, TRITON_DEVICE)
    assert ops.resolved_backend("add_layer_norm_fwd", TRITON_DEVICE) == "triton"
    with pytest.warns(UserWarning, match="OutOfResources.*shared memory") as record:
        out = ops.layer_norm(x, w, None)
    assert len(record) == 1
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (16,), w), rtol=1e-5, atol=1e-5)
    # The whole family moves (the backward must regenerate the forward's dropout mask), and the report says so.
    for op in ("add_layer_norm_fwd", "add_layer_norm_bwd"):
        assert ops.resolved_backend(op, TRITON_DEVICE) == "torch"
    assert ops.resolved_backend("softmax_fwd", TRITON_DEVICE) == "triton"
    assert "add_layer_norm" in ops.backends(TRITON_DEVICE)["triton"].reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning: later calls go straight to the fallback
        xg = x.clone().requires_grad_(True)
        ops.layer_norm(xg, w, None).sum().backward()
    ops.set_backend("triton")  # asked for explicitly, the failure is an error
    with pytest.raises(Exception, match="shared memory"):
        ops.layer_norm(x, w, None)


@pytest.mark.skipif(not TRITON_OK, reason="the triton backend is unavailable here")
def test_auto_does_not_fall_back_in_a_backward_with_dropout(fresh_backend_state):
    # The forward ran the triton kernel with dropout: no other backend can regenerate its mask, so the failing
    # backward raises rather than return gradients for another mask.
    _fail_triton_kernels(fresh_backend_state, "_add_layer_norm_bwd_kernel")
    x = rand((4, 16), FP32, TRITON_DEVICE).requires_grad_(True)
    w = rand((16,), FP32, TRITON_DEVICE)
    out = ops.add_layer_norm(x, x.detach(), w, None, dropout_p=0.5)
    with pytest.raises(RuntimeError, match="dropout mask"):
        out.sum().backward()


def test_invalid_env_value_raises_value_error_naming_the_variable(fresh_backend_state):
    fresh_backend_state.setenv("FASTBERT_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND") as info:
        ops.layer_norm(rand((2, 8), FP32), rand((8,), FP32), None)
    assert "tritonn" in str(info.value)
    for name in ("auto", "torch", "triton", "cuda", "cpp"):
        assert name in str(info.value), f"the error should list {name}"


def test_set_backend_rejects_unknown_names(fresh_backend_state):
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("numpy")


def test_set_backend_overrides_env_and_none_returns_to_it(fresh_backend_state):
    fresh_backend_state.setenv("FASTBERT_BACKEND", "bogus")
    ops.set_backend("torch")
    _run_every_public_op()
    ops.set_backend(None)
    with pytest.raises(ValueError, match="FASTBERT_BACKEND"):
        _run_every_public_op()


def test_env_changes_take_effect_at_the_next_op(fresh_backend_state):
    x, w = rand((2, 8), FP32), rand((8,), FP32)
    fresh_backend_state.setenv("FASTBERT_BACKEND", " Torch ")  # case and blanks are forgiven
    ops.layer_norm(x, w, None)
    assert ops.resolved_backend("add_layer_norm_fwd", "cpu") == "torch"
    fresh_backend_state.setenv("FASTBERT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="FASTBERT_BACKEND=cuda"):
        ops.layer_norm(x, w, None)
    fresh_backend_state.setenv("FASTBERT_BACKEND", "auto")
    ops.layer_norm(x, w, None)


@pytest.mark.parametrize("how", ["default", "set_backend", "env"])
def test_auto_never_fails(fresh_backend_state, how):
    if how == "set_backend":
        ops.set_backend("auto")
    elif how == "env":
        fresh_backend_state.setenv("FASTBERT_BACKEND", "auto")
    _run_every_public_op()
    available = [name for name, status in ops.backends("cpu").items() if status.available]
    for op in OP_NAMES:
        assert ops.resolved_backend(op, "cpu") in available


def test_auto_skips_a_registered_backend_that_cannot_load_with_one_warning(fresh_backend_state):
    def broken_probe(device_type):
        return False, "pretend build error: nvcc not found"

    calls = []
    impls = dict(_backend._IMPLS["softmax_fwd"])
    impls["cpp"] = lambda *args: calls.append(args)
    fresh_backend_state.setitem(_backend._IMPLS, "softmax_fwd", impls)
    fresh_backend_state.setitem(_backend._PROBES, "cpp", broken_probe)
    _backend._probe.cache_clear()
    _backend._resolve.cache_clear()
    scores = rand((1, 1, 2, 3), FP32)
    with pytest.warns(UserWarning, match="pretend build error"):
        probs = ops.softmax(scores)
    torch.testing.assert_close(probs, torch.softmax(scores, dim=-1))
    assert not calls and ops.resolved_backend("softmax_fwd", "cpu") == "torch"
    _backend._resolve.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per backend and process
        ops.softmax(scores)
    ops.set_backend("cpp")  # asked for explicitly, the same failure is an error with the build error text
    with pytest.raises(BackendUnavailableError, match="pretend build error"):
        ops.softmax(scores)


def test_explicit_backend_runs_its_kernels_and_torch_for_the_ops_it_lacks(fresh_backend_state):
    calls = []

    def fake_softmax_fwd(scores, key_padding_mask, scale):
        calls.append(scale)
        return _backend._IMPLS["softmax_fwd"]["torch"](scores, key_padding_mask, scale)

    # Only the fake cpp kernel: drop whatever real cpp kernels the extension registered.
    impls = {op: {b: f for b, f in by_backend.items() if b != "cpp"} for op, by_backend in _backend._IMPLS.items()}
    impls["softmax_fwd"]["cpp"] = fake_softmax_fwd
    fresh_backend_state.setattr(_backend, "_IMPLS", impls)
    fresh_backend_state.setitem(_backend._PROBES, "cpp", lambda device_type: (True, "pretend extension"))
    # Probing also imports the backend's real kernel modules (where a loader exists): keep them out of this test.
    fresh_backend_state.setattr(_backend, "_load_kernel_modules", lambda backend: (True, ""), raising=False)
    _backend._probe.cache_clear()
    ops.set_backend("cpp")
    assert ops.backends("cpu")["cpp"].available and ops.backends("cpu")["cpp"].ops == ["softmax_fwd"]
    ops.softmax(rand((1, 1, 2, 3), FP32), None, 0.25)
    assert calls == [0.25], "the cpp kernel registered for softmax_fwd did not run"
    assert ops.resolved_backend("softmax_fwd", "cpu") == "cpp"
    assert ops.resolved_backend("add_layer_norm_fwd", "cpu") == "torch"
    ops.layer_norm(rand((2, 8), FP32), rand((8,), FP32), None)


def test_backend_fixture_selects_and_restores(backend):
    assert _backend.requested_backend() == backend
    _run_every_public_op()


class _RecordOps(TorchDispatchMode):
    """The names of the operators dispatched while active (custom ops show up as ``fastbert.<name>``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_eager_calls_with_parameters_skip_the_custom_op_layer(backend):
    # Eager calls go straight to the backend's kernels, through a plain autograd.Function when autograd records
    # them: the torch.library custom ops (fastbert::*) are for compiled and traced code. Module parameters count as
    # plain tensors (they used to send every LayerNorm through the custom op).
    ln = torch.nn.LayerNorm(16)
    x = rand((2, 4, 16), FP32).requires_grad_(True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), _RecordOps() as record:
            out = ops.add_layer_norm(x, x, ln.weight, ln.bias) + ops.bias_gelu(x, ln.bias)
            out = ops.softmax(out[None], None, 0.5)
            if grad:
                out.sum().backward()
        custom = [name for name in record.names if name.startswith("fastbert::")]
        assert not custom, f"eager call (grad={grad}) went through the custom ops {custom}"
        assert record.names, "the dispatch mode recorded nothing: the test does not observe the ops"
    assert ln.weight.grad is not None and x.grad is not None


def test_backward_runs_the_backend_that_ran_the_forward(fresh_backend_state):
    # Dropout masks are per backend: the backward must regenerate the forward's mask, so it runs the forward's
    # backend even when the selection changes in between. A recording fake stands in for the other backend.
    calls = []

    def fake_bwd(*args):
        calls.append("cpp")
        return _backend._IMPLS["add_layer_norm_bwd"]["torch"](*args)

    impls = {op: dict(by_backend) for op, by_backend in _backend._IMPLS.items()}
    impls["add_layer_norm_bwd"]["cpp"] = fake_bwd
    impls["add_layer_norm_fwd"]["cpp"] = impls["add_layer_norm_fwd"]["torch"]
    fresh_backend_state.setattr(_backend, "_IMPLS", impls)
    fresh_backend_state.setitem(_backend._PROBES, "cpp", lambda device_type: (True, "pretend extension"))
    fresh_backend_state.setattr(_backend, "_load_kernel_modules", lambda backend: (True, ""), raising=False)
    _backend._probe.cache_clear()

    x, w = rand((4, 16), FP32).requires_grad_(True), rand((16,), FP32)
    grads = []
    for switch_to in ("torch", "cpp"):
        ops.set_backend("torch")
        torch.manual_seed(0)
        out = ops.add_layer_norm(x, x.detach(), w, None, dropout_p=0.5)
        ops.set_backend(switch_to)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        grads.append(grad)
    assert calls == [], "the backward ran the backend selected after the forward"
    assert_same("dx", grads[1], grads[0])
