"""Results of ``fastbert bench``: the JSON document, the terminal table and the PNG plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import tempfile

import numpy as np
import torch

from fastbert.bench.models import BASELINE

SPEEDUP_KEY = "speedup_vs_" + BASELINE.replace("-", "_")


def _version(module_name):
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", None)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """HEAD of the checkout fastbert runs from, with "-dirty" when its sources (fastbert/, csrc/) differ from it: a
    result measured on uncommitted code must not be credited to the commit."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        root = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        sources = ["git", "diff", "--quiet", "HEAD", "--", "fastbert", "csrc"]
        diff = subprocess.run(sources, cwd=root or here, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if diff.returncode == 1 else "")


def device_info(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "numpy": np.__version__,
        "fastbert": _version("fastbert"),
        "fastbert_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = props.total_memory / 2**30
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def assemble(args, spec, device, ceilings, results, complete: bool = True) -> dict:
    from fastbert.ops import backends

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,  # False in the copy saved after each shape while later shapes are still running
        # other processes' load when the run ended: a CPU result measured next to other jobs says so
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "system": device_info(device),
        "backends": {name: str(status) for name, status in backends(device.type).items()},
        "model": {"name": spec.name, "source": spec.source, "hidden_size": spec.config.hidden_size,
                  "layers": spec.config.num_hidden_layers, "heads": spec.config.num_attention_heads},
        "settings": {"dtype": args.dtype, "mode": "train (fwd+bwd+AdamW)" if args.train else "inference (forward)",
                     "varlen": args.varlen, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                     "providers": args.providers, "flops_basis": "matmul FLOPs over real (non-padding) tokens",
                     "timing": "providers alternate A B A B; on CPU 50 ms of sleep before each provider's turn (idle "
                     "thread pools); an untimed call before each timed call under 100 ms"},
        "ceilings": ceilings,
        "results": results,
    }


def _fmt(value, spec):
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return format("-", f">{width or 1}")
    return format(value, spec)


def table(doc: dict) -> str:
    lines = []
    sysinfo = doc["system"]
    lines.append(f"fastbert bench: {doc['model']['name']} ({doc['model']['source']}), {doc['settings']['dtype']}, "
                 f"{doc['settings']['mode']}, {sysinfo['device_name']} ({sysinfo['torch_threads']} torch threads)")
    if doc["ceilings"].get("matmul_tflops"):
        lines.append(f"ceilings measured in this run: matmul {doc['ceilings']['matmul_tflops']:.2f} TFLOP/s, "
                     f"copy {doc['ceilings']['copy_gbs']:.1f} GB/s")
    header = (f"{'batch x len':>12} {'provider':<22} {'median ms':>10} {'p10':>9} {'p90':>9} {'tokens/s':>11} "
              f"{'TFLOP/s':>8} {'vs sdpa':>8} {'max diff':>10}  check")
    lines.append(header)
    lines.append("-" * len(header))
    for shape in doc["results"]:
        label = shape_label(shape)
        for name, row in shape["providers"].items():
            if "skipped" in row:
                lines.append(f"{label:>12} {name:<22} skipped: {row['skipped']}")
                continue
            if row.get("timed") is False:
                continue
            check = check_label(row)
            lines.append(
                f"{label:>12} {name:<22} {_fmt(row.get('median_ms'), '10.2f')} {_fmt(row.get('p10_ms'), '9.2f')} "
                f"{_fmt(row.get('p90_ms'), '9.2f')} {_fmt(row.get('tokens_per_s'), '11.0f')} "
                f"{_fmt(row.get('tflops'), '8.3f')} {_fmt(row.get(SPEEDUP_KEY), '7.2f')}x "
                f"{_fmt(row.get('max_diff'), '10.2e')}  {check}"
            )
        lines.append(f"{'':>12} (max diff vs {shape['reference']}, {shape.get('compared', 'real tokens only')})")
    lines.extend(peer_notes(doc))
    return "\n".join(lines)


def shape_label(shape: dict) -> str:
    return shape.get("label") or f"{shape['batch_size']} x {shape['seq_len']}"


def check_label(row: dict) -> str:
    if row.get("info", {}).get("quantized"):
        return "quantized (error reported, not checked)"
    return "ok" if row.get("ok") else f"MISMATCH (> {row.get('tolerance', 0):.1e})"


