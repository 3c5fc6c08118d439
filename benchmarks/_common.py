"""Shared machinery of the per-op benchmark suites (benchmarks/bench_<op>.py).

One benchmark is one (case, provider). A case is an op, a direction (fwd or bwd), a shape, a dtype and a variant
(e.g. half the keys padded); a provider is one way to compute it:

- ``fastbert-<backend>``: fastbert's op under each backend that ``fastbert.ops.backends(device)`` reports available
  and that implements the op (``set_backend`` around the benchmark, restored after). On CPU the ``triton`` backend
  is the Triton interpreter (``TRITON_INTERPRET=1``), so it only gets the tiny cases.
- ``torch-eager``: the same op composed of plain PyTorch ops in the case's dtype (what transformers does); its
  error against the reference is the yardstick of the correctness rule below.
- ``torch-sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (attention only).
- ``numpy-f64``: the float64 NumPy reference itself, on CPU and tiny cases only (it is seconds per call otherwise).

All providers of a case share one pytest-benchmark group, so the table compares them side by side. Before timing,
each provider's output is compared with the float64 reference (once per case, untimed); a fastbert provider must
satisfy the DESIGN rule ``max|out - ref| <= 2 * max|torch_eager - ref| + atol`` or its benchmark fails.

Timing: ``benchmark.pedantic`` with a fixed number of rounds after a warm-up. On GPU the benchmark mark swaps in
:func:`cuda_event_timer` (GPU time between CUDA events, no host sync inside the measurement) and every round first
flushes L2, so no input is served from cache. On CPU the default perf_counter timer runs at the torch thread count
that conftest.py sets and reports.

Environment knobs: FASTBERT_BENCH_THREADS (torch threads), FASTBERT_BENCH_DTYPES (e.g. "fp32" or "bf16,fp16"),
FASTBERT_BENCH_ROUNDS / FASTBERT_BENCH_WARMUP (per benchmark; ``--benchmark-min-rounds`` can only raise the rounds),
TRITON_INTERPRET=1 (adds the Triton backend to the tiny CPU cases, when it has kernels for the op).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fastbert.bench.timing import flush_l2
from fastbert.ops import backends, resolved_backend, set_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# Added to 2x torch-eager's own error: about one unit in the last place at the O(1) values these ops produce, so
# that an equally accurate kernel which rounds differently still passes.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

FASTBERT = "fastbert-"
TORCH_EAGER = "torch-eager"
TORCH_SDPA = "torch-sdpa"
NUMPY_REF = "numpy-f64"
DIRECTIONS = ("fwd", "bwd")
# Outputs that sum over every row (parameter gradients): not comparable on a row subset, see Case.ref_rows.
_ROW_REDUCTIONS = ("dweight", "dbias", "dln_bias")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _env_dtypes() -> tuple[torch.dtype, ...]:
    names = os.environ.get("FASTBERT_BENCH_DTYPES", "").replace(",", " ").split()
    if not names:
        # Half precision is what a GPU runs; on CPU fp32 is the default and bf16 has AMX/AVX512-BF16 kernels.
        return (torch.bfloat16, torch.float16) if ON_GPU else (torch.float32, torch.bfloat16)
    unknown = [n for n in names if n not in _DTYPES_BY_NAME]
    if unknown:
        raise ValueError(f"FASTBERT_BENCH_DTYPES has {unknown}; use a comma list of {', '.join(_DTYPES_BY_NAME)}")
    return tuple(_DTYPES_BY_NAME[n] for n in names)


DTYPES = _env_dtypes()
ROUNDS = _env_int("FASTBERT_BENCH_ROUNDS", 100 if ON_GPU else 25)
WARMUP = _env_int("FASTBERT_BENCH_WARMUP", 10 if ON_GPU else 3)
# The NumPy reference and the Triton interpreter take milliseconds to seconds even at tiny sizes; a few rounds
# place them in the table without letting them dominate the run.
SLOW_ROUNDS, SLOW_WARMUP = 3, 1


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------------------
# cases and providers


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # fastbert op family: "attention", "add_layer_norm", "bias_gelu", "bias_gelu_layer_norm", "softmax"
    direction: str  # "fwd" or "bwd"
    shape: tuple[int, ...]  # the main input's shape, in the op's documented layout
    dtype: torch.dtype
    variant: str = ""  # e.g. "pad50": half of all keys are padding
    tiny: bool = False  # small enough for the NumPy reference and the Triton interpreter
    # Compare with the reference on this many evenly spaced indices of dim 0 (batch or token rows) instead of all:
    # keeps the float64 NumPy reference to seconds at GPU sizes. Rows are independent in every op here except the
    # parameter gradients, which are then left out of the comparison (tests/ checks them).
    ref_rows: int | None = None

    @property
    def op_names(self) -> tuple[str, ...]:
        # A backward benchmark also runs the forward (untimed) for the saved tensors: both must be the backend's own.
        return (f"{self.op}_fwd",) if self.direction == "fwd" else (f"{self.op}_fwd", f"{self.op}_bwd")

    @property
    def label(self) -> str:
        parts = ["x".join(map(str, self.shape)), DTYPE_NAMES[self.dtype], self.variant]
        return "-".join(p for p in parts if p)

    @property
    def group(self) -> str:
        return f"{self.op} {self.direction} {self.label}"


def make_cases(op: str, shapes, tiny_shapes=(), ref_rows: int | None = None) -> list[Case]:
    """Cases of ``op`` for the device: ``shapes`` x DTYPES x (fwd, bwd), plus ``tiny_shapes`` in fp32 on CPU.

    ``shapes``/``tiny_shapes``: (shape, variant) pairs. Tiny cases carry the NumPy reference and the Triton
    interpreter as extra providers; on GPU they are left out (the real shapes are the point there).
    """
    cases = [
        Case(op, direction, tuple(shape), dtype, variant, ref_rows=ref_rows)
        for shape, variant in shapes
        for dtype in DTYPES
        for direction in DIRECTIONS
    ]
    if not ON_GPU:
        cases += [
            Case(op, direction, tuple(shape), torch.float32, variant, tiny=True)
            for shape, variant in tiny_shapes
            for direction in DIRECTIONS
        ]
    return cases


def fastbert_providers(case: Case) -> list[str]:
    """``fastbert-<backend>`` for each backend available here that implements every op the case runs.

    An explicitly selected backend without the op would silently run the torch implementation, so it is left out
    instead of being timed under a misleading name.
    """
    names = []
    for name, status in backends(DEVICE.type).items():
        if not status.available or not all(op in status.ops for op in case.op_names):
            continue
        if name == "triton" and not ON_GPU and not case.tiny:
            continue  # the Triton interpreter: exact but ~1000x slower than compiled code
        names.append(FASTBERT + name)
    return names


def bench_params(cases: list[Case], baselines: tuple[str, ...] = (TORCH_EAGER,)) -> list:
    """(case, provider) parameters, case-major: a case's providers run back to back, so they see the same machine
    state and share one reference computation. Each carries its case's benchmark group (and the GPU timer)."""
    mark_kwargs = {"timer": cuda_event_timer} if ON_GPU else {}
    params = []
    for case in cases:
        providers = fastbert_providers(case) + list(baselines) + ([NUMPY_REF] if case.tiny else [])
        marks = pytest.mark.benchmark(group=case.group, **mark_kwargs)
        params += [pytest.param(case, p, id=f"{case.direction}-{case.label}-{p}", marks=marks) for p in providers]
    return params


