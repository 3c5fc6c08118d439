"""Output directory rules and checkpoints.

Layout of ``--out DIR``::

    DIR/config.json, model.safetensors, tokenizer files   the final model (save_pretrained format)
    DIR/eval_results.json                                 the latest evaluation, plus one entry per epoch
    DIR/train_log.jsonl                                   one JSON line per optimizer step
    DIR/checkpoint-<step>/                                model + tokenizer (save_pretrained, safetensors),
        training_state.pt                                 optimizer, LR schedule and loss-scaler state
        training_state.json                               step, epoch, settings the run must resume with

A checkpoint is written to a hidden temporary directory and renamed into place, so a run killed while saving
leaves the previous checkpoint as the latest complete one. training_state.pt holds tensors and plain containers
only and is read back with ``torch.load(weights_only=True)``. The random state needs no saving: data order and
masking derive from (seed, epoch, example) and dropout from (seed, step, rank).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

STATE_FILE = "training_state.pt"
INFO_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def write_json(path: str, obj) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
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


def prepare_output_dir(out_dir: str, resume: bool) -> str | None:
    """Check --out before anything is trained; returns the checkpoint to resume from, or None for a fresh run.

    A non-empty directory is never overwritten: without --resume it is an error, with --resume it must hold a
    checkpoint. Nothing is written here (under torchrun every rank runs this check before rank 0 writes)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return None
    if not resume:
        raise ValueError(f"--out {out_dir} already exists and is not empty; pass --resume to continue the training "
                         "saved there, or choose another output directory")
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise ValueError(f"--resume: {out_dir} is not empty but holds no complete checkpoint-<step> directory; "
                         "choose another output directory")
    return checkpoints[-1][1]


def read_info(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, INFO_FILE)) as f:
        return json.load(f)


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


def save_checkpoint(out_dir: str, step: int, model, tokenizer, state: dict, info: dict, keep: int) -> str:
    """Write checkpoint-<step>/ (model, tokenizer, state, info), then delete all but the newest ``keep``."""
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = os.path.join(out_dir, f".checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    write_json(os.path.join(tmp, INFO_FILE), info)
    if os.path.isdir(final):  # a resumed run re-saving the step it resumed from
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for _, path in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(path)
    return final


def load_state(checkpoint: str, device) -> dict:
    """training_state.pt through the safe loader: tensors and plain containers, no arbitrary objects."""
    return torch.load(os.path.join(checkpoint, STATE_FILE), map_location=device, weights_only=True)
