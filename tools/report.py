"""One page on a training run: its settings, loss curves, sample grids and metrics (markdown + PNGs).

    python -m tools.report RUN [--samples DIR,DIR] [--out RUN/report]
    make report RUN=runs/xl

Reads what the other entry points wrote: ``RUN/config.json`` and ``RUN/metrics.jsonl``
(``trainer.train``), and, for every sample folder (each folder under RUN holding a ``tools.sample``
``config.json``, plus any given with ``--samples``), its ``grid.png`` and the ``metrics.json``
that ``tools.evaluate --json`` wrote there. Writes ``OUT/report.md`` with the PNGs beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

from cache.cli.config import ConfigError, check_fields, parse_config
from trainer.metrics import plot_losses, read_metrics
from trainer.run import RunRecord, latest_checkpoint


@dataclass(frozen=True)
class ReportConfig:
    """Write a one-page report (markdown + PNGs) on a training run."""

    run: str = field(default="", metadata={"help": "training run folder (trainer.train --out)"})
    samples: str = field(default="", metadata={
        "help": "comma-separated sample folders (tools.sample --out) besides those found under RUN"})
    out: str = field(default="", metadata={"help": "report folder ('' = RUN/report)"})

    def __post_init__(self) -> None:
        if not self.run:
            raise ConfigError("give the RUN folder")
        check_fields(self)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def sample_folders(run: str, extra: list[str]) -> list[str]:
    """Folders under ``run`` (one level) whose config.json a sampler wrote, then ``extra``, without repeats."""
    found = []
    for name in sorted(os.listdir(run)):
        path = os.path.join(run, name)
        if os.path.isdir(path) and "samples" in (_read_json(os.path.join(path, "config.json")) or {}):
            found.append(path)
    for path in extra:
        if os.path.abspath(path) not in map(os.path.abspath, found):
            found.append(path)
    return found


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def training_section(run: str, out: str, record: RunRecord) -> list[str]:
    train, model, cache = record.train, record.model, record.cache
    rows = read_metrics(os.path.join(run, "metrics.jsonl")) if os.path.exists(os.path.join(run, "metrics.jsonl")) else []
    ckpt = latest_checkpoint(os.path.join(run, "checkpoints"))
    lines = ["## Training", ""]
    lines += _table(["setting", "value"], [
        ["model", f"{train['model']} (width {model.get('width')}, blocks {model.get('blocks', model.get('depth'))})"],
        ["cache", f"{train['cache']}: {cache.rows} images at {cache.resolution} px, teacher {cache.teacher}"],
        ["global batch, lr", f"{train['batch_size']}, {train['lr']}"],
        ["losses", f"velocity + {train['align_weight']} x (align + {train['manifold_weight']} x manifold)"],
        ["latest checkpoint", os.path.basename(ckpt) if ckpt else "none"],
    ])
    lines.append("")
    if rows:
        plot_losses(rows, os.path.join(out, "losses.png"), title=f"{train['model']} on {os.path.basename(train['cache'])}")
        lines += ["![loss curves](losses.png)", ""]
        picks = sorted({0, len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4, len(rows) - 1})
        keys = ["step", "loss", "loss_v", "loss_align", "loss_manifold", "cos", "grad_norm", "img_per_s"]
        lines += _table(keys, [[rows[i].get(k) for k in keys] for i in picks]) + [""]
    else:
        lines += ["No metrics logged yet.", ""]
    return lines


def samples_section(folder: str, out: str, index: int) -> list[str]:
    record = _read_json(os.path.join(folder, "config.json")) or {}
    settings, model = record.get("samples", {}), record.get("model", {})
    lines = [f"## Samples: {folder}", ""]
    guidance = (f"CFG {settings.get('cfg')} on t in {settings.get('interval')}" if settings.get("cfg", 1.0) != 1.0
                else "no guidance")
    solver = f" ({settings['solver']})" if settings.get("solver") else ""
    nfe = f" (NFE {settings['nfe']})" if settings.get("nfe") else ""
    quantize = f"; uint8 by {settings['quantize']}" if settings.get("quantize") else ""
    lines += [f"{settings.get('sampler', '?').upper()}{solver}, {settings.get('steps')} steps{nfe}, {guidance}; labels "
              f"{settings.get('labels')}, seed {settings.get('seed')}; {model.get('weights')} weights of step "
              f"{model.get('step')}; VAE {record.get('vae', {}).get('spec')}{quantize}.", ""]
    grid = os.path.join(folder, "grid.png")
    if os.path.exists(grid):
        name = f"grid-{index}.png"
        shutil.copyfile(grid, os.path.join(out, name))
        lines += [f"![sample grid]({name})", ""]
    metrics = _read_json(os.path.join(folder, "metrics.json"))
    if metrics:
        lines += _table(["FID", "sFID", "IS", "precision", "recall", "samples", "reference"],
                        [[metrics.get("fid"), metrics.get("sfid"), metrics.get("inception_score"),
                          metrics.get("precision"), metrics.get("recall"), metrics.get("num_samples"),
                          f"{metrics.get('reference_kind')}: {metrics.get('reference')}"]])
        protocol = metrics.get("protocol") or {}
        if protocol:
            lines += ["", f"IS splits: {protocol['inception_score']['splits']}; precision/recall distances: "
                          f"{protocol['precision_recall']['distances']}."]
        lines += [""] + [f"- {note}" for note in metrics.get("notes", [])] + [""]
    else:
        lines += [f"Not evaluated: run `python -m tools.evaluate {folder}/samples.npz REFERENCE "
                  f"--json {folder}/metrics.json`.", ""]
    return lines


def write_report(cfg: ReportConfig) -> str:
    try:
        record = RunRecord.from_dict(_read_json(os.path.join(cfg.run, "config.json")))
    except ValueError:
        raise FileNotFoundError(f"{cfg.run}: no config.json of a training run") from None
    out = cfg.out or os.path.join(cfg.run, "report")
    os.makedirs(out, exist_ok=True)
    lines = [f"# Run report: {os.path.abspath(cfg.run)}", ""]
    if record.cache.random_weights:
        lines += ["> **Random-weight encoders.** This run's cache was encoded with random-weight VAE and teacher "
                  "(plumbing and speed only): its losses, samples and metrics say nothing about quality.", ""]
    lines += training_section(cfg.run, out, record)
    extra = [s for s in cfg.samples.split(",") if s]
    for i, folder in enumerate(sample_folders(cfg.run, extra)):
        lines += samples_section(folder, out, i)
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> int:
    cfg, dry_run = parse_config(ReportConfig, argv, positional=("run",))
    if dry_run:
        return 0
    try:
        print(write_report(cfg))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