def peer_notes(doc: dict) -> list[str]:
    """One line per ONNX Runtime / OpenVINO provider: how it was built and what ran (from its first shape)."""
    notes = {}
    for shape in doc["results"]:
        for name, row in shape["providers"].items():
            info = row.get("info")
            if not info or name in notes:
                continue
            if "fused_ops" in info:
                fused = ", ".join(f"{op} {n}" for op, n in info["fused_ops"].items()) or "none"
                text = (f"{info['exporter']}, ORT BERT optimizer fused {fused}"
                        f"{'' if info.get('fusion_complete') else ' (ATTENTION NOT FUSED)'}; "
                        f"onnxruntime {info.get('onnxruntime')}, {info.get('intra_op_num_threads')} intra-op threads, "
                        f"spinning off{'; ' + info['precision'] if 'precision' in info else ''}")
            else:
                ran = ", ".join(f"{n} {kind}" for kind, n in info.get("runtime_precisions", {}).items())
                version = str(info.get("openvino")).split("-")[0]
                text = (f"{info['exporter']}, openvino {version}, shapes: {info.get('shapes')}, "
                        f"precision hint {info.get('inference_precision')}, {info.get('inference_num_threads')} "
                        f"threads; ran {ran}")
            notes[name] = f"{name}: {text}"
    return list(notes.values())


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    providers = [p for p in doc["settings"]["providers"] if p != "reference"]
    on_gpu = doc["system"]["device"] == "cuda"
    fig, axes = plt.subplots(1, 2 if on_gpu else 1, figsize=(12 if on_gpu else 7, 4.5), squeeze=False)
    labels = [shape_label(r).replace(" x ", "x") for r in results]
    x = np.arange(len(results))
    width = 0.8 / max(1, len(providers))
    ax = axes[0][0]
    for i, name in enumerate(providers):
        values = [r["providers"].get(name, {}).get(SPEEDUP_KEY, np.nan) for r in results]
        ax.bar(x + i * width, values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(providers) - 1) / 2, labels)
    ax.set_xlabel("batch x sequence length")
    ax.set_ylabel(f"speedup over {BASELINE} (same run)")
    ax.set_title(f"{doc['model']['name']} {doc['settings']['dtype']} on {doc['system']['device_name']}")
    ax.legend(fontsize=8)
    if on_gpu:
        ax = axes[0][1]
        for i, name in enumerate(providers):
            values = [r["providers"].get(name, {}).get("tflops", np.nan) for r in results]
            ax.bar(x + i * width, values, width, label=name)
        ax.axhline(doc["ceilings"]["matmul_tflops"], color="red", linestyle="--", label="matmul ceiling (measured)")
        ax.set_xticks(x + width * (len(providers) - 1) / 2, labels)
        ax.set_ylabel("achieved TFLOP/s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_out_dir(out_dir: str) -> None:
    """Raise a ValueError naming --out unless results can be written to ``out_dir`` (an existing writable folder, or
    a new one under a writable folder), so that a bad path fails before minutes of measuring rather than after.
    Creates nothing: the folder is made when the first shape's results are saved."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} is an existing file; give a directory (new or existing) for the results")
    if os.path.isdir(out_dir):
        try:
            with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".fastbert-write-check-"):
                pass
        except OSError as exc:
            raise ValueError(f"--out {out_dir!r}: cannot write results there ({exc.strerror or exc})") from None
        return
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out_dir!r}: cannot write results there ({parent!r} is a file, not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir!r}: cannot write results there (no write permission in {parent!r})")


class ResultsWriter:
    """bench-<time>.json, .txt (the table) and .png in ``out_dir``, never overwriting an earlier run. ``save`` after
    each shape rewrites the JSON and table of this run (atomically), so a run stopped midway keeps what it measured;
    ``finish`` writes the final ones and the plot."""

    def __init__(self, out_dir: str):
        check_out_dir(out_dir)
        self.out_dir, self.paths = out_dir, None

    def _reserve(self) -> dict:
        os.makedirs(self.out_dir, exist_ok=True)
        stem = "bench-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        candidate, n = stem, 1
        while True:
            paths = {ext: os.path.join(self.out_dir, f"{candidate}.{ext}") for ext in ("json", "txt", "png")}
            if not any(os.path.exists(p) for p in paths.values()):
                try:
                    with open(paths["json"], "x"):
                        return paths
                except FileExistsError:  # another run took the name in between
                    pass
            n += 1
            candidate = f"{stem}-{n}"

    def save(self, doc: dict) -> dict:
        if self.paths is None:
            self.paths = self._reserve()
        for ext, text in (("json", json.dumps(doc, indent=2)), ("txt", table(doc) + "\n")):
            tmp = self.paths[ext] + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.paths[ext])
        return self.paths

    def finish(self, doc: dict) -> dict:
        paths = self.save(doc)
        plot(doc, paths["png"])
        return paths


def write(doc: dict, out_dir: str) -> dict:
    """Write bench-<time>.json, .txt (the table) and .png into ``out_dir``; never overwrites an earlier run."""
    return ResultsWriter(out_dir).finish(doc)
