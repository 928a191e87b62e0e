"""Checkpoints: weights, EMA and optimizer moments in safetensors, the rest in a small JSON file.

    RUN/checkpoints/step-00010000/model.safetensors      raw weights (fp32), keys of model.state_dict()
                                  ema.safetensors        EMA weights, same keys
                                  optimizer.safetensors  AdamW moments, keys "<param index>.<name>"
                                  state.json             step, optimizer param groups, ...
                                  manifest.json          sha256 and size of each file above (written last)

A checkpoint is written into a temporary folder next to its final name and renamed into place,
so a folder named ``step-*`` is always complete, whatever moment a run is killed at; pruning renames
a folder to ``.trash-step-*`` before deleting it, so a kill while pruning leaves no half-deleted
``step-*`` either. Loading checks every file against ``manifest.json``: a flipped byte or a cut
file is a :class:`CheckpointError` naming the file, and a resumed run falls back to the previous
checkpoint. Nothing else is needed to resume: every random draw of a step is a pure function of
(seed, step).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cache.cli.runtime import file_sha256

__all__ = ["CheckpointError", "CheckpointWriteError", "save_checkpoint", "load_checkpoint", "verify_checkpoint", "checkpoints",
           "prune_checkpoints", "clean_partial", "nonfinite_tensors"]

_logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8,})$")
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint folder is damaged or incomplete; the message names the file and says what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, read-only file system, no permission); nothing of it was
    left behind. ``errno`` is the system's error number (None if unknown)."""

    ADVICE = {errno.ENOSPC: "the disk is full: free space there (or keep fewer checkpoints, --keep-ckpts)",
              errno.EDQUOT: "the disk quota is exhausted: free space there (or keep fewer checkpoints, --keep-ckpts)",
              errno.EROFS: "the file system is read-only: remount it read-write, or move the run folder elsewhere",
              errno.EACCES: "permission denied: fix the permissions of the run folder",
              errno.EPERM: "permission denied: fix the permissions of the run folder"}

    def __init__(self, path: str, error: BaseException) -> None:
        if isinstance(error, OSError):
            self.errno, what = error.errno, error.strerror or str(error)
        else:  # safetensors reports an I/O error as text: "... I/O error: <strerror> (os error N)"
            found = re.search(r"os error (\d+)", str(error))
            self.errno, what = (int(found.group(1)) if found else None), str(error)
            if self.errno is not None:
                what = os.strerror(self.errno)
        advice = self.ADVICE.get(self.errno, "check that the run folder can be written")
        super().__init__(f"cannot write checkpoint {path} ({what}): {advice}; then rerun the same command to "
                         "resume from the last checkpoint (nothing partial was left)")



def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def save_checkpoint(
    folder: str,
    step: int,
    *,
    model: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
) -> str:
    """Write checkpoint ``step`` under ``folder`` atomically; returns its path. Weights holding a NaN or an
    infinity are never written (CheckpointError naming them)."""
    for what, tensors in (("weights", model), ("EMA weights", ema)):
        bad = nonfinite_tensors(tensors)
        if bad:
            raise CheckpointError(f"step {step}: the {what} hold NaN or infinite values ({', '.join(bad[:3])}"
                                  f"{', ...' if len(bad) > 3 else ''}); no checkpoint written")
    final = os.path.join(folder, f"step-{step:08d}")
    tmp = os.path.join(folder, f".tmp-step-{step:08d}")
    try:
        _write_checkpoint(folder, step, final, tmp, model=model, ema=ema, optimizer=optimizer, state=state)
    except (OSError, SafetensorError) as e:  # a full disk, a read-only file system, no permission
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(final, e) from None
    return final


