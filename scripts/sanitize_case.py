"""One fastbert op on one GPU backend at small, awkward sizes, forward and backward, for compute-sanitizer.

    python scripts/sanitize_case.py BACKEND OP      # BACKEND: triton | cuda; OP: one of CASES below

scripts/sanitize.sh runs this under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` once per
(backend, op), so every kernel family gets its own verdict. The sizes are small (the sanitizer slows kernels down
10-100x) but hit the edges: odd lengths and widths (partial tiles), head dims that are not powers of two, a
sequence with no real token, dropout on and off, every dtype. Exits non-zero if the op raises or returns a
non-finite value; the sanitizer's own findings come through its exit code.
"""

from __future__ import annotations

import os
import sys

import torch

import fastbert.ops as ops

_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# SANITIZE_DTYPES=bf16,fp32 narrows the dtypes (benchmarks/gpu_session.sh: the sanitizer stage's time budget).
DTYPES = tuple(_DTYPE_NAMES[n.strip()] for n in os.environ.get("SANITIZE_DTYPES", "fp16,bf16,fp32").split(",")
               if n.strip())


def _rand(*shape, dtype):
    return torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype).requires_grad_(True)


def _mask(batch, seqlen):
    lengths = torch.tensor([seqlen] + [max(seqlen - 3 * b, 1) for b in range(1, batch - 1)] + [0])
    return (torch.arange(seqlen)[None] < lengths[:, None]).cuda()  # the last sequence has no real token


def attention(dtype):
    for b, t, h, d in [(3, 37, 3, 64), (2, 19, 2, 40), (3, 130, 1, 128)]:
        for dropout_p in (0.0, 0.1):
            q, k, v = (_rand(b, t, h, d, dtype=dtype) for _ in range(3))
            yield ops.attention(q, k, v, _mask(b, t), dropout_p=dropout_p), (q, k, v)


def varlen_attention(dtype):
    cu = torch.tensor([0, 0, 37, 40, 169], dtype=torch.int32, device="cuda")  # an empty sequence, odd lengths
    for h, d in [(3, 64), (2, 40)]:
        for dropout_p in (0.0, 0.1):
            q, k, v = (_rand(169, h, d, dtype=dtype) for _ in range(3))
            yield ops.varlen_attention(q, k, v, cu, dropout_p=dropout_p), (q, k, v)


def add_layer_norm(dtype):
    for rows, n in [(7, 33), (5, 768), (3, 1027), (2, 4099)]:
        x, res = _rand(rows, n, dtype=dtype), _rand(rows, n, dtype=dtype)
        w, b = _rand(n, dtype=dtype), _rand(n, dtype=dtype)
        for dropout_p in (0.0, 0.1):
            yield ops.add_layer_norm(x, res, w, b, 1e-12, dropout_p), (x, res, w, b)


def bias_gelu(dtype):
    for rows, n in [(7, 33), (5, 3072), (3, 1027)]:
        x, b = _rand(rows, n, dtype=dtype), _rand(n, dtype=dtype)
        for approximate in ("none", "tanh"):
            yield ops.bias_gelu(x, b, approximate), (x, b)


def bias_gelu_layer_norm(dtype):
    for rows, n in [(7, 33), (5, 768), (3, 1027)]:
        x = _rand(rows, n, dtype=dtype)
        b, w, lb = (_rand(n, dtype=dtype) for _ in range(3))
        yield ops.bias_gelu_layer_norm(x, b, w, lb, 1e-12), (x, b, w, lb)


def softmax(dtype):
    for b, h, tq, tk in [(3, 2, 5, 37), (2, 1, 3, 1030)]:
        s = _rand(b, h, tq, tk, dtype=dtype)
        yield ops.softmax(s, _mask(b, tk), 0.125), (s,)


CASES = {f.__name__: f for f in (attention, varlen_attention, add_layer_norm, bias_gelu, bias_gelu_layer_norm,
                                 softmax)}


def check(cases: list[str]) -> int:
    """``--check backend:op ...`` (no GPU needed): 0 when every case names a GPU backend and an op here."""
    for case in cases:
        backend, _, op = case.partition(":")
        if backend not in ("triton", "cuda") or op not in CASES:
            print(f"sanitize_case.py: unknown case {case!r} (triton|cuda : {', '.join(CASES)})", file=sys.stderr)
            return 2
        print(f"would run {op} on {backend} ({', '.join(str(d).replace('torch.', '') for d in DTYPES)})")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        return check(argv[1:])
    if len(argv) != 2 or argv[1] not in CASES:
        print(__doc__, file=sys.stderr)
        return 2
    backend, op = argv
    if not torch.cuda.is_available():
        print("sanitize_case.py: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    status = ops.backends("cuda")[backend]
    if not status.available:
        print(f"sanitize_case.py: backend {backend} is not available on CUDA: {status.reason}", file=sys.stderr)
        return 2
    ops.set_backend(backend)
    torch.manual_seed(0)
    runs = 0
    for dtype in DTYPES:
        for out, inputs in CASES[op](dtype):
            out.backward(torch.randn_like(out))
            for t in (out, *(i.grad for i in inputs)):
                if not torch.isfinite(t).all():
                    print(f"sanitize_case.py: {backend} {op} {dtype}: non-finite values", file=sys.stderr)
                    return 1
            runs += 1
    torch.cuda.synchronize()
    print(f"{backend} {op}: {runs} forward+backward runs, backend {ops.resolved_backend(op + '_fwd', 'cuda')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
