"""The ``fastbert`` command (also ``python -m fastbert``)."""

from __future__ import annotations

import argparse
import sys


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark fastbert against transformers and the NumPy reference on this machine",
        description="Runs fastbert, transformers (eager, sdpa, torch.compile) and the float64 NumPy reference on the "
        "same batch, checks that they agree, and writes a table, a JSON file and a plot.",
    )
    p.add_argument("--model", default="minilm", help="minilm (default), bert-base, bert-large or a local model dir")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="comma-separated (default: 8 on CPU, 32 on GPU)")
    p.add_argument("--seq-lens", type=_int_list, default=None,
                   help="comma-separated (default: 32,128 on CPU; 128,512 on GPU)")
    p.add_argument("--varlen", action="store_true", help="random lengths per sequence in a padded batch")
    p.add_argument("--train", action="store_true", help="time forward + backward + AdamW step")
    p.add_argument("--providers", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                   help="comma-separated from: fastbert, fastbert-torch, fastbert-triton, fastbert-cuda, fastbert-cpp, "
                   "transformers-eager, transformers-sdpa, transformers-compile, reference")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per provider (default 2 CPU, 10 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 10 CPU, 50 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastbert-bench", help="output directory (default ./fastbert-bench/)")


def _bench(args) -> int:
    import torch

    from fastbert.bench import report, run

    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch_sizes = args.batch_sizes or ([32] if gpu else [8])
    args.seq_lens = args.seq_lens or ([128, 512] if gpu else [32, 128])
    args.warmup = (10 if gpu else 2) if args.warmup is None else args.warmup
    args.repeats = (50 if gpu else 10) if args.repeats is None else args.repeats
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    doc = run(args)
    paths = report.write(doc, args.out)
    print(report.table(doc))
    print(f"\nwrote {paths['json']}, {paths['txt']} and {paths['png']}")
    mismatched = [name for shape in doc["results"] for name, row in shape["providers"].items()
                  if row.get("ok") is False]
    if mismatched:
        print(f"WARNING: outputs beyond tolerance for {sorted(set(mismatched))}", file=sys.stderr)
        return 1
    return 0


def _build(args) -> int:
    from fastbert import _ext

    return _ext.main(["--backend", args.backend] + ["--verbose"] * args.verbose + ["--force"] * args.force)


def _backends(args) -> int:
    from fastbert.ops import backends

    for status in backends(args.device).values():
        print(status)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastbert", description="fastbert: drop-in BERT on fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    p = sub.add_parser("backends", help="which kernel backends run here, and why not")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p = sub.add_parser("build", help="compile the C++/CUDA extension ahead of time (otherwise built on first use)")
    p.add_argument("--backend", default="cpp", choices=["cpp", "cuda"])
    p.add_argument("--verbose", action="store_true", help="show the compiler output")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build matches")
    args = parser.parse_args(argv)
    commands = {"bench": _bench, "backends": _backends, "build": _build}
    try:
        return commands[args.command](args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2
