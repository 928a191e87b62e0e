"""Process plumbing shared by the entry points (``pipeline.build``, ``trainer.train``, ``tools.*``).

Like :mod:`cache.config`, it lives in ``cache`` only because ``cache`` is the one package every
other package may import: the device fix-up for accelerate, the one-time logging setup and atomic JSON records.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import torch

__all__ = ["configure_device", "resolve_device", "setup_logging", "write_json"]


def configure_device(device: torch.device) -> torch.device:
    """Give a bare 'cuda' its index (accelerate's single-process device) and allow TF32 matmuls and
    convolutions, the fp32 setting of every entry point; a launched CPU rank's "cpu:0" becomes "cpu"
    (safetensors refuses an indexed CPU device)."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def resolve_device(spec: str) -> torch.device:
    """A single-process entry point's ``--device``: "auto" (CUDA if there is one), "cpu", "cuda", "cuda:N";
    configured by :func:`configure_device`."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    return configure_device(torch.device(spec))


def setup_logging(rank: int, log_file: str | None, *, stream: logging.Handler | None = None) -> None:
    """Rank 0 logs INFO to stderr (or ``stream``) and to ``log_file``; other ranks only warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = stream or logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0 and log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def write_json(path: str, data: Any) -> None:
    """``data`` as indented JSON at ``path``, atomically (a temporary file, then a rename): the records
    entry points leave next to their outputs are never half-written, and never hold NaN or infinity
    (ValueError: JSON has no such numbers, and a reader would take them for results)."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, allow_nan=False)
    os.replace(path + ".tmp", path)
