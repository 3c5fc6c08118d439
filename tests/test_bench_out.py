"""`fastbert bench --out`: a path that cannot take the results fails before anything is measured, and every shape
measured is saved as soon as it finishes (issue 18)."""

import json
import os

import pytest

import fastbert.bench
from fastbert.bench import runner
from fastbert.cli import main

TINY = ["--device", "cpu", "--providers", "fastbert", "--batch-sizes", "2", "--seq-lens", "8,16", "--repeats", "1",
        "--warmup", "0", "--threads", "1"]


@pytest.fixture
def measured(monkeypatch):
    """Records whether the benchmark started measuring."""
    calls = []
    real = fastbert.bench.run

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastbert.bench, "run", spy)
    return calls


def test_out_that_is_an_existing_file_fails_before_measuring(tmp_path, measured, capsys):
    target = tmp_path / "results.json"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, "--out", str(target)])
    assert exc.value.code == 2
    assert "existing file" in capsys.readouterr().err
    assert measured == [] and target.read_text() == "keep me"


def test_out_below_a_file_fails_before_measuring(tmp_path, measured, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, "--out", str(tmp_path / "file" / "results")])
    assert exc.value.code == 2
    assert "cannot write results there" in capsys.readouterr().err
    assert measured == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_fails_before_measuring(tmp_path, measured, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["bench", *TINY, "--out", str(folder)])
    finally:
        folder.chmod(0o700)
    assert exc.value.code == 2 and "cannot write results there" in capsys.readouterr().err
    assert measured == []


def test_shapes_measured_before_a_failure_are_saved(tmp_path, monkeypatch):
    real = runner.bench_shape
    done = []

    def second_shape_fails(spec, device, dtype_name, batch_size, seqlen, args, progress):
        if done:
            raise RuntimeError("stopped during the second shape")
        done.append(seqlen)
        return real(spec, device, dtype_name, batch_size, seqlen, args, progress)

    monkeypatch.setattr(runner, "bench_shape", second_shape_fails)
    with pytest.raises(RuntimeError, match="second shape"):
        main(["bench", *TINY, "--out", str(tmp_path)])
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "txt"], files
    with open(tmp_path / files[0]) as f:
        doc = json.load(f)
    assert doc["complete"] is False
    assert [(r["batch_size"], r["seq_len"]) for r in doc["results"]] == [(2, 8)]
    assert doc["results"][0]["providers"]["fastbert"]["ok"] is True
    assert "2 x 8" in (tmp_path / files[1]).read_text()


def test_a_finished_run_is_marked_complete(tmp_path):
    out = tmp_path / "new" / "folder"  # created when the first shape is saved
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    (name,) = [f for f in os.listdir(out) if f.endswith(".json")]
    with open(out / name) as f:
        doc = json.load(f)
    assert doc["complete"] is True and len(doc["results"]) == 2
    assert sorted(f.rsplit(".", 1)[1] for f in os.listdir(out)) == ["json", "png", "txt"]


def test_invalid_arguments_create_no_out_folder(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--seq-lens", "4096", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