@contextlib.contextmanager
def use_backend(provider: str, case: Case):
    """Run fastbert's ops under the provider's backend; back to ``$FASTBERT_BACKEND`` (the process default) after."""
    if not provider.startswith(FASTBERT):
        yield None
        return
    name = provider[len(FASTBERT) :]
    set_backend(name)
    try:
        for op in case.op_names:
            actual = resolved_backend(op, DEVICE.type)
            if actual != name:
                pytest.skip(f"fastbert.ops {op} resolves to {actual!r}, not {name!r}, on {DEVICE.type}")
        yield name
    finally:
        set_backend(None)


# --------------------------------------------------------------------------------------------------------------
# inputs and references


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(shape, dtype: torch.dtype, gen: torch.Generator, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    # Drawn in fp32 on the device, then cast: every dtype of a shape sees the same values up to rounding, and GPU
    # sizes do not go through a host copy.
    return (torch.randn(tuple(shape), generator=gen, device=DEVICE) * std + mean).to(dtype)


def key_padding_mask(batch: int, seqlen: int, variant: str) -> torch.Tensor | None:
    """(batch, seqlen) bool, True for real tokens, or None. ``pad50``: sequence i keeps ceil(seqlen*(i+1)/(batch+1))
    tokens, so about half of all keys are padding, lengths are spread out and no sequence is empty."""
    if variant != "pad50":
        return None
    lengths = torch.ceil(seqlen * torch.arange(1, batch + 1, dtype=torch.float64) / (batch + 1))
    return (torch.arange(seqlen)[None, :] < lengths[:, None]).to(DEVICE)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """transformers' extended attention mask, (batch, 1, 1, seqlen): 0 on real keys, dtype's min on padding."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    return t.detach().cpu().numpy() if t.dtype == torch.bool else t.detach().to(torch.float64).cpu().numpy()


def subset(a, case: Case):
    """``a`` restricted to ``case.ref_rows`` evenly spaced indices of dim 0 (identity when ref_rows is None)."""
    if a is None or case.ref_rows is None or a.shape[0] <= case.ref_rows:
        return a
    idx = np.linspace(0, a.shape[0] - 1, case.ref_rows).round().astype(np.int64)
    return a[torch.as_tensor(idx, device=a.device)] if isinstance(a, torch.Tensor) else a[idx]


def ref_inputs(case: Case, inputs: dict, names) -> list:
    """The named inputs as float64 NumPy arrays on the reference rows (parameters are 1-D: never subset)."""
    return [
        to_numpy(inputs[n]) if inputs[n] is None or inputs[n].dim() == 1 else to_numpy(subset(inputs[n], case))
        for n in names
    ]


def drop_row_reductions(ref: dict, case: Case) -> dict:
    return ref if case.ref_rows is None else {k: v for k, v in ref.items() if k not in _ROW_REDUCTIONS}


def autograd_backward(forward: Callable, leaves: dict, dout: torch.Tensor) -> Callable[[], dict]:
    """The backward of a plain-PyTorch composition as autograd runs it: the graph is built once (untimed); each
    call re-runs ``torch.autograd.grad`` on the retained graph. Returns ``{"d" + leaf name: gradient}``."""
    leaves = {name: t.detach().requires_grad_() for name, t in leaves.items()}
    out = forward(**leaves)
    names, tensors = list(leaves), list(leaves.values())

    def backward():
        grads = torch.autograd.grad(out, tensors, dout, retain_graph=True)
        return {"d" + name: g for name, g in zip(names, grads, strict=True)}

    return backward


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def max_abs_diff(outputs: dict, ref: dict, case: Case) -> float:
    """max |out - ref| over every reference output; NaN anywhere counts as infinitely wrong."""
    worst = 0.0
    for name, expected in ref.items():
        got = outputs[name]
        got = to_numpy(subset(got, case)) if isinstance(got, torch.Tensor) else np.asarray(got, dtype=np.float64)
        if got.shape != expected.shape:
            raise AssertionError(f"{case.group}: output {name} has shape {got.shape}, reference {expected.shape}")
        diff = np.abs(got - expected)
        worst = max(worst, float(np.where(np.isnan(diff), np.inf, diff).max(initial=0.0)))
    return worst


# --------------------------------------------------------------------------------------------------------------
# timing and ceilings


class _CudaStamp:
    """A CUDA event recorded on the current stream; ``end - start`` waits for ``end`` and returns the GPU time
    between the two events in seconds, which is what pytest-benchmark stores for a round."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, start: _CudaStamp) -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) * 1e-3


def cuda_event_timer() -> _CudaStamp:
    """pytest-benchmark timer (the benchmark mark's ``timer=``) for GPU work: perf_counter around an asynchronous
    launch would time the launch, and a host sync inside the round would add its ~10 us to kernels of ~30 us."""
    return _CudaStamp()


def _flush_l2():
    # pedantic's setup: runs before each round, outside the timed region; it returns no arguments.
    flush_l2(DEVICE)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What a bench_<op>.py module gives :func:`run_case`; every callable takes the Case (and the inputs dict)."""

    make_inputs: Callable[[Case], dict]  # seeded random tensors on DEVICE; "dout" too for bwd cases
    build: Callable[[str, Case, dict], Callable[[], dict]]  # provider -> the zero-arg callable to time -> outputs
    reference: Callable[[Case, dict], dict]  # float64 outputs on the reference rows, same names as build's
    work: Callable[[Case, dict], tuple[str, float]]  # ("bytes", read + written) or ("flops", useful FLOPs)


def run_case(benchmark, env, spec: OpSpec, case: Case, provider: str) -> None:
    """Check the provider against the float64 reference (untimed), time it, and fill ``benchmark.extra_info``.

    ``env``: conftest.py's session BenchEnv (torch threads, min rounds, ceilings, the current case's reference).
    """
    inputs = spec.make_inputs(case)

    def reference_and_baseline():
        ref = spec.reference(case, inputs)
        return ref, max_abs_diff(spec.build(TORCH_EAGER, case, inputs)(), ref, case)

    ref, torch_err = env.reference(case, reference_and_baseline)
    slow = provider == NUMPY_REF or (provider == FASTBERT + "triton" and not ON_GPU)
    info = benchmark.extra_info
    with use_backend(provider, case) as backend:
        fn = spec.build(provider, case, inputs)
        diff = max_abs_diff(fn(), ref, case)  # also the first call: compilation and caches stay out of the timing
        tolerance = 2 * torch_err + ATOL[case.dtype]
        info.update(
            op=case.op,
            direction=case.direction,
            provider=provider,
            backend=backend,
            shape=list(case.shape),
            variant=case.variant,
            dtype=DTYPE_NAMES[case.dtype],
            device=device_name(),
            torch_threads=env.threads,
            max_diff=diff,
            torch_eager_max_diff=torch_err,
            tolerance=tolerance,
            ref_rows=case.ref_rows,
        )
        if provider.startswith(FASTBERT):
            assert diff <= tolerance, (
                f"{provider} {case.group}: max|out - ref| = {diff:.3g} > 2 * {torch_err:.3g} (torch-eager) + "
                f"{ATOL[case.dtype]:g}"
            )
        benchmark.pedantic(
            fn,
            setup=_flush_l2 if ON_GPU else None,
            rounds=SLOW_ROUNDS if slow else max(ROUNDS, env.min_rounds),
            warmup_rounds=SLOW_WARMUP if slow else WARMUP,
        )
    if not benchmark.stats:  # --benchmark-disable: the target ran once, nothing was timed
        return
    median = benchmark.stats["median"]
    kind, amount = spec.work(case, inputs)
    info["median_ms"] = median * 1e3
    if kind == "bytes":
        rate, ceiling = amount / median / 1e9, env.ceilings.copy_gbs()
        info.update(bytes=amount, gb_per_s=rate, ceiling_copy_gb_per_s=ceiling)
    else:
        rate, ceiling = amount / median / 1e12, env.ceilings.matmul_tflops(case.dtype)
        info.update(flops=amount, tflop_per_s=rate, ceiling_matmul_tflop_per_s=ceiling)
    info["fraction_of_ceiling"] = rate / ceiling if ceiling > 0 and math.isfinite(ceiling) else None
