"""Parameter and MAC counts of the model presets against the papers' numbers.

Usage: python -m tools.macs [--model sitdown-xl ...] [--input-size 32] [--head paper|yes|no] [--json PATH]

Models are built on the meta device (no memory, seconds for XL) and run once at batch 1 under
``torch.utils.flop_counter.FlopCounterMode``; MACs = flops / 2. On the meta device attention runs
as batched matmuls, which the counter sees; ``GMACs no-attn`` leaves out those score and value
products (QK^T and AV). On real CPU tensors the counter misses attention altogether (the fused
CPU kernel has no flop formula): the recipe's stand-in counts (109.28 / 24.12 GMACs for XL / B)
are the ``no-attn`` column, which matches the U-REPA paper's GMACs, while DiT's 118.6 for
SiT-XL/2 includes attention.

``--head paper`` (default) measures each model as its paper counts it: SiT-down with the
alignment head (projector MLP on the 64 middle tokens, then upsampling), SiT without it (REPA's
675M for SiT-XL/2 excludes the projector). The teacher grid is input_size / 2 tokens per side
(16 at 256 px, 32 at 512 px).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from cache.cli.config import check_fields, parse_config
from trainer.models import MODEL_PRESETS, count_params, create_model

# name -> (params in M, GMACs at 256 px or None, whether the paper's counts include the alignment head)
PAPER: dict[str, tuple[float, float | None, bool]] = {
    "sitdown-b": (199.7, 24.1, True),
    "sitdown-l": (686.6, 79.3, True),
    "sitdown-xl": (954.4, 109.3, True),
    "sit-b": (130.0, None, False),
    "sit-l": (458.0, None, False),
    "sit-xl": (675.0, 118.6, False),
}
ATTENTION_OPS = ("aten.bmm", "scaled_dot_product")


def count_macs(model: torch.nn.Module, *, input_size: int) -> tuple[float, float]:
    """(all MACs, attention score/value MACs) of one forward at batch 1 on the model's device."""
    param = next(model.parameters())
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, input_size, input_size, device=param.device)
    t = torch.rand(1, device=param.device)
    y = torch.zeros(1, dtype=torch.long, device=param.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    ops = counter.get_flop_counts()["Global"]
    attention = sum(n for op, n in ops.items() if any(a in str(op) for a in ATTENTION_OPS))
    return counter.get_total_flops() / 2, attention / 2


def measure(name: str, *, input_size: int = 32, head: str = "paper") -> dict:
    """One table row for preset ``name``; ``head`` is "paper", "yes" or "no" (see the module docstring).

    The paper's numbers are left out (None) where the model is not measured as the paper counts it:
    with or without the head against its convention, or at another input size (GMACs).
    """
    paper_params, paper_gmacs, paper_head = PAPER.get(name, (None, None, True))
    with_head = paper_head if head == "paper" else head == "yes"
    with torch.device("meta"):
        model = create_model(name, input_size=input_size, teacher_grid=input_size // 2,
                             teacher_dim=MODEL_PRESETS[name].teacher_dim if with_head else 0)
    macs, attention = count_macs(model, input_size=input_size)
    params = count_params(model) / 1e6
    gmacs, gmacs_no_attn = macs / 1e9, (macs - attention) / 1e9
    if with_head != paper_head:
        paper_params = paper_gmacs = None
    if input_size != 32:
        paper_gmacs = None
    return dict(
        model=name, head=with_head, params_m=params, paper_params_m=paper_params,
        params_ratio=params / paper_params if paper_params else None,
        gmacs=gmacs, gmacs_no_attn=gmacs_no_attn, paper_gmacs=paper_gmacs,
        gmacs_ratio=gmacs / paper_gmacs if paper_gmacs else None,
        gmacs_no_attn_ratio=gmacs_no_attn / paper_gmacs if paper_gmacs else None,
    )


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of ``measure`` rows."""
    columns = [("model", "model", "{}"), ("head", "head", "{}"), ("params(M)", "params_m", "{:.1f}"),
               ("paper", "paper_params_m", "{:.1f}"), ("ratio", "params_ratio", "{:.3f}"),
               ("GMACs", "gmacs", "{:.2f}"), ("no-attn", "gmacs_no_attn", "{:.2f}"),
               ("paper", "paper_gmacs", "{:.1f}"), ("ratio", "gmacs_ratio", "{:.3f}"),
               ("no-attn ratio", "gmacs_no_attn_ratio", "{:.3f}")]
    cells = [[title for title, _, _ in columns]]
    cells += [[_cell(row[key], fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in cells)


@dataclass(frozen=True)
class MacsConfig:
    """Count parameters and MACs of model presets."""

    model: tuple[str, ...] = field(default=tuple(n for n in MODEL_PRESETS if n != "tiny"), metadata={
        "help": "presets", "choices": tuple(MODEL_PRESETS)})
    input_size: int = field(default=32, metadata={"min": 1, "max": 1024, "help": "latent size (32 = 256 px)"})
    head: Literal["paper", "yes", "no"] = field(default="paper", metadata={
        "help": "count the alignment head: as each paper does, always, or never"})
    json: str = field(default="", metadata={"help": "also write the rows to this JSON file"})

    def __post_init__(self) -> None:
        check_fields(self)


def main(argv: list[str] | None = None) -> None:
    args, dry_run = parse_config(MacsConfig, argv, description=__doc__.split("\n\n")[0])
    if dry_run:
        return
    rows = [measure(name, input_size=args.input_size, head=args.head) for name in args.model]
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
