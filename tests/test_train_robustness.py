"""`fastbert finetune` never ends "successfully" with garbage and never strands a run: hyper-parameters are checked
before anything runs, a non-finite loss / gradient / weight stops the run (nothing non-finite is saved, the last good
checkpoint stays), a damaged log or checkpoint does not block --resume, a kill during the first checkpoint leaves a
restartable --out, a full disk says so, and the autocast paths (bf16 on CPU, and the GPU default's code path) train."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fastbert.cli import main
from fastbert.train import checkpoint as ckpt
from fastbert.train import loop

ROWS = [(f"the {noun} was {adj}", label) for noun in ("movie", "meal", "book", "trip")
        for adj, label in (("great", "positive"), ("awful", "negative"), ("lovely", "positive"), ("bad", "negative"))]


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_csv(d / "train.csv", ROWS), write_csv(d / "eval.csv", ROWS[:8])


# 16 examples, batch 4: 4 steps per epoch; --save-steps 2 checkpoints at steps 2 and 4 (end of epoch 1), 6, 8.
OPTIONS = ["--batch-size", "4", "--max-length", "16", "--lr", "1e-3", "--save-steps", "2", "--keep-checkpoints", "0",
           "--device", "cpu", "--no-progress"]


def argv(files, model, out, *extra, epochs=2):
    train, evaluation = files
    return ["finetune", "--task", "classification", "--train", train, "--eval", evaluation, "--model", model,
            "--out", str(out), "--epochs", str(epochs), *OPTIONS, *extra]


def log_steps(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(path).values())


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, at_step):
    def stop(self, step):
        if step == at_step:
            raise Interrupted
    monkeypatch.setattr(loop.TrainingLoop, "_after_step", stop)


# ---------------------------------------------------------------------------------------------------------------------
# Hyper-parameters


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lr", "0", "--lr must be > 0"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number, got nan"),
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0"),
    ("--max-grad-norm", "nan", "--max-grad-norm must be a finite number, got nan"),
    ("--max-grad-norm", "inf", "--max-grad-norm must be a finite number"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0"),
    ("--warmup-ratio", "nan", "--warmup-ratio must be a finite number"),
    ("--warmup-ratio", "1.5", r"--warmup-ratio must be in [0, 1]"),
    ("--seed", "-1", "--seed must be an integer in [0, 2**63)"),
    ("--save-steps", "-2", "--save-steps must be an integer >= 0"),
    ("--keep-checkpoints", "-1", "--keep-checkpoints must be an integer >= 0"),
    ("--epochs", "0", "--epochs must be an integer >= 1"),
])
def test_bad_hyperparameters_are_refused_before_anything_runs(option, value, message, tmp_path, capsys):
    out = tmp_path / "out"
    # The files do not exist: the options are checked first, so the message is about the option.
    for command in (["finetune", "--task", "classification", "--train", "x.csv", "--eval", "x.csv", "--model", "m"],
                    ["pretrain", "--corpus", "x.txt", "--config", "tiny"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--out", str(out), option, value])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_pretrain_refuses_a_nan_mlm_probability(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--corpus", "x.txt", "--config", "tiny", "--out", str(tmp_path / "o"),
              "--mlm-probability", "nan"])
    assert "--mlm-probability must be in (0, 1), got nan" in capsys.readouterr().err


def test_training_loop_checks_settings_from_python(make_config):
    settings = loop.TrainSettings(out_dir="unused", lr=float("inf"))
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        loop.TrainingLoop(torch.nn.Linear(2, 2), object(), None, settings, loop.Distributed())


# ---------------------------------------------------------------------------------------------------------------------
# Divergence


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_nan_loss_mid_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        clip, files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def poison_after_step_3(self, step):  # as if step 3's update had blown up the weights
        if step == 3:
            with torch.no_grad():
                self.model.bert.embeddings.word_embeddings.weight.fill_(float("nan"))
    monkeypatch.setattr(loop.TrainingLoop, "_after_step", poison_after_step_3)
    assert main(argv(files, tiny_model_dir, out, "--max-grad-norm", clip)) == 1
    err = capsys.readouterr().err
    assert "training diverged: at step 4 the loss is nan" in err, err
    assert "--lr 0.001" in err and "checkpoint-2" in err
    assert ("no gradient clipping" in err) == (clip == "0")
    # Nothing after the good checkpoint was saved; it loads and holds finite weights.
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists()
    assert all_finite(out / "checkpoint-2" / "model.safetensors")
    assert ckpt.checkpoint_problem(str(out / "checkpoint-2")) is None


def test_non_finite_weights_are_never_saved(files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def poison_at_step_6(self, step):  # right before the step-6 checkpoint
        if step == 6:
            with torch.no_grad():
                self.model.classifier.weight[0, 0] = float("inf")
    monkeypatch.setattr(loop.TrainingLoop, "_after_step", poison_at_step_6)
    assert main(argv(files, tiny_model_dir, out)) == 1
    err = capsys.readouterr().err
    assert "at step 6 1 weight tensors hold NaN or infinite values (classifier.weight)" in err, err
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "model.safetensors").exists()


def test_a_nan_evaluation_loss_stops_the_run(files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from fastbert.train.finetune import SequenceClassificationTask

    real = SequenceClassificationTask.evaluate
    monkeypatch.setattr(SequenceClassificationTask, "evaluate",
                        lambda *a, **k: {**real(*a, **k), "loss": float("nan")})
    assert main(argv(files, tiny_model_dir, tmp_path / "out", epochs=1)) == 1
    assert "after epoch 1 (step 4) the evaluation loss is nan" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Resume after damage


@pytest.fixture
def interrupted_run(files, tiny_model_dir, tmp_path, monkeypatch):
    """A run stopped after step 7: checkpoints 2, 4, 6; log lines 1-7."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 7)
        with pytest.raises(Interrupted):
            main(argv(files, tiny_model_dir, out))
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out


