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


def render(entries: list[tuple[str, dict]]) -> str:
    if not entries:
        return "No committed results yet: run `fastbert bench --out benchmarks/results/<device>`."
    parts = []
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
