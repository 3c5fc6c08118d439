"""The `fastbert` command: bench end to end at a tiny size, backends, argument errors, README table script."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fastbert.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-sizes", "2", "--seq-lens", "8,16", "--repeats", "2", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--device", "cpu", "--varlen", *TINY, "--out", str(out)])
    return rc, out


def _only(out, ext):
    files = sorted(p for p in os.listdir(out) if p.endswith(ext))
    assert len(files) == 1, files
    return os.path.join(out, files[0])


def test_bench_writes_json_table_and_plot(bench_run):
    rc, out = bench_run
    assert rc == 0
    with open(_only(out, ".json")) as f:
        doc = json.load(f)
    for field in ("device_name", "cpu_model", "torch", "transformers", "torch_threads", "fastbert_commit"):
        assert field in doc["system"]
    assert doc["system"]["torch_threads"] == 1
    assert doc["settings"]["dtype"] == "fp32" and doc["settings"]["varlen"] is True
    assert doc["ceilings"]["matmul_tflops"] > 0 and doc["ceilings"]["copy_gbs"] > 0
    assert [(r["batch_size"], r["seq_len"]) for r in doc["results"]] == [(2, 8), (2, 16)]
    for shape in doc["results"]:
        assert shape["reference"] == "numpy-float64-reference"
        assert shape["real_tokens"] <= shape["padded_tokens"]
        rows = shape["providers"]
        assert {"fastbert", "transformers-eager", "transformers-sdpa", "reference"} <= set(rows)
        for name in ("fastbert", "transformers-eager", "transformers-sdpa"):
            row = rows[name]
            assert row["ok"] is True, (name, row)
            assert row["max_diff"] < 1e-4
            assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
            assert row["tokens_per_s"] == pytest.approx(shape["real_tokens"] / (row["median_ms"] * 1e-3))
            assert 0 < row["fraction_of_matmul_ceiling"]
        assert rows["transformers-sdpa"]["speedup_vs_transformers_sdpa"] == pytest.approx(1.0)
    assert os.path.getsize(_only(out, ".png")) > 1000
    with open(_only(out, ".txt")) as f:
        table = f.read()
    assert "fastbert" in table and "transformers-sdpa" in table and "MISMATCH" not in table


def test_bench_never_overwrites_an_earlier_run(bench_run, tmp_path):
    _, out = bench_run
    before = set(os.listdir(out))
    assert main(["bench", "--device", "cpu", "--providers", "fastbert", *TINY, "--out", str(out)]) == 0
    after = set(os.listdir(out))
    assert before < after and len(after - before) == 3


def test_bench_flags_a_provider_that_disagrees(tmp_path, monkeypatch):
    from fastbert.ops import _backend

    backend = _backend.resolved_backend("add_layer_norm_fwd", "cpu")  # what `auto` runs here (cpp or torch)
    real = _backend._IMPLS["add_layer_norm_fwd"][backend]

    def wrong(x, residual, weight, bias, eps, dropout_p, seed):
        out, mean, rstd = real(x, residual, weight, bias, eps, dropout_p, seed)
        return out * 1.01, mean, rstd

    monkeypatch.setitem(_backend._IMPLS["add_layer_norm_fwd"], backend, wrong)
    _backend._resolve.cache_clear()
    try:
        rc = main(["bench", "--device", "cpu", "--providers", "fastbert,transformers-eager", *TINY, "--out",
                   str(tmp_path)])
    finally:
        _backend._resolve.cache_clear()
    assert rc == 1
    with open(_only(tmp_path, ".json")) as f:
        doc = json.load(f)
    assert doc["results"][0]["providers"]["fastbert"]["ok"] is False
    assert doc["results"][0]["providers"]["transformers-eager"]["ok"] is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--providers", "fastbert,nope"], "unknown --providers"),
        (["bench", "--model", "/no/such/dir"], "--model must be"),
        (["bench", "--seq-lens", "0"], "positive integers"),
        (["bench", "--seq-lens", "1024", "--providers", "fastbert"], "seq_len"),
    ],
)
def test_bench_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--device", "cpu", "--out", "/tmp/fastbert-bench-never-written"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_backends_command_lists_every_backend(capsys):
    assert main(["backends", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["torch", "triton", "cuda", "cpp"]
    assert "available" in lines[0] and "unavailable" not in lines[0]


def test_backends_command_says_what_auto_runs_here(capsys, monkeypatch):
    from fastbert.ops import _backend

    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    assert main(["backends", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FASTBERT_BACKEND=auto runs on cpu:" in out
    picks = {}
    for line in out.split("runs on cpu:")[1].strip().splitlines():
        backend, ops = line.split(None, 1)
        picks.update({op: backend for op in ops.split(", ")})
    assert picks == {op: _backend.resolved_backend(op, "cpu") for op in _backend.op_names()}


@pytest.mark.parametrize("command, expected", [
    ("build", ["Compiles the C++", "(default: cpp)"]),
    ("backends", ["which backend each op runs on"]),
    ("finetune", ["(default: 0.01)", "(default: 5e-05)", "(default: 0)", "(default: 1.0)", "(default: auto)"]),
    ("pretrain", ["(default: 0.0001)", "(default: 0.15)", "(default: 1)"]),
])
def test_help_has_a_description_and_shows_defaults(command, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for phrase in expected:
        assert phrase in text, (phrase, text)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_python_dash_m_fastbert_runs():
    proc = subprocess.run([sys.executable, "-m", "fastbert", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "bench" in proc.stdout


def test_readme_table_renders_from_results(bench_run):
    spec = importlib.util.spec_from_file_location("update_readme", os.path.join(ROOT, "benchmarks", "update_readme.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, out = bench_run
    table = mod.render(mod.newest_per_device(str(out)))
    assert "| 2 x 8 | fastbert |" in table and "| 2 x 16 | transformers-sdpa |" in table
    new = mod.updated_readme(f"a\n{mod.START}\nold\n{mod.END}\nb\n", table)
    assert new.startswith("a\n") and new.endswith("\nb\n") and "old" not in new and table in new
