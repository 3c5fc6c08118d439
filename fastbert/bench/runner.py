"""``fastbert bench``: fastbert vs transformers (eager, sdpa, torch.compile), ONNX Runtime and OpenVINO, and the
float64 NumPy reference on the same batch, with a correctness check per provider, a table, a JSON file and a plot."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from fastbert.bench import models, report
from fastbert.bench.timing import (
    copy_bandwidth_gbs,
    idle_cpu_ms_after_call,
    matmul_ceiling_tflops,
    synchronize,
    time_alternating,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# atol added to "2x transformers' own error" when deciding whether a provider agrees with the reference.
ATOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; got {name!r}")
    return torch.device(name)


def default_providers(device: torch.device, train: bool) -> list[str]:
    names = ["fastbert", "transformers-eager", "transformers-sdpa"]
    if device.type == "cuda":
        names.append("transformers-compile")  # CPU compile of a whole BERT costs minutes per shape
        if not train:
            names.insert(1, "fastbert-cudagraphs")
    if not train:
        names.append("reference")
    return names


def _check(results, dtype_name):
    """Mark each provider ok when its error is <= 2x transformers-eager's own error (same dtype) + atol. Quantized
    rows are not held to it: their error is reported, not judged."""
    baseline = results.get("transformers-eager", {}).get("max_diff")
    for row in results.values():
        if row.get("max_diff") is None or row.get("info", {}).get("quantized"):
            continue
        bound = (2 * baseline if baseline is not None else 0.0) + ATOL[dtype_name]
        row["tolerance"] = bound
        row["ok"] = bool(row["max_diff"] <= bound)


def bench_shape(spec, device, dtype_name, batch_size, seqlen, args, progress) -> dict:
    dtype = DTYPES[dtype_name]
    batch = models.make_batch(spec.config, batch_size, seqlen, args.varlen, device, seed=args.seed)
    providers, skipped = models.build_providers(args.providers, spec, batch, device, dtype, args.train)
    t0 = time.perf_counter()
    ref_out, ref_label = models.reference_last_hidden(spec, batch)
    ref_ms = (time.perf_counter() - t0) * 1e3
    mask = batch["attention_mask"]
    rows = {name: {"skipped": reason} for name, reason in skipped.items()}

    # Correctness first, in eval mode, on every provider (including transformers-eager as the error yardstick).
    if "transformers-eager" not in providers:
        eager = models.build_providers(["transformers-eager"], spec, batch, device, dtype, False)[0]
        rows["transformers-eager"] = {"max_diff": models.max_diff(eager["transformers-eager"].forward(), ref_out, mask),
                                      "timed": False}
    for name, provider in providers.items():
        if provider.model is not None:
            provider.model.eval()
        rows.setdefault(name, {})["max_diff"] = models.max_diff(provider.forward(), ref_out, mask)
        if provider.model is not None:
            provider.model.train(args.train)
        if getattr(provider, "info", None):
            rows[name]["info"] = provider.info

    fns = {name: (p.train_step if args.train else p.forward) for name, p in providers.items()}
    timings = time_alternating(fns, device, args.warmup, args.repeats, progress)
    if device.type == "cpu":  # evidence that no runtime's pool keeps spinning into the next provider's turn
        for name, fn in fns.items():
            timings[name]["idle_cpu_ms_after_call"] = idle_cpu_ms_after_call(fn)
    real_tokens = int(mask.sum())
    flops = models.forward_flops(spec.config, mask) * (3 if args.train else 1)
    for name, t in timings.items():
        rows[name].update(t)
        rows[name]["tokens_per_s"] = real_tokens / (t["median_ms"] * 1e-3)
        rows[name]["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
    if device.type == "cuda":
        for name, fn in fns.items():  # peak memory per provider, one call each after a reset
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            synchronize(device)
            rows[name]["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    if "reference" in args.providers:
        if ref_label.startswith("numpy"):  # the ground-truth pass above, timed once
            rows["reference"] = {"median_ms": ref_ms, "samples": 1, "max_diff": 0.0,
                                 "tokens_per_s": real_tokens / (ref_ms * 1e-3)}
        else:
            rows["reference"] = {"skipped": "batch too large for the NumPy reference; checked against " + ref_label}
    _check(rows, dtype_name)
    baseline = rows.get(models.BASELINE, {}).get("median_ms")
    for row in rows.values():
        if baseline and row.get("median_ms"):
            row["speedup_vs_" + models.BASELINE.replace("-", "_")] = baseline / row["median_ms"]
    del providers
    return {
        "batch_size": batch_size, "seq_len": seqlen, "real_tokens": real_tokens, "padded_tokens": mask.numel(),
        "flops": flops, "reference": ref_label, "providers": rows,
    }


def run(args, on_shape=None) -> dict:
    """Measure every shape; ``on_shape(doc)`` receives the document so far after each shape (to save it)."""
    if getattr(args, "encode", False):
        from fastbert.bench import encode

        return encode.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {args.dtype!r}")
    if args.providers is None:
        args.providers = default_providers(device, args.train)
    unknown = [p for p in args.providers if p not in models.ALL_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown --providers {unknown}; choose from {', '.join(models.ALL_PROVIDERS)}")
    spec = models.load_model(args.model)
    torch.manual_seed(args.seed)
    shapes = [(b, t) for b in args.batch_sizes for t in args.seq_lens]
    for b, t in shapes:
        if t > spec.config.max_position_embeddings or t < 1 or b < 1:
            raise ValueError(f"shape batch={b} x seq_len={t} is invalid for this model "
                             f"(1 <= seq_len <= {spec.config.max_position_embeddings})")
    timed = len([p for p in args.providers if p != "reference"])
    ceilings = {
        "matmul_tflops": matmul_ceiling_tflops(device, DTYPES[args.dtype]),
        "copy_gbs": copy_bandwidth_gbs(device),
    }
    results = []
    with tqdm(total=len(shapes) * timed * args.repeats, desc="fastbert bench", unit="call") as progress:
        for b, t in shapes:
            progress.set_postfix_str(f"batch {b} x {t}")
            row = bench_shape(spec, device, args.dtype, b, t, args, progress)
            for prov in row["providers"].values():
                if "tflops" in prov:
                    prov["fraction_of_matmul_ceiling"] = prov["tflops"] / ceilings["matmul_tflops"]
            results.append(row)
            if on_shape is not None and len(results) < len(shapes):
                on_shape(report.assemble(args, spec, device, ceilings, results, complete=False))
    return report.assemble(args, spec, device, ceilings, results)
