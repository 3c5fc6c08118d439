"""Rough timings of the CUDA launchers at BERT shapes through the ctypes harness (CUDA events, median of N runs).

Not a test (pytest does not collect it) and not the project's benchmark suite (benchmarks/): a quick look at the
kernels on a GPU machine before the torch binding exists. Prints time, effective GB/s (bytes the op must move)
or TFLOP/s (attention: 4 * B * H * Tq * Tk * D forward, 2.5x that backward).

    python tests/cuda/bench_kernels.py [--dtype float16] [--batch 32] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics

import numpy as np
from harness import DTYPES, F32, GELU, Lib, Strides, Tensor, build_library, gpu_available


def timed(lib: Lib, fn, reps: int = 20) -> float:
    """Median milliseconds of fn() (which returns a cudaError_t) over reps runs after 3 warm-ups."""
    for _ in range(3):
        lib.check(fn())
    start, stop = lib.fbh_event_create(), lib.fbh_event_create()
    times = []
    for _ in range(reps):
        lib.fbh_event_record(start)
        err = fn()
        lib.fbh_event_record(stop)
        if err:
            raise RuntimeError(f"launch failed: {err}")
        times.append(lib.fbh_event_elapsed_ms(start, stop))
    lib.fbh_event_destroy(start)
    lib.fbh_event_destroy(stop)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    args = ap.parse_args()
    if not gpu_available():
        raise SystemExit("no CUDA GPU visible")
    lib = Lib(build_library())
    name = device_name(lib)
    dt = DTYPES[args.dtype]
    b, t, hid, h = args.batch, args.seqlen, args.hidden, args.heads
    d, rows, inter = hid // h, b * t, 4 * hid
    rng = np.random.default_rng(0)
    print(f"{name}  dtype={dt}  batch={b} seqlen={t} hidden={hid} heads={h}")

    def row(op: str, ms: float, nbytes: float | None = None, flops: float | None = None) -> None:
        rate = f"{nbytes / ms / 1e6:8.1f} GB/s" if nbytes else f"{flops / ms / 1e9:8.1f} TFLOP/s"
        print(f"  {op:34s} {ms * 1e3:9.1f} us  {rate}")

    x = Tensor.from_values(lib, rng.standard_normal((rows, hid)), dt)
    r = Tensor.from_values(lib, rng.standard_normal((rows, hid)), dt)
    w = Tensor.from_values(lib, np.ones(hid), dt)
    out, mean, rstd = Tensor(lib, (rows, hid), dt), Tensor(lib, (rows,), F32), Tensor(lib, (rows,), F32)
    es = dt.itemsize
    for p in (0.0, 0.1):
        ms = timed(lib, lambda p=p: lib.fastbert_add_layer_norm_fwd(out.ptr, mean.ptr, rstd.ptr, x.ptr, r.ptr, w.ptr,
                                                                    w.ptr, rows, hid, 1e-12, p, 1, dt.code, dt.code,
                                                                    None))
        row(f"add_layer_norm_fwd p={p}", ms, 3 * rows * hid * es)
    ws_bytes = lib.fastbert_layer_norm_bwd_workspace_size(rows, hid)
    ws = Tensor(lib, (ws_bytes // 4,), F32)
    dx, dres = Tensor(lib, (rows, hid), dt), Tensor(lib, (rows, hid), dt)
    dw, db = Tensor(lib, (hid,), dt), Tensor(lib, (hid,), dt)
    ms = timed(lib, lambda: lib.fastbert_add_layer_norm_bwd(dx.ptr, dres.ptr, dw.ptr, db.ptr, out.ptr, x.ptr, r.ptr,
                                                            w.ptr, mean.ptr, rstd.ptr, rows, hid, 0.1, 1, ws.ptr,
                                                            ws_bytes, dt.code, dt.code, None))
    row("add_layer_norm_bwd p=0.1", ms, 5 * rows * hid * es)

    xi = Tensor.from_values(lib, rng.standard_normal((rows, inter)), dt)
    bi = Tensor.from_values(lib, rng.standard_normal(inter), dt)
    oi = Tensor(lib, (rows, inter), dt)
    for approx in ("none", "tanh"):
        ms = timed(lib, lambda a=approx: lib.fastbert_bias_gelu_fwd(oi.ptr, xi.ptr, bi.ptr, rows, inter, GELU[a],
                                                                     dt.code, dt.code, None))
        row(f"bias_gelu_fwd {approx}", ms, 2 * rows * inter * es)
    ms = timed(lib, lambda: lib.fastbert_bias_gelu_bwd(oi.ptr, xi.ptr, xi.ptr, bi.ptr, rows, inter, 0, dt.code,
                                                       dt.code, None))
    row("bias_gelu_bwd none", ms, 3 * rows * inter * es)

    sb = min(b, 8)  # the scores tensor is B * H * T * T
    sc = Tensor.from_values(lib, rng.standard_normal((sb, h, t, t)), dt)
    pr = Tensor(lib, (sb, h, t, t), dt)
    ms = timed(lib, lambda: lib.fastbert_softmax_fwd(pr.ptr, sc.ptr, None, t, sb, h, t, t, 0.125, dt.code, None))
    row(f"softmax_fwd (batch {sb})", ms, 2 * sb * h * t * t * es)
    ms = timed(lib, lambda: lib.fastbert_softmax_bwd(sc.ptr, pr.ptr, pr.ptr, sb * h * t, t, 0.125, dt.code, None))
    row(f"softmax_bwd (batch {sb})", ms, 3 * sb * h * t * t * es)

    q, k, v = (Tensor.from_values(lib, rng.standard_normal((b, t, h, d)), dt) for _ in range(3))
    o, lse = Tensor(lib, (b, t, h, d), dt), Tensor(lib, (b, h, t), F32)
    s = Strides(t * h * d, h * d, d)
    flops = 4.0 * b * h * t * t * d
    for p in (0.0, 0.1):
        ms = timed(lib, lambda p=p: lib.fastbert_attention_fwd(o.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, None, b, t, t, h,
                                                               d, s, s, s, s, t, d**-0.5, p, 1, dt.code, None))
        row(f"attention_fwd p={p}", ms, flops=flops)
    aws = lib.fastbert_attention_bwd_workspace_size(b, h, t)
    wsa = Tensor(lib, (aws // 4,), F32)
    gq, gk, gv = (Tensor(lib, (b, t, h, d), dt) for _ in range(3))
    ms = timed(lib, lambda: lib.fastbert_attention_bwd(gq.ptr, gk.ptr, gv.ptr, o.ptr, q.ptr, k.ptr, v.ptr, o.ptr,
                                                       lse.ptr, None, b, t, t, h, d, s, s, s, s, s, s, s, s, t,
                                                       d**-0.5, 0.0, 1, wsa.ptr, aws, dt.code, None))
    row("attention_bwd p=0", ms, flops=2.5 * flops)


def device_name(lib: Lib) -> str:
    buf = ctypes.create_string_buffer(256)
    return buf.value.decode() if lib.fbh_device_name(buf, 256) == 0 else "unknown device"


if __name__ == "__main__":
    main()