def _write_checkpoint(folder: str, step: int, final: str, tmp: str, *, model: Mapping[str, torch.Tensor],
                      ema: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
                      ) -> None:
    """:func:`save_checkpoint`'s files, into ``tmp`` and then renamed to ``final``."""
    os.makedirs(folder, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    opt_tensors, groups = _optimizer_tensors(optimizer)
    meta = {"step": str(step)}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, os.path.join(tmp, "model.safetensors"), meta)
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"), meta)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"), meta)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "param_groups": groups, **state}, f, indent=2, allow_nan=False)
    files = {name: {"sha256": file_sha256(os.path.join(tmp, name)), "bytes": os.path.getsize(os.path.join(tmp, name))}
             for name in FILES}
    with open(os.path.join(tmp, MANIFEST), "w") as f:  # last: its presence says every file above is whole
        json.dump({"step": step, "files": files}, f, indent=2)
    for name in os.listdir(tmp):
        fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    _fsync_dir(tmp)
    if os.path.exists(final):  # a rerun that repeats a step it had already saved (or a damaged one)
        _remove(folder, os.path.basename(final))
    os.replace(tmp, final)
    _fsync_dir(folder)


def checkpoints(folder: str) -> list[str]:
    """Every ``step-*`` checkpoint folder under ``folder``, newest (highest step) first."""
    if not os.path.isdir(folder):
        return []
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NAME.match(name))), reverse=True)
    return [os.path.join(folder, name) for _, name in steps]


def _remove(folder: str, name: str) -> None:
    """Delete ``folder/name`` by renaming it to a ``.trash-`` name first: no ``step-*`` is ever half deleted."""
    trash = os.path.join(folder, f".trash-{name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(os.path.join(folder, name), trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(folder: str) -> None:
    """Remove the temporary and half-deleted folders a killed run left behind (only our own names)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith((".tmp-step-", ".trash-step-")):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def prune_checkpoints(folder: str, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all). The newest one is the one just written and
    checked finite, so the last complete, finite checkpoint is never removed."""
    if keep <= 0:
        return
    for path in checkpoints(folder)[keep:]:
        _remove(folder, os.path.basename(path))


def verify_checkpoint(path: str, files: tuple[str, ...] = FILES) -> None:
    """Check ``files`` of a checkpoint against its ``manifest.json`` (size and sha256); CheckpointError
    naming the first damaged file. A folder without a manifest (written before checksums) passes
    unverified, with a warning."""
    what = "delete that checkpoint folder to resume from the one before it"
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        _logger.warning("checkpoint %s has no %s (written before checksums): its files are not verified", path,
                        MANIFEST)
        return
    try:
        with open(manifest_path) as f:
            recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({type(e).__name__}: {e}); {what}") from None
    for name in files:
        file = os.path.join(path, name)
        entry = recorded.get(name) if isinstance(recorded, dict) else None
        if entry is None:
            raise CheckpointError(f"{manifest_path} records no checksum of {name}; {what}")
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing; {what}")
        size = os.path.getsize(file)
        if size != entry.get("bytes"):
            raise CheckpointError(f"{file} has {size} bytes, {entry.get('bytes')} were written (cut short or "
                                  f"replaced); {what}")
        if file_sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"{file} does not match the sha256 recorded when it was written (damaged "
                                  f"on disk); {what}")


def _load_file(path: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; delete that checkpoint folder to resume from the one before "
                              "it") from None
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); delete that "
                              "checkpoint folder to resume from the one before it") from None


def load_checkpoint(path: str, *, device: torch.device | str = "cpu", verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder: ``{"model", "ema", "optimizer" (a state_dict), "state"}``, each file checked
    against the folder's manifest first (:func:`verify_checkpoint`); CheckpointError if damaged."""
    if verify:
        verify_checkpoint(path)
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path) as f:
            state = json.load(f)
        int(state["step"]), list(state["param_groups"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{state_path} is missing or unreadable ({type(e).__name__}: {e}); delete that "
                              "checkpoint folder to resume from the one before it") from None
    opt = _load_file(os.path.join(path, "optimizer.safetensors"), device)
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    return {
        "model": _load_file(os.path.join(path, "model.safetensors"), device),
        "ema": _load_file(os.path.join(path, "ema.safetensors"), device),
        "optimizer": {"state": per_param, "param_groups": state.pop("param_groups")},
        "state": state,
    }


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