def resume(files, tiny_model_dir, out):
    return main(argv(files, tiny_model_dir, out, "--resume"))


def test_resume_says_where_it_resumes_from(interrupted_run, files, tiny_model_dir, capsys):
    capsys.readouterr()
    assert resume(files, tiny_model_dir, interrupted_run) == 0
    assert "resuming from checkpoint-6 (step 6, epoch 1.5 of 2)" in capsys.readouterr().out
    assert log_steps(interrupted_run) == list(range(1, 9))


def test_torn_last_log_line_is_dropped_with_a_warning(interrupted_run, files, tiny_model_dir, capsys):
    with open(interrupted_run / "train_log.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 0.69, "lr": 0.0')  # what a full disk or a power cut leaves
    capsys.readouterr()
    assert resume(files, tiny_model_dir, interrupted_run) == 0
    err = capsys.readouterr().err
    assert "train_log.jsonl: dropped 1 unreadable line(s) (line 8)" in err, err
    assert log_steps(interrupted_run) == list(range(1, 9))


@pytest.mark.parametrize("damage, named", [
    ("training_state.json", "training_state.json is unreadable"),
    ("training_state.pt", "training_state.pt is unreadable"),
    ("model.safetensors", "model.safetensors is unreadable"),
])
def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(damage, named, interrupted_run, files, tiny_model_dir,
                                                                capsys):
    path = interrupted_run / "checkpoint-6" / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # torn by a crash
    capsys.readouterr()
    assert resume(files, tiny_model_dir, interrupted_run) == 0
    captured = capsys.readouterr()
    assert named in captured.err and "checkpoint-6" in captured.err, captured.err
    assert "falling back to checkpoint-4, the newest intact checkpoint" in captured.err
    assert "resuming from checkpoint-4 (step 4, epoch 1 of 2)" in captured.out
    assert log_steps(interrupted_run) == list(range(1, 9))
    assert ckpt.checkpoint_problem(str(interrupted_run / "checkpoint-6")) is None  # re-saved intact
    assert all_finite(interrupted_run / "model.safetensors")


def test_no_intact_checkpoint_is_an_error_naming_the_files(interrupted_run, files, tiny_model_dir, capsys):
    for step in (2, 4, 6):
        (interrupted_run / f"checkpoint-{step}" / "training_state.pt").write_bytes(b"not a zip file")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        resume(files, tiny_model_dir, interrupted_run)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and all(f"checkpoint-{s}/training_state.pt is unreadable" in err
                                             for s in (2, 4, 6)), err


def test_kill_during_the_first_checkpoint_leaves_a_restartable_out(files, tiny_model_dir, tmp_path, capsys):
    """A real SIGKILL in the middle of writing checkpoint-2 (model written, training state not yet)."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fastbert.train import checkpoint
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = killed
        from fastbert.cli import main
        main({argv(files, tiny_model_dir, out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ".checkpoint-2.tmp" in os.listdir(out) and ckpt.list_checkpoints(str(out)) == []
    capsys.readouterr()
    with pytest.raises(SystemExit):  # without --resume the folder is still protected
        main(argv(files, tiny_model_dir, out))
    assert "pass --resume" in capsys.readouterr().err
    assert resume(files, tiny_model_dir, out) == 0
    assert "no complete checkpoint (the run stopped before its first one was written); starting from step 0" in \
        capsys.readouterr().err
    assert log_steps(out) == list(range(1, 9))
    assert not [name for name in os.listdir(out) if name.startswith(".")]


def _fail_second_save(monkeypatch, failure: BaseException) -> None:
    """Make the second checkpoint's torch.save raise ``failure``; the first one is written as usual."""
    calls = []
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)


