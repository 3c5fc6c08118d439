"""benchmarks/gpu_session.sh cannot rot between GPU sessions: its plan fits the 540 s of one device call, and its dry
run (every stage's CPU part: argument parsing, imports, test selection, the JSON files) passes here, without a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_session.sh")
STAGES = ("env", "graphs", "correctness", "sanitize", "bench", "optests")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(extra)
    return env


def test_plan_fits_one_device_call():
    proc = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    budgets = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)s", proc.stdout, re.M)}
    assert set(STAGES) <= set(budgets), proc.stdout
    assert budgets["total"] == sum(v for k, v in budgets.items() if k != "total") <= 540, proc.stdout
    assert list(budgets)[: len(STAGES)] == list(STAGES), "stages must run in order of value"


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


@pytest.mark.skipif(not os.path.exists("/usr/bin/timeout") and not os.path.exists("/bin/timeout"),
                    reason="needs coreutils timeout")
def test_dry_run_writes_every_stage_and_the_summary(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=600,
                          env=_env(OUT=str(out)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == {name: "dry-run" for name in STAGES}, json.dumps(summary["status"])
    for name in STAGES:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["stage"] == name and record["budget_s"] > 0 and (out / f"{name}.log").exists()
    assert (out / "summary.txt").read_text().startswith("total")
    correctness = json.loads((out / "correctness.json").read_text())
    assert {tuple(c) for c in correctness["cases"]} >= {("triton", "bf16", "varlen"), ("cuda", "fp16", "padded")}
    assert "collected" in (out / "optests.log").read_text()
