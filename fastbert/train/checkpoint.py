"""Output directory rules and checkpoints.

Layout of ``--out DIR``::

    DIR/config.json, model.safetensors, tokenizer files   the final model (save_pretrained format)
    DIR/eval_results.json                                 the latest evaluation, plus one entry per epoch
    DIR/train_log.jsonl                                   one JSON line per optimizer step
    DIR/checkpoint-<step>/                                model + tokenizer (save_pretrained, safetensors),
        training_state.pt                                 optimizer, LR schedule and loss-scaler state
        training_state.json                               step, epoch, settings the run must resume with

A checkpoint is written to a hidden temporary directory, flushed to the disk and renamed into place, so a run killed
while saving leaves the previous checkpoint as the latest complete one; old checkpoints are renamed away before they
are deleted. ``--resume`` takes the newest checkpoint whose files all read back and names any damaged newer one.
training_state.pt holds tensors and plain containers only and is read back with ``torch.load(weights_only=True)``.
The random state needs no saving: data order and masking derive from (seed, epoch, example) and dropout from
(seed, step, rank).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors import safe_open

from fastbert.train import errors

STATE_FILE = "training_state.pt"
INFO_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# What a run leaves in --out before its first checkpoint is complete (a run killed then can start afresh).
_RUN_FILES = ("train_log.jsonl", "eval_results.json", "eval_results.json.tmp")
_HIDDEN = re.compile(r"\.checkpoint-\d+\.(tmp|old|del)")


def write_json(path: str, obj) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the complete checkpoints in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        match = _CHECKPOINT.fullmatch(name)
        path = os.path.join(out_dir, name)
        if match and os.path.isfile(os.path.join(path, INFO_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"  # prepare_output_dir runs before the process group exists


def prepare_output_dir(out_dir: str, resume: bool) -> str | None:
    """Check --out before anything is trained; returns the checkpoint to resume from, or None for a fresh run.

    A non-empty directory is never overwritten: without --resume it is an error; with --resume the newest checkpoint
    that reads back intact is used (a damaged newer one is named and skipped). A directory that holds only what a
    run writes before its first checkpoint (log, evaluation, a half-written hidden checkpoint) restarts afresh.
    Nothing is written here (under torchrun every rank runs this check before rank 0 writes)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return None
    if not resume:
        raise ValueError(f"--out {out_dir} already exists and is not empty; pass --resume to continue the training "
                         "saved there, or choose another output directory")
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        others = [n for n in os.listdir(out_dir) if n not in _RUN_FILES and not _HIDDEN.fullmatch(n)]
        if others:
            raise ValueError(f"--resume: {out_dir} is not empty but holds no complete checkpoint-<step> directory "
                             f"(it holds {', '.join(sorted(others)[:5])}); choose another output directory")
        errors.warn(f"--resume: {out_dir} holds no complete checkpoint (the run stopped before its first one was "
                    "written); starting from step 0", _is_rank0())
        return None
    problems = []
    for _, path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                errors.warn(f"--resume: {'; '.join(problems)}; falling back to {os.path.basename(path)}, the newest "
                            "intact checkpoint", _is_rank0())
            return path
        problems.append(f"{path} is damaged ({problem})")
    raise ValueError(f"--resume: no checkpoint in {out_dir} can be read back: {'; '.join(problems)}; start a new "
                     "--out (or restore the files from a backup)")


def checkpoint_problem(checkpoint: str) -> str | None:
    """None when every file of the checkpoint reads back, else which file is unreadable and why."""
    def where(name):
        return os.path.join(checkpoint, name)

    try:
        info = read_info(checkpoint)
        if not all(isinstance(info.get(key), int) for key in ("step", "epoch", "steps_per_epoch")):
            return f"{where(INFO_FILE)} lacks step, epoch or steps_per_epoch"
    except ValueError as exc:
        return str(exc)
    try:
        with open(where("config.json")) as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return f"{where('config.json')} is unreadable: {exc}"
    weights = sorted(name for name in os.listdir(checkpoint) if name.endswith(".safetensors"))
    if not weights:
        return f"no model.safetensors in {checkpoint}"
    for name in weights:
        try:
            with safe_open(where(name), "pt") as f:  # reads and checks the header against the file's size
                f.keys()
        except Exception as exc:  # safetensors raises its own error types
            return f"{where(name)} is unreadable: {exc}"
    try:
        state = load_state(checkpoint, "cpu")
        if not {"optimizer", "scheduler", "scaler"} <= set(state):
            return f"{where(STATE_FILE)} lacks the optimizer, scheduler or scaler state"
    except Exception as exc:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ...
        return f"{where(STATE_FILE)} is unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def read_info(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, INFO_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is unreadable: {exc}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is unreadable: expected a JSON object")
    return info


def check_same_settings(checkpoint: str, settings: dict) -> dict:
    """The settings that fix the data order and the LR schedule must not change across a resume."""
    info = read_info(checkpoint)
    saved = info.get("settings", {})
    changed = [f"{key}: {saved.get(key)!r} in the checkpoint, {value!r} now" for key, value in settings.items()
               if saved.get(key) != value]
    if changed:
        raise ValueError(f"--resume from {checkpoint}: the run's settings differ from the ones it was started with "
                         f"({'; '.join(changed)}); resume with the same files and options, or start a new --out")
    return info


def remove_leftovers(out_dir: str) -> None:
    """Hidden directories of saves that a killed run left behind."""
    for name in os.listdir(out_dir):
        if _HIDDEN.fullmatch(name):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _fsync_tree(path: str) -> None:
    """Flush the files to the disk before the rename publishes them (a power loss must not leave a renamed
    checkpoint with empty files)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` survive a power cut (POSIX; elsewhere the rename is as durable as it gets)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """Rename, then delete: a kill during the deletion leaves a hidden directory, never a checkpoint-<step> that
    looks complete but lacks files."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f".{name}.del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(out_dir: str, step: int, model, tokenizer, state: dict, info: dict, keep: int) -> str:
    """Write checkpoint-<step>/ (model, tokenizer, state, info), then delete all but the newest ``keep``.

    Everything goes to a hidden directory that is renamed into place at the end, so a kill at any moment leaves the
    previous checkpoints as they were; a failed save removes its partial files (on a full disk they take space)."""
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = os.path.join(out_dir, f".checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, STATE_FILE))
        write_json(os.path.join(tmp, INFO_FILE), info)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final):  # a resumed run re-saving a step (e.g. one whose checkpoint was damaged)
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    if keep > 0:
        for _, path in list_checkpoints(out_dir)[:-keep]:
            _remove(path)
    return final


def load_state(checkpoint: str, device) -> dict:
    """training_state.pt through the safe loader: tensors and plain containers, no arbitrary objects."""
    return torch.load(os.path.join(checkpoint, STATE_FILE), map_location=device, weights_only=True)
