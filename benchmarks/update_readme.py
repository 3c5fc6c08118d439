"""Regenerate the results table in README.md from the newest `fastbert bench` JSON per device under
benchmarks/results/. Usage: python benchmarks/update_readme.py [--check]

The table goes between the markers `<!-- bench-table:start -->` and `<!-- bench-table:end -->`; --check exits 1
when README.md is out of date instead of writing it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from fastbert.bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def newest_per_device(results_dir: str = RESULTS) -> list[tuple[str, dict]]:
    """(json path, document) of the newest run per (device name, model, dtype, mode), newest first."""
    newest = {}
    for path in glob.glob(os.path.join(results_dir, "**", "bench-*.json"), recursive=True):
        with open(path) as f:
            doc = json.load(f)
        if doc.get("complete") is False:  # saved midway through a run that did not finish
            continue
        key = (doc["system"]["device_name"], doc["model"]["name"], doc["settings"]["dtype"], doc["settings"]["mode"],
               doc["settings"]["varlen"])
        if key not in newest or doc["date"] > newest[key][1]["date"]:
            newest[key] = (path, doc)
    return sorted(newest.values(), key=lambda item: item[1]["date"], reverse=True)


PEERS = ("onnxruntime", "openvino")


def _median(shape: dict, name: str):
    row = shape["providers"].get(name, {})
    if row.get("ok") is not True or row.get("info", {}).get("quantized"):
        return None
    return row.get("median_ms")


def peer_summary(entries: list[tuple[str, dict]]) -> list[str]:
    """fastbert against the best ONNX Runtime / OpenVINO row per workload: fp32 from the newest fp32 run, bf16 from
    the newest bf16 run, each ratio computed within its own run."""
    runs = {}
    for path, doc in entries:
        if not any(p in doc["settings"]["providers"] for p in PEERS):
            continue
        key = (doc["system"]["device_name"], doc["model"]["name"], doc["settings"]["mode"], doc["settings"]["varlen"])
        runs.setdefault(key, {})[doc["settings"]["dtype"]] = (path, doc)
    lines = []
    for (device, model, mode, varlen), by_dtype in sorted(runs.items()):
        shapes = {}
        for dtype in ("fp32", "bf16"):
            for shape in by_dtype.get(dtype, (None, {"results": []}))[1]["results"]:
                shapes.setdefault(report.shape_label(shape), {})[dtype] = shape
        for label, by in shapes.items():
            cells = [f"{model} {label}{', variable lengths' if varlen and 'encode' not in mode else ''}"]
            fp32, bf16 = by.get("fp32"), by.get("bf16")

            def ms(value):
                return "-" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"

            if fp32:
                sdpa, fast = _median(fp32, "transformers-sdpa"), _median(fp32, "fastbert")
                peers = [(ms_, n) for n in PEERS if (ms_ := _median(fp32, n)) is not None]
                best = min(peers) if peers else None
                cells += [ms(sdpa), ms(fast), f"{best[1]} {ms(best[0])}" if best else "-",
                          f"{best[0] / fast:.2f}x" if best and fast else "-"]
            else:
                cells += ["-"] * 4
            if bf16:
                fast, ov = _median(bf16, "fastbert"), _median(bf16, "openvino")
                cells += [ms(fast), ms(ov), f"{ov / fast:.2f}x" if ov and fast else "-"]
            else:
                cells += ["-"] * 3
            lines.append("| " + " | ".join(cells) + " |")
        files = ", ".join(f"[{d}]({os.path.relpath(p, ROOT)})" for d, (p, _) in sorted(by_dtype.items()))
        lines.append(f"| *({device}, {mode}: {files})* | | | | | | | |")
    if not lines:
        return []
    return [
        "**Against ONNX Runtime and OpenVINO** (median ms; fastbert's speedup over the peer, measured in the same run: "
        "above 1x fastbert is faster; fp32 and bf16 columns come from separate runs; the peers' rows, build and "
        "precision are in the tables below):",
        "",
        "| workload | transformers sdpa fp32 | fastbert fp32 | best peer fp32 | fastbert vs best peer | fastbert bf16 "
        "| OpenVINO bf16 | fastbert vs OpenVINO |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *lines,
        "",
    ]


def render(entries: list[tuple[str, dict]]) -> str:
    if not entries:
        return "No committed results yet: run `fastbert bench --out benchmarks/results/<device>`."
    parts = peer_summary(entries)
    for path, doc in entries:
        sysinfo, settings = doc["system"], doc["settings"]
        rel = os.path.relpath(path, ROOT)
        commit = str(sysinfo.get("fastbert_commit"))
        commit = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
        parts.append(
            f"**{doc['model']['name']}, {settings['dtype']}, {settings['mode']}"
            f"{', variable lengths' if settings['varlen'] else ''}** on {sysinfo['device_name']} "
            f"({sysinfo['torch_threads']} torch threads), {doc['date'][:10]}, torch {sysinfo['torch']}, "
            f"transformers {sysinfo['transformers']}, commit {commit} "
            f"([JSON]({rel}), [plot]({rel[:-5]}.png))."
            + (f" Load average at the end of the run: {doc['load_average_1_5_15min'][0]:.1f} on "
               f"{sysinfo['cpu_count']} CPUs." if doc.get("load_average_1_5_15min") else "")
            + (f" Ceilings measured in the same run: matmul {doc['ceilings']['matmul_tflops']:.2f} TFLOP/s, copy "
               f"{doc['ceilings']['copy_gbs']:.1f} GB/s." if doc["ceilings"].get("matmul_tflops") else "")
        )
        parts.append("")
        parts.append("| batch x len | provider | median ms | tokens/s | vs transformers sdpa | max diff | check |")
        parts.append("|---|---|---:|---:|---:|---:|---|")
        for shape in doc["results"]:
            label = report.shape_label(shape)
            for name, row in shape["providers"].items():
                if "skipped" in row or row.get("timed") is False:
                    continue
                speedup = row.get("speedup_vs_transformers_sdpa")
                quantized = row.get("info", {}).get("quantized")
                check = "quantized" if quantized else "ok" if row.get("ok") else "MISMATCH"
                shown = f"{name} (quantized)" if quantized else name
                parts.append(
                    f"| {label} | {shown} | {row['median_ms']:.2f} | {row['tokens_per_s']:.0f} | "
                    f"{'-' if speedup is None else f'{speedup:.2f}x'} | {row.get('max_diff', float('nan')):.1e} | "
                    f"{check} |"
                )
        parts.append("")
        notes = report.peer_notes(doc)
        if notes:
            parts.extend(["How the peers ran: " + "; ".join(f"`{n.split(':', 1)[0]}`:{n.split(':', 1)[1]}"
                                                            for n in notes) + ".", ""])
    return "\n".join(parts).rstrip()


def updated_readme(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} / {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date; write nothing")
    args = parser.parse_args()
    with open(README) as f:
        text = f.read()
    new = updated_readme(text, render(newest_per_device()))
    if args.check:
        if new != text:
            print("README.md results table is out of date: run python benchmarks/update_readme.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(README, "w") as f:
            f.write(new)
        print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
