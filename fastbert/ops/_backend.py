"""Backend resolution for the fastbert ops.

Every op registers one implementation per backend with :func:`register_impl`. The custom op's device kernel
asks :func:`impl` for the implementation to run; the answer is resolved once per (op, device type) and cached.

Backends:

- ``torch``: plain PyTorch, every device. The fallback and the same-precision baseline.
- ``triton``: Triton kernels. CUDA tensors, or CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).
- ``cuda``: the compiled CUDA kernels from ``csrc/cuda``.
- ``cpp``: the compiled CPU kernels from ``csrc/cpu``.

``FASTBERT_BACKEND=auto|torch|triton|cuda|cpp`` (default ``auto``) picks one. ``auto`` takes, per device type, the
first backend in :data:`AUTO_ORDER` that is available and implements the op, and never fails. An explicitly
requested backend that cannot run on a device raises :class:`BackendUnavailableError` with the reason; an op
that the requested backend does not implement (yet) runs its ``torch`` implementation, as ``backends()`` reports.

Determinism: an implementation registered with ``deterministic=False`` (one that reduces with atomics, so its
floating-point sums depend on thread timing) is skipped while :func:`deterministic` is on, as if the backend did not
implement the op. Every kernel fastbert ships today is deterministic (no atomics; fixed reduction order), so the
switch changes nothing yet; it is the contract an atomics fast path must honour.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")
# Per device type, the order `auto` tries. Measured order lives in the benchmarks; torch is always last so
# that `auto` can never fail.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_ENV_VAR = "FASTBERT_BACKEND"
_DETERMINISTIC_ENV_VAR = "FASTBERT_DETERMINISTIC"

# Op packages under fastbert/ops and, per backend, the module in each that registers its kernels when imported.
OP_PACKAGES = ("attention", "varlen_attention", "layer_norm", "bias_gelu", "softmax")
KERNEL_MODULES = {"triton": "triton", "cuda": "native", "cpp": "native"}

# _IMPLS[op_name][backend] -> callable
_IMPLS: dict[str, dict[str, Callable]] = {}
_lock = threading.Lock()
_override: str | None = None
_deterministic_override: bool | None = None
_NONDETERMINISTIC: set[tuple[str, str]] = set()  # (op_name, backend) implementations that reduce with atomics
_warned: set[str] = set()
# (op family, device type, backend) -> error text: a kernel of that backend failed to compile or launch under `auto`,
# which then runs the family (forward and backward: dropout masks are per backend) on the next backend.
_FAILED: dict[tuple[str, str, str], str] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


@dataclass
class BackendStatus:
    name: str
    available: bool
    reason: str
    ops: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        ops = ", ".join(self.ops) if self.ops else "none"
        return f"{self.name:7s} {state:11s} ops: {ops}. {self.reason}"


def register_impl(op_name: str, backend: str, fn: Callable, *, deterministic: bool = True) -> Callable:
    """Register ``fn`` as the ``backend`` implementation of ``op_name`` (e.g. ``attention_fwd``).

    ``deterministic=False`` marks an implementation whose results can differ from run to run (atomics): it is not
    used while :func:`deterministic` is on.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with _lock:
        _IMPLS.setdefault(op_name, {})[backend] = fn
        (_NONDETERMINISTIC.discard if deterministic else _NONDETERMINISTIC.add)((op_name, backend))
    _resolve.cache_clear()
    return fn


def requested_backend() -> str:
    """The backend asked for: :func:`set_backend`'s value, else ``$FASTBERT_BACKEND``, else ``auto``."""
    name = _override if _override is not None else os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"{_ENV_VAR}={name!r} is not a fastbert backend; use one of auto, {', '.join(BACKENDS)}"
        )
    return name


def set_backend(name: str | None) -> None:
    """Select the backend for this process (``None`` goes back to ``$FASTBERT_BACKEND``).

    Takes effect for the next op call; already compiled graphs keep the kernels they traced.
    """
    global _override
    if name is not None:
        name = name.strip().lower()
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    _override = name
    _resolve.cache_clear()


