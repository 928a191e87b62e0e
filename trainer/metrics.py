"""Run outputs for humans and tools: ``metrics.jsonl``, tensorboard events and a loss-curve PNG.

Each log point is one JSON line ``{"step": ..., "loss": ..., ...}`` (means over the steps since the
previous line and over all ranks). A resumed run first drops the lines after its checkpoint, so the
file always reads as one uninterrupted run; tensorboard does the same through ``purge_step``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MetricsLog", "read_metrics", "plot_losses"]

LOSS_KEYS = ("loss", "loss_v", "loss_align", "loss_manifold")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All complete lines of a ``metrics.jsonl`` (a torn last line, from a kill, is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class MetricsLog:
    """Appends metric lines to ``RUN/metrics.jsonl`` and tensorboard (rank 0 only)."""

    def __init__(self, run_dir: str, *, resume_step: int, tensorboard: bool = True) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(dict(row)) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_losses(rows: Sequence[Mapping[str, Any]], path: str, *, title: str = "") -> str | None:
    """Loss curves (total, velocity, alignment, manifold; log-x once past 100 steps) as a PNG."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in LOSS_KEYS if any(k in r for r in rows)]
    if not keys:  # every logged window was skipped (fp16 overflows, --skip-nonfinite): no losses to draw
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes[0], keys):
        values = [r.get(key, float("nan")) for r in rows]
        ax.plot(steps, values, lw=1, label="per logged window")
        if len(values) >= 20:  # a running mean over ~5% of the points
            k = max(2, len(values) // 20)
            smooth = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, lw=2, label=f"running mean of {k}")
        ax.set_title(key)
        ax.legend(fontsize="small")
        ax.set_xlabel("step")
        if steps[-1] > 100:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
