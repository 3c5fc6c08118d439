"""Errors a training run stops with (the command prints them and exits with status 1), and disk-full detection."""

from __future__ import annotations

import errno
import sys

# What torch.save / safetensors / file writes raise when the disk fills up: OSError(ENOSPC or EDQUOT), torch's
# zip writer "[enforce fail at inline_container.cc] . unexpected pos ..." or "file write failed", and safetensors'
# "IoError(Os { code: 28, kind: StorageFull, ... })".
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("unexpected pos", "file write failed", "No space left on device", "StorageFull", "Disk quota")


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the message explains (not a bug in the command's arguments)."""


class TrainingDivergedError(TrainingError):
    """The loss, a gradient norm or the weights became NaN or infinite."""


class DiskFullError(TrainingError):
    """Writing a checkpoint, the log or the final model ran out of disk space."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(exc, (OSError, RuntimeError)) and any(text in str(exc) for text in _DISK_FULL_TEXT)


def warn(message: str, is_main: bool = True) -> None:
    """A warning for the person running the command, on stderr, once (from the main process)."""
    if is_main:
        print(f"fastbert: warning: {message}", file=sys.stderr, flush=True)