def set_deterministic(enabled: bool | None) -> None:
    """Make the ops run only implementations with bitwise reproducible results (no atomics), or stop forcing it.

    ``None`` (the default) follows ``torch.are_deterministic_algorithms_enabled()``, then ``$FASTBERT_DETERMINISTIC``.
    """
    global _deterministic_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_deterministic takes True, False or None, got {enabled!r}")
    _deterministic_override = enabled


def deterministic() -> bool:
    """Whether only deterministic implementations may run: :func:`set_deterministic`, else torch's
    ``use_deterministic_algorithms`` flag, else ``$FASTBERT_DETERMINISTIC=1``."""
    if _deterministic_override is not None:
        return _deterministic_override
    if torch.are_deterministic_algorithms_enabled():
        return True
    return os.environ.get(_DETERMINISTIC_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------------------
# Availability probes: each returns (available, reason) for a device type and never raises.


def _probe_torch(device_type: str) -> tuple[bool, str]:
    return True, "plain PyTorch ops"


def _probe_triton(device_type: str) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed (pip install triton)"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return False, "Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 (slow, exact)"
        return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    return True, f"Triton on {torch.cuda.get_device_name()}"


def _probe_cuda(device_type: str) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, "the cuda backend runs CUDA tensors only"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    return _probe_extension("cuda")


def _probe_cpp(device_type: str) -> tuple[bool, str]:
    if device_type != "cpu":
        return False, "the cpp backend runs CPU tensors only"
    return _probe_extension("cpp")


def _probe_extension(backend: str) -> tuple[bool, str]:
    # The compiled extension (csrc/) registers its kernels through register_impl when it loads; until a loader
    # exists for this backend, say so instead of pretending.
    try:
        from fastbert import _ext  # noqa: F401
    except ImportError:
        return False, "the compiled extension (csrc/) is not part of this build yet"
    return _ext.probe(backend)


def _load_kernel_modules(backend: str) -> tuple[bool, str]:
    """Import every op package's kernel module for ``backend`` (they call register_impl). Packages without one
    are skipped; any other import error makes the backend unavailable, with the error as the reason."""
    module = KERNEL_MODULES.get(backend)
    if module is None:
        return True, ""
    for package in OP_PACKAGES:
        name = f"fastbert.ops.{package}.{module}"
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            return False, f"importing {name} failed: {type(exc).__name__}: {exc}"
    return True, ""


def _probe_and_load(backend: str, device_type: str) -> tuple[bool, str]:
    ok, reason = _PROBES[backend](device_type)
    if ok:
        loaded, error = _load_kernel_modules(backend)
        if not loaded:
            return False, error
    return ok, reason


_PROBES = {"torch": _probe_torch, "triton": _probe_triton, "cuda": _probe_cuda, "cpp": _probe_cpp}


@functools.cache
def _probe(backend: str, device_type: str) -> tuple[bool, str]:
    try:
        return _probe_and_load(backend, device_type)
    except Exception as exc:  # a probe must never take the model down
        return False, f"probe failed: {type(exc).__name__}: {exc}"


def _has_impl(op_name: str, backend: str) -> bool:
    return backend in _IMPLS.get(op_name, {})


@functools.cache
def _resolve(op_name: str, device_type: str, requested: str, deterministic_only: bool = False) -> tuple[str, Callable]:
    impls = _IMPLS.get(op_name)  # the live dict: probing below may register more implementations

    def usable(backend):
        return _has_impl(op_name, backend) and not (deterministic_only and (op_name, backend) in _NONDETERMINISTIC)

    if not impls or "torch" not in impls:
        raise RuntimeError(f"fastbert op {op_name!r} has no torch implementation registered (a packaging bug)")
    if requested == "auto":
        for backend in AUTO_ORDER.get(device_type, ("torch",)):
            ok, reason = _probe(backend, device_type)  # probing also loads the backend's kernel modules
            if ok and usable(backend) and (_family(op_name), device_type, backend) not in _FAILED:
                return backend, _auto_fallback(op_name, device_type, backend, impls[backend])
            if ok:
                continue
            # Warn (once) about a backend that should work but broke (it has kernels for this op, or its import or
            # build failed), not about one that simply does not apply here (no GPU, no extension in this build).
            if (_has_impl(op_name, backend) or "failed" in reason) and backend not in _warned:
                _warned.add(backend)
                warnings.warn(f"fastbert: backend {backend!r} skipped on {device_type}: {reason}", stacklevel=3)
        return "torch", impls["torch"]
    ok, reason = _probe(requested, device_type)
    if ok and not any(requested in impls_ for impls_ in _IMPLS.values()):
        ok, reason = False, f"{reason}, but no fastbert kernels are registered for the {requested} backend yet"
    if not ok:
        raise BackendUnavailableError(
            f"{_ENV_VAR}={requested} cannot run on {device_type} tensors: {reason}. "
            f"Set {_ENV_VAR}=auto (or torch) to use what is available here; fastbert.backends() lists it."
        )
    if usable(requested):
        return requested, impls[requested]
    return "torch", impls["torch"]


def _family(op_name: str) -> str:
    """attention_fwd, attention_bwd -> attention; bias_gelu_fwd_ -> bias_gelu: the ops that share dropout masks."""
    return re.sub(r"_(fwd|bwd)_?$", "", op_name)


def _raised_by_triton(exc: BaseException) -> bool:
    """A Triton compile or launch failure: the exception comes from Triton's own code (its compiler, ptxas, the
    driver's loader and launcher), not from fastbert's argument checks or an out-of-memory in torch."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    if type(exc).__module__.split(".")[0] == "triton":
        return True
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}triton{os.sep}" in tb.tb_frame.f_code.co_filename and "fastbert" not in \
                tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _dropout_p(fn: Callable, args) -> float:
    try:
        value = inspect.signature(fn).bind(*args).arguments.get("dropout_p", 0.0)
    except (TypeError, ValueError):
        return 0.0
    return float(value) if isinstance(value, (int, float)) else 0.0


def _auto_fallback(op_name: str, device_type: str, backend: str, fn: Callable) -> Callable:
    """``fn`` (``backend``'s kernel under ``auto``), falling back when its Triton kernel fails to compile or launch:
    one warning with the error, then the op family runs on the next backend of AUTO_ORDER from then on. A backward
    with dropout re-raises instead: the forward's dropout mask can only be regenerated by the forward's backend."""
    if backend != "triton":
        return fn

    def run(*args):
        try:
            return fn(*args)
        except Exception as exc:
            if not _raised_by_triton(exc):
                raise
            error = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
            if op_name.endswith("_bwd") and _dropout_p(fn, args) > 0.0:
                raise RuntimeError(
                    f"fastbert: the triton kernel of {op_name} failed and, with dropout, no other backend can "
                    f"regenerate the forward's dropout mask; set FASTBERT_BACKEND to another backend. {error}"
                ) from exc
            _FAILED[(_family(op_name), device_type, backend)] = error
            _resolve.cache_clear()
            nxt = resolved_backend(op_name, device_type)
            warnings.warn(f"fastbert: the {backend} kernel of {op_name} failed on {device_type}; {_family(op_name)} "
                          f"runs on the {nxt} backend from now on. {error}", stacklevel=3)
            return impl(op_name, device_type)(*args)

    return run


def impl(op_name: str, device_type: str) -> Callable:
    """The implementation of ``op_name`` to run on ``device_type`` tensors under the requested backend."""
    return _resolve(op_name, device_type, requested_backend(), deterministic())[1]


# Tensor types that may go straight to a kernel: plain tensors and parameters (nn.Parameter disables torch
# function handling). Subclasses (FakeTensor, FunctionalTensor, DTensor, ...) take the custom op.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# op_name -> torch.autograd.Function over the backend's kernel, built by register_autograd for eager calls.
_EAGER_AUTOGRAD: dict[str, type] = {}


def register_autograd(op, op_name: str, backward_name: str, backward: Callable, setup_context: Callable) -> None:
    """Give custom op ``op`` (kernels registered as ``op_name``) its autograd formula, twice: on the custom op, which
    compiled and traced code runs, and as a ``torch.autograd.Function`` over the backend's kernel, which
    :func:`call` runs in eager mode. Both take the same ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)``; ``backward`` runs the backward op (kernels registered as ``backward_name``) through
    :func:`call_backward`.
    """
    op.register_autograd(backward, setup_context=setup_context)

    # forward(ctx, *args) with setup_context called inside: a Function with a separate setup_context staticmethod
    # binds its arguments through inspect.signature on every apply. call() never runs this one under functorch.
    def forward(ctx, *args):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        output = impl(op_name, device)(*args)
        setup_context(ctx, args, output)
        if isinstance(output, tuple):  # every op differentiates its first output only (mean, rstd, lse are stats)
            ctx.mark_non_differentiable(*output[1:])
            ctx.set_materialize_grads(False)  # so no zero gradients are allocated for the stats
        # The backward runs the same backend as the forward (dropout masks are per backend), resolved once here.
        ctx.fastbert_backward_kernel = impl(backward_name, device)
        return output

    _EAGER_AUTOGRAD[op_name] = type(
        f"{op_name}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def call_backward(ctx, op, op_name: str, *args):
    """Run backward custom op ``op`` (kernels registered as ``op_name``) from an autograd formula: the kernel the eager
    forward resolved (see :func:`register_autograd`), else :func:`call` (compiled and traced graphs, and
    ``create_graph=True``, which these ops do not differentiate)."""
    kernel = getattr(ctx, "fastbert_backward_kernel", None)
    if kernel is not None and not torch.is_grad_enabled():
        return kernel(*args)
    return call(op, op_name, *args)


def call(op, op_name: str, *args):
    """Run custom op ``op`` (whose kernels are registered as ``op_name``) on ``args``.

    Eager calls on plain tensors and parameters go straight to the backend's kernel: through the op's
    ``torch.autograd.Function`` (see :func:`register_autograd`) when autograd must record them, else directly. The
    custom-op machinery would only add dispatch overhead there: tens of microseconds of Python per call, most of it
    cache misses once the kernels between two calls have streamed their tensors through the caches. Compilation,
    functorch transforms, torch.jit.trace and tensor subclasses (FakeTensor, DTensor) take the custom op.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    plain = bool(tensors)
    needs_grad = False
    for t in tensors:
        if type(t) not in _PLAIN_TENSORS or t.device.type == "meta":
            plain = False
            break
        needs_grad = needs_grad or t.requires_grad
    # torch.jit.trace records the custom op, not the Python around the kernel, so a trace replays it for any input.
    if (
        not plain
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
    ):
        return op(*args)
    if needs_grad and torch.is_grad_enabled():
        function = _EAGER_AUTOGRAD.get(op_name)
        return op(*args) if function is None else function.apply(*args)
    return impl(op_name, tensors[0].device.type)(*args)


def resolved_backend(op_name: str, device_type: str) -> str:
    """Name of the backend that runs ``op_name`` on ``device_type`` tensors right now."""
    return _resolve(op_name, device_type, requested_backend(), deterministic())[0]


def op_names() -> list[str]:
    return sorted(_IMPLS)


def backends(device_type: str | None = None) -> dict[str, BackendStatus]:
    """What each backend can do here: available or not (and why), and which ops it implements.

    ``device_type`` defaults to ``cuda`` when a GPU is visible, else ``cpu``.
    """
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    report = {}
    for backend in BACKENDS:
        ok, reason = _probe(backend, device_type)
        ops = [name for name in op_names() if _has_impl(name, backend)]
        if ok and not ops:
            ok, reason = False, f"{reason}; no fastbert kernels are registered for it yet"
        failed = [f"{family} ({error.splitlines()[0][:200]})" for (family, dev, name), error in _FAILED.items()
                  if dev == device_type and name == backend]
        if failed:
            reason = f"{reason}; kernels failed, auto runs the next backend for: {', '.join(failed)}"
        report[backend] = BackendStatus(backend, ok, f"[{device_type}] {reason}", ops)
    return report
