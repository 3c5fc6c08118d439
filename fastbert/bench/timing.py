"""Timing primitives for ``fastbert bench``: CUDA events on GPU, perf_counter on CPU, medians and percentiles,
and the hardware ceilings (matmul rate, copy bandwidth) measured in the same run."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn, device: torch.device) -> float:
    """Wall time of one call in ms: CUDA events around the call on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> dict:
    return {
        "median_ms": statistics.median(samples_ms),
        "p10_ms": percentile(samples_ms, 0.10),
        "p90_ms": percentile(samples_ms, 0.90),
        "samples": len(samples_ms),
    }


def flush_l2(device: torch.device, _cache={}) -> None:  # noqa: B006 - one scratch buffer per device
    """Overwrite a buffer larger than any L2 (256 MiB) so that no input stays cached between GPU timings."""
    if device.type != "cuda":
        return
    buf = _cache.get(device)
    if buf is None:
        buf = _cache[device] = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
    buf.zero_()


def time_alternating(fns: dict, device: torch.device, warmup: int, repeats: int, progress=None,
                     warm_below_ms: float = 100.0, settle_s: float | None = None) -> dict:
    """Time every callable in ``fns`` ``repeats`` times, alternating A B C A B C so that drift (thermal, other
    load) hits every provider alike. On CPU each provider's turn starts after ``settle_s`` (default 50 ms) of
    sleep, so that the previous runtime's worker threads, which spin for a while after a call (OpenMP's, TBB's),
    have gone idle instead of sharing the cores with the call being timed. A provider whose last call took under
    ``warm_below_ms`` also gets an untimed call right before each timed one, so that no short call is timed cold.
    Returns {name: summarize(samples)} plus ``warm_calls``, the untimed calls made between timed ones."""
    if settle_s is None:
        settle_s = 0.05 if device.type == "cpu" else 0.0
    last_ms = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            last_ms[name] = time_once_ms(fn, device)
        synchronize(device)
    samples = {name: [] for name in fns}
    warm_calls = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle_s and len(fns) > 1:
                time.sleep(settle_s)
            if last_ms.get(name, float("inf")) < warm_below_ms:
                fn()
                synchronize(device)
                warm_calls[name] += 1
            flush_l2(device)
            last_ms[name] = time_once_ms(fn, device)
            samples[name].append(last_ms[name])
            if progress is not None:
                progress.update(1)
    return {name: {**summarize(values), "warm_calls": warm_calls[name]} for name, values in samples.items()}


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The rate of one large matmul here, in TFLOP/s: the ceiling every model figure is read against."""
    n = 8192 if device.type == "cuda" else 2048
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32 if dtype == torch.float16 else dtype
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = min(time_once_ms(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / (best * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling for memory-bound ops."""
    numel = (512 if device.type == "cuda" else 64) * 1024 * 1024 // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = min(time_once_ms(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.numel() * 4 / (best * 1e-3) / 1e9


def idle_cpu_ms_after_call(fn, window_s: float = 0.05) -> float:
    """CPU time (ms, all threads of this process) burnt during a ``window_s`` sleep right after ``fn()``: what a
    runtime's spinning worker threads would take from whatever runs next."""
    fn()
    start = time.process_time()
    time.sleep(window_s)
    return (time.process_time() - start) * 1e3
