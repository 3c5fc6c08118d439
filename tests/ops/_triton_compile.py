"""Compile every Triton kernel exactly as its launcher launches it, for a CUDA target, without a GPU.

The real launchers run on CPU tensors at BERT shapes while a stub Triton driver reports a CUDA target (sm_80 or
sm_90): every ``kernel[grid](...)`` call compiles the specialization the launcher asks for (argument types,
divisibility and ==1 specialization of the actual ints and pointers, constexprs, num_warps, num_stages) and returns
before launching. For each compiled kernel this records ptxas's registers and spill bytes (from the ``-v`` log of
the ptxas command Triton itself runs) and the shared memory Triton reserves (its metadata).

    python tests/ops/_triton_compile.py 80 [--full]      # one arch, JSON rows on the last line
    python tests/ops/_triton_compile.py --table          # full matrix, both archs: writes the committed table

prints one JSON list (one row per distinct compiled kernel) on its last line. ``--full`` compiles the whole matrix
(every op, fp32/fp16/bf16, head dims 32/64/80/96/128, mask or not, dropout or not, padded and varlen, forward and
backward); the default is the CI subset (``CI_CASES``), which still compiles every kernel and every distinct tile
config at least once. TRITON_INTERPRET must be unset before triton is imported, hence a separate process per arch
(tests/ops/test_triton_compile.py runs it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# The largest dynamic shared memory one block may use, per arch the configs of a compile target run on. The sm_80
# configs also run on sm_86 / sm_89 (A10, L4, L40S, RTX 30/40: 99 KB per block), so they are held to 99 KB.
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
HEAD_DIMS = (32, 64, 80, 96, 128)
# BERT shapes: bert-base (12 heads, hidden 768, FFN 3072) at batch 8 x 512 tokens; bert-large's widths for rows.
BATCH, SEQLEN, HEADS = 8, 512, 12
HIDDEN = (768, 1024)
# The CI subset (a few minutes on 2 cores): every kernel, every distinct tile config (fp32 and half, head dims 64 and
# 128, a zero-padded 80) and each code path (mask, dropout, varlen) at least once, in the combinations BERT runs.
CI_CASES = (
    "attention bf16 d64 mask dropout=True",  # training, padded layout
    "attention bf16 d64 nomask dropout=False",  # inference without padding
    "attention bf16 d64 varlen dropout=True",  # training, padding removed
    "attention bf16 d128 mask dropout=True",  # the largest tiles
    "attention bf16 d80 varlen dropout=False",  # a zero-padded head dim
    "attention bf16 d32 nomask dropout=False",  # head dim 32 has its own sm_80 configs
    "attention fp32 d32 nomask dropout=True",
    "attention fp32 d64 mask dropout=True",
    "attention fp32 d128 varlen dropout=True",
    "layer_norm bf16 n768 dropout=True",
    "bias_gelu bf16 n3072",
    "bias_gelu_layer_norm bf16 n768",
    "softmax bf16 T512 mask=True",
)


class StubDriver:
    """The part of Triton's driver interface that JITFunction.run uses before launching, for a CUDA target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def __getattr__(self, name):  # anything else would be a launch (load_binary, launcher_cls, ...)
        raise RuntimeError(f"the compile-only stub driver has no {name!r}: something tried to launch a kernel")


class _PtxasLogs:
    """Wraps the ``subprocess`` module seen by Triton's NVIDIA compiler: after each ptxas run (Triton passes ``-v``
    and a log file as stderr), keep the log's text."""

    def __init__(self):
        self.logs = []

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        result = subprocess.run(cmd, *args, **kwargs)
        log = kwargs.get("stderr")
        if "-v" in cmd and hasattr(log, "name"):
            with open(log.name) as f:
                self.logs.append(f.read())
        return result


def _ptxas_stats(log: str | None) -> dict:
    regs = re.search(r"Used (\d+) registers", log or "")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log or "")
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
    }