def test_interrupted_save_keeps_the_previous_checkpoint(files, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_second_save(monkeypatch, KeyboardInterrupt())  # as Ctrl-C in the middle of writing checkpoint-4
    with pytest.raises(KeyboardInterrupt):
        main(argv(files, tiny_model_dir, out))
    assert [name for name in os.listdir(out) if "checkpoint" in name] == ["checkpoint-2"]  # no partial files left
    assert ckpt.checkpoint_problem(str(out / "checkpoint-2")) is None


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5376 vs 5270"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_full_disk_says_the_disk_is_full(failure, files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _fail_second_save(monkeypatch, failure)
    assert main(argv(files, tiny_model_dir, out)) == 1
    err = capsys.readouterr().err
    assert "the disk is full (no space left on device)" in err, err
    assert "checkpoint-2, is intact" in err and "--resume" in err
    assert [name for name in os.listdir(out) if "checkpoint" in name] == ["checkpoint-2"]


# ---------------------------------------------------------------------------------------------------------------------
# Autocast


def test_precision_bf16_trains_on_cpu(files, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(argv(files, tiny_model_dir, out, "--precision", "bf16", epochs=1)) == 0
    with open(out / "train_log.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("gpu_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpu_default_precision(gpu_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert loop.resolve_precision("auto", torch.device("cuda")) == expected
    assert loop.resolve_precision("auto", torch.device("cpu")) is None


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_gpu_default_autocast_path_trains_on_cpu(amp_dtype, files, tiny_model_dir, tmp_path, monkeypatch):
    """--precision auto on a GPU takes bf16 autocast (fp16 with loss scaling where bf16 is missing). The same code
    path (autocast, GradScaler, their checkpointed state) runs here on CPU tensors."""
    monkeypatch.setattr(loop, "resolve_precision", lambda precision, device: amp_dtype)
    out = tmp_path / "out"
    assert main(argv(files, tiny_model_dir, out, epochs=1)) == 0
    state = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert bool(state["scaler"]) == (amp_dtype == torch.float16)  # the loss scaler runs (and is saved) for fp16
    assert all_finite(out / "model.safetensors")
