"""Checkpoints: weights, EMA and optimizer moments in safetensors, the rest in a small JSON file.

    RUN/checkpoints/step-00010000/model.safetensors      raw weights (fp32), keys of model.state_dict()
                                  ema.safetensors        EMA weights, same keys
                                  optimizer.safetensors  AdamW moments, keys "<param index>.<name>"
                                  state.json             step, optimizer param groups, ...

A checkpoint is written into a temporary folder next to its final name and renamed into place,
so a folder named ``step-*`` is always complete, whatever moment a run is killed at. Nothing else
is needed to resume: every random draw of a step is a pure function of (seed, step).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "prune_checkpoints", "clean_partial", "load_run_model"]

_logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8,})$")


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
    """Write checkpoint ``step`` under ``folder`` atomically; returns its path."""
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"step-{step:08d}")
    tmp = os.path.join(folder, f".tmp-step-{step:08d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    opt_tensors, groups = _optimizer_tensors(optimizer)
    meta = {"step": str(step)}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, os.path.join(tmp, "model.safetensors"), meta)
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"), meta)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"), meta)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "param_groups": groups, **state}, f, indent=2)
    for name in os.listdir(tmp):
        fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    _fsync_dir(tmp)
    if os.path.exists(final):  # a rerun that repeats a step it had already saved
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    return final


def latest_checkpoint(folder: str) -> str | None:
    """The complete checkpoint with the highest step, or None."""
    if not os.path.isdir(folder):
        return None
    steps = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NAME.match(name)))
    return os.path.join(folder, steps[-1][1]) if steps else None


def clean_partial(folder: str) -> None:
    """Remove temporary folders a killed run left behind."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-step-"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def prune_checkpoints(folder: str, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    names = sorted(name for name in os.listdir(folder) if _NAME.match(name))
    for name in names[:-keep]:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def load_checkpoint(path: str, *, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder: ``{"model", "ema", "optimizer" (a state_dict), "state"}``."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    opt = load_file(os.path.join(path, "optimizer.safetensors"), device=str(device))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    return {
        "model": load_file(os.path.join(path, "model.safetensors"), device=str(device)),
        "ema": load_file(os.path.join(path, "ema.safetensors"), device=str(device)),
        "optimizer": {"state": per_param, "param_groups": state.pop("param_groups")},
        "state": state,
    }


def load_run_model(run_dir: str, *, weights: str = "ema", step: int | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a training run with its ``weights`` ("ema" or "raw") from the latest checkpoint
    (or ``step``), in eval mode, and the run's resolved config (``config.json``)."""
    from .models import create_model

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    with open(os.path.join(run_dir, "config.json")) as f:
        run = json.load(f)
    folder = os.path.join(run_dir, "checkpoints")
    path = latest_checkpoint(folder) if step is None else os.path.join(folder, f"step-{step:08d}")
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {folder}")
    model = create_model(run["train"]["model"], **run["model"])
    state = load_file(os.path.join(path, "ema.safetensors" if weights == "ema" else "model.safetensors"),
                      device=str(device))
    model.load_state_dict(state)
    return model.to(device).eval(), run