def install(arch: int):
    """Make every Triton launch in this process compile for ``arch`` and return without launching. Returns the list
    the compiled kernels are appended to, as (kernel name, CompiledKernel, ptxas stats, launch options)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastbert-triton-compile-")  # a cache hit skips ptxas
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the default
    import triton.backends.nvidia.compiler as nvidia_compiler
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(StubDriver(arch))
    logs = _PtxasLogs()
    nvidia_compiler.subprocess = logs
    compiled = []
    seen = {}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        before = len(logs.logs)
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)  # warmup: compile (or hit the cache), no launch
        if kernel is None:
            raise RuntimeError(f"Triton did not compile {self.fn.__name__}")
        if len(logs.logs) > before:
            seen[kernel.hash] = _ptxas_stats(logs.logs[-1])
        options = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        compiled.append((self.fn.__name__, kernel, seen.get(kernel.hash, _ptxas_stats(None)), options))
        return kernel

    JITFunction.run = compile_only
    return compiled


# --------------------------------------------------------------------------------------------------------------
# the cases: each runs real launchers on CPU tensors (never touched: torch.empty) at BERT shapes


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def attention_cases(dtypes, head_dims):
    """(label, thunk) per attention variant: forward then backward through the launchers, as the model calls them
    (q, k, v strided views of one (B, T, 3, H, D) projection)."""
    import torch

    from fastbert.ops.attention import triton as fw
    from fastbert.ops.attention import triton_bwd as bw

    seed = torch.tensor([1234], dtype=torch.int64)
    for dt, d, mode, dropout in itertools.product(dtypes, head_dims, ("mask", "nomask", "varlen"), (0.0, 0.1)):
        def thunk(dt=dt, d=d, mode=mode, dropout=dropout):
            dtype = _dtype(dt)
            if mode == "varlen":
                total = BATCH * SEQLEN * 3 // 4  # sequences of mixed lengths up to SEQLEN, packed
                q, k, v = torch.empty(total, 3, HEADS, d, dtype=dtype).unbind(1)
                cu = torch.linspace(0, total, BATCH + 1).to(torch.int32)
                args, cu, max_seqlen = (None,), cu, SEQLEN
            else:
                q, k, v = torch.empty(BATCH, SEQLEN, 3, HEADS, d, dtype=dtype).unbind(2)
                mask = torch.ones(BATCH, SEQLEN, dtype=torch.bool) if mode == "mask" else None
                args, cu, max_seqlen = (mask,), None, 0
            out, lse = fw.launch_fwd(q, k, v, *args, cu, max_seqlen, dropout, d**-0.5, seed)
            bw.launch_bwd(torch.empty_like(out), q, k, v, out, lse, *args, cu, max_seqlen, dropout, d**-0.5, seed)
        yield f"attention {dt} d{d} {mode} dropout={dropout > 0}", thunk


def row_cases(dtypes, hidden):
    """LayerNorm (+ residual, + dropout), bias + GELU (out of place, in place, backward), bias + GELU + LayerNorm,
    softmax (mask or not): forward and backward at (B * T, hidden) rows and (B, H, T, T) scores."""
    import torch

    from fastbert.ops.bias_gelu import triton as bg
    from fastbert.ops.layer_norm import triton as ln
    from fastbert.ops.softmax import triton as sm

    seed = torch.tensor([99], dtype=torch.int64)
    rows = BATCH * SEQLEN
    for dt, n in itertools.product(dtypes, hidden):
        dtype = _dtype(dt)

        def layer_norm(dropout, dtype=dtype, n=n):
            x, res, dout = (torch.empty(rows, n, dtype=dtype) for _ in range(3))
            w, b = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
            out, mean, rstd = ln._add_layer_norm_fwd_triton(x, res, w, b, 1e-12, dropout, seed)
            ln._add_layer_norm_bwd_triton(dout, x, res, w, b, mean, rstd, dropout, seed)

        def gelu(dtype=dtype, n=n):
            x, dout = torch.empty(rows, 4 * n, dtype=dtype), torch.empty(rows, 4 * n, dtype=dtype)
            bias = torch.empty(4 * n, dtype=dtype)
            bg._bias_gelu_fwd_triton(x, bias, "none")
            bg._bias_gelu_fwd_inplace_triton(x, bias, "none")
            bg._bias_gelu_bwd_triton(dout, x, bias, "none", True)

        def gelu_layer_norm(dtype=dtype, n=n):
            x, dout = torch.empty(rows, n, dtype=dtype), torch.empty(rows, n, dtype=dtype)
            b, w, lb = (torch.empty(n, dtype=dtype) for _ in range(3))
            out, mean, rstd = bg._bias_gelu_layer_norm_fwd_triton(x, b, w, lb, 1e-12, "none")
            bg._bias_gelu_layer_norm_bwd_triton(dout, x, b, w, lb, mean, rstd, "none", True)

        def softmax(masked, dtype=dtype):
            s = torch.empty(BATCH, HEADS, SEQLEN, SEQLEN, dtype=dtype)
            mask = torch.ones(BATCH, SEQLEN, dtype=torch.bool) if masked else None
            probs = sm._softmax_fwd_triton(s, mask, 0.125)
            sm._softmax_bwd_triton(torch.empty_like(probs), probs, 0.125)

        yield f"layer_norm {dt} n{n} dropout=False", lambda f=layer_norm: f(0.0)
        yield f"layer_norm {dt} n{n} dropout=True", lambda f=layer_norm: f(0.1)
        yield f"bias_gelu {dt} n{4 * n}", gelu
        yield f"bias_gelu_layer_norm {dt} n{n}", gelu_layer_norm
        if n == hidden[0]:  # scores do not depend on the hidden size
            yield f"softmax {dt} T{SEQLEN} mask=True", lambda f=softmax: f(True)
            yield f"softmax {dt} T{SEQLEN} mask=False", lambda f=softmax: f(False)


def compile_all(arch: int, full: bool) -> list[dict]:
    """Compile every case for ``arch``; one row per distinct compiled kernel, with the cases that launch it."""
    compiled = install(arch)
    from fastbert.ops.attention import triton as fw

    # The launchers take the tile config of the tensors' GPU; these CPU tensors stand for a GPU of `arch`.
    fw.target_arch = lambda t: arch
    from fastbert.ops.attention import triton_bwd as bw

    bw.target_arch = fw.target_arch
    rows: dict[str, dict] = {}
    for label, thunk in itertools.chain(attention_cases(DTYPES, HEAD_DIMS), row_cases(DTYPES, HIDDEN)):
        if not full and label not in CI_CASES:
            continue
        start = len(compiled)
        t0 = time.perf_counter()
        thunk()
        seconds = time.perf_counter() - t0
        for name, kernel, stats, options in compiled[start:]:
            row = rows.get(kernel.hash)
            if row is None:
                meta = kernel.metadata
                row = rows[kernel.hash] = dict(
                    arch=arch, kernel=name, cases=[], shared=meta.shared, shared_limit=SHARED_LIMIT[arch],
                    num_warps=meta.num_warps, num_stages=meta.num_stages, compile_s=round(seconds, 2),
                    constexprs={k: v for k, v in options.items() if k not in ("num_warps", "num_stages")}, **stats)
            if label not in row["cases"]:
                row["cases"].append(label)
    return list(rows.values())


def failures(rows) -> list[str]:
    """Rows that spill, whose ptxas report is missing, or that need more shared memory than the arch allows."""
    bad = []
    for r in rows:
        if r["spill_stores"] is None or r["registers"] is None:
            bad.append(f"no ptxas report: {describe(r)}")
        elif r["spill_stores"] or r["spill_loads"]:
            bad.append(f"spills: {describe(r)}")
        if r["shared"] > r["shared_limit"]:
            bad.append(f"shared memory {r['shared']} B > {r['shared_limit']} B: {describe(r)}")
    return bad


def tiles(r) -> str:
    """The tile constexprs, e.g. "M128 N64 D64" (attention) or "ROWS4 N1024" (row kernels)."""
    c = r["constexprs"]
    return " ".join(f"{short}{c[k]}" for k, short in (("BLOCK_M", "M"), ("ROWS", "ROWS"), ("BLOCK_N", "N"),
                                                     ("BLOCK_D", "D")) if k in c)


def describe(r) -> str:
    return (f"sm_{r['arch']} {r['kernel']} [{tiles(r)}, {r['num_warps']} warps, {r['num_stages']} stages]: "
            f"{r['registers']} regs, spill {r['spill_stores']}/{r['spill_loads']} B, shared {r['shared']} B; "
            f"{r['cases'][0]}" + (f" (+{len(r['cases']) - 1} cases)" if len(r["cases"]) > 1 else ""))


TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                     "results", "triton-compile-sm80-sm90")


def run_archs(full: bool, archs=ARCHS, timeout: float = 3600) -> tuple[list[dict], dict[int, float]]:
    """Compile for every arch, one subprocess each (in parallel); returns (rows, seconds per arch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__)]
    t0 = time.perf_counter()
    procs = {arch: subprocess.Popen([*cmd, str(arch), *(["--full"] if full else [])], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=repo) for arch in archs}
    rows, seconds = [], {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling for sm_{arch} failed:\n{err[-6000:]}")
        rows += json.loads(out.strip().splitlines()[-1])
        seconds[arch] = round(time.perf_counter() - t0, 1)
    return rows, seconds


def write_table(rows, seconds, path=TABLE) -> None:
    """The committed record: path.json (every row) and path.md (one line per compiled kernel)."""
    import torch
    import triton

    meta = dict(triton=triton.__version__, torch=torch.__version__, shared_limit=SHARED_LIMIT, seconds=seconds,
                shapes=dict(batch=BATCH, seqlen=SEQLEN, heads=HEADS, hidden=HIDDEN), failures=failures(rows))
    with open(path + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [
        "# Triton kernels compiled as launched, sm_80 and sm_90",
        "",
        f"Generated by `python tests/ops/_triton_compile.py --table` (Triton {triton.__version__}, no GPU): every "
        "launcher at BERT shapes (batch 8 x 512 tokens, 12 heads; hidden 768 and 1024), fp32/fp16/bf16, head dims "
        "32/64/80/96/128, mask or not, dropout or not, padded and varlen, forward and backward. One line per distinct "
        "compiled kernel; `cases` counts the launches that compile to it. Shared memory limit per block: "
        f"{SHARED_LIMIT[80]} B for the sm_80 configs (they also run on sm_86/sm_89), {SHARED_LIMIT[90]} B on sm_90. "
        f"Failures (spills, shared memory over the limit): {len(meta['failures'])}.",
        "",
        "| arch | kernels | with spills | most registers | most shared B (limit) | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch]
        spilled = sum(1 for r in mine if r["spill_stores"] or r["spill_loads"])
        spent = seconds.get(arch, seconds.get(str(arch), "?"))  # JSON turns the int keys into strings
        lines.append(f"| sm_{arch} | {len(mine)} | {spilled} | {max(r['registers'] or 0 for r in mine)} | "
                     f"{max(r['shared'] for r in mine)} ({SHARED_LIMIT[arch]}) | {spent} |")
    lines += [
        "",
        "| arch | kernel | first case | cases | tiles | warps | stages | registers | spill st/ld B | shared B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["cases"][0])):
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['cases'][0]} | {len(r['cases'])} | {tiles(r)} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_stores']}/"
                     f"{r['spill_loads']} | {r['shared']} |")
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", type=int, nargs="?", choices=ARCHS)
    parser.add_argument("--full", action="store_true", help="the whole matrix (default: the CI subset)")
    parser.add_argument("--table", action="store_true",
                        help="full matrix for sm_80 and sm_90, written to benchmarks/results/triton-compile-sm80-sm90")
    parser.add_argument("--out", default=TABLE, help="the table's path without .md / .json (with --table)")
    args = parser.parse_args(argv)
    if args.table:
        rows, seconds = run_archs(full=True)
        write_table(rows, seconds, args.out)
        print(f"{len(rows)} kernels, {len(failures(rows))} failures; seconds per arch {seconds}")
        for line in failures(rows):
            print(line)
        return 1 if failures(rows) else 0
    if args.arch is None:
        parser.error("give an arch (80 or 90), or --table")
    t0 = time.perf_counter()
    rows = compile_all(args.arch, args.full)
    import triton

    print(f"sm_{args.arch}: {len(rows)} kernels compiled in {time.perf_counter() - t0:.0f} s (Triton "
          f"{triton.__version__})", file=sys.stderr)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
