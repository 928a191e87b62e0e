"""How random the loader's orders are: the full permutation against the block order (shuffled chunks plus a
shuffle window, :func:`cache.loader.block_order`) on an ImageNet-shaped epoch, computed (no data is read).

    python -m tools.bench.order [--rows 1281167] [--classes 1000] [--block 16] [--batch 256] [--world 1]
        [--windows 256 1024 4096 16384] [--seed 0] [--json OUT.json]

Rows are numbered as a build numbers them: in source order, class after class (ImageNet's folders), so the
16 rows of one inner chunk are 16 images of one class. Per order:

- ``classes/batch``: distinct classes in a global batch (``--batch`` rows from each of ``--world`` ranks; mean
  over the epoch's batches);
- ``chunks/batch``: distinct inner chunks a batch draws from (its rows' sources of correlation);
- ``batches/chunk``: distinct batches the rows of one chunk land in (mean over chunks; at most ``--block``);
- ``same-chunk pairs/batch``: pairs of rows of a batch that come from one chunk (mean);
- ``neighbour gap``: median of |position(row i) - position(row i+1)| / rows over neighbouring rows (a full
  permutation: about 0.29; 0: neighbours read together);
- ``epoch overlap``: the fraction of the first global batch that is also in the first global batch of the
  next epoch (about 0 for both: each epoch draws anew).

Prints a markdown table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from cache.loader import block_order, epoch_order, rank_batches

IMAGENET_TRAIN_IMAGES = 1_281_167


def class_sorted_labels(rows: int, classes: int) -> np.ndarray:
    """Labels of rows in a build's order: class after class, as evenly as ``rows`` allows."""
    return (np.arange(rows, dtype=np.int64) * classes // rows).astype(np.int64)


def _distinct_per_row(a: np.ndarray) -> np.ndarray:
    """Distinct values in each row of a 2-d integer array."""
    s = np.sort(a, axis=1)
    return 1 + (np.diff(s, axis=1) != 0).sum(axis=1)


def randomness(order: np.ndarray, labels: np.ndarray, *, block: int, batch: int, world: int = 1) -> dict[str, float]:
    """The measures of the module docstring for one epoch order, over its global batches (``batch`` rows from
    each of ``world`` ranks: what one optimizer step averages)."""
    n = len(order)
    spans = rank_batches(n, batch_size=batch * world)
    batches = np.stack([order[lo:hi] for lo, hi in spans])
    chunks = batches // block
    _, counts = np.unique(np.arange(len(chunks))[:, None] * (n // block + 1) + chunks, return_counts=True)
    pairs = float((counts * (counts - 1) // 2).sum()) / len(batches)
    # batches/chunk over the whole epoch (every rank): which global batch each position falls in
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[order] = np.arange(n) // (batch * world)
    key = np.unique((np.arange(n) // block) * (n // (batch * world) + 1) + batch_of)
    per_chunk = np.bincount(key // (n // (batch * world) + 1))
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return {
        "classes_per_batch": float(_distinct_per_row(labels[batches]).mean()),
        "chunks_per_batch": float(_distinct_per_row(chunks).mean()),
        "batches_per_chunk": float(per_chunk[per_chunk > 0].mean()),
        "same_chunk_pairs_per_batch": pairs,
        "neighbour_gap": float(np.median(np.abs(np.diff(position))) / n),
    }


def measure(*, rows: int = IMAGENET_TRAIN_IMAGES, classes: int = 1000, block: int = 16, batch: int = 256,
            world: int = 1, windows: tuple[int, ...] = (256, 1024, 4096, 16384), seed: int = 0) -> list[dict[str, Any]]:
    """One record per order: the permutation, then the block order at each window."""
    ids = np.arange(rows, dtype=np.int64)
    labels = class_sorted_labels(rows, classes)
    out = []

    def first_overlap(make: Any) -> float:
        a, b = make(0)[:batch * world], make(1)[:batch * world]
        return len(np.intersect1d(a, b)) / (batch * world)

    perm = epoch_order(ids, seed=seed, epoch=0)
    out.append({"order": "permutation", "window": None,
                **randomness(perm, labels, block=block, batch=batch, world=world),
                "epoch_overlap": first_overlap(lambda e: epoch_order(ids, seed=seed, epoch=e))})
    for w in windows:
        def make(e: int, w: int = w) -> np.ndarray:
            return block_order(ids, block_rows=block, window=w, seed=seed, epoch=e, batch_size=batch, world_size=world)
        out.append({"order": "blocks", "window": w, **randomness(make(0), labels, block=block, batch=batch,
                                                                 world=world),
                    "epoch_overlap": first_overlap(make)})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| order | window (rows) | classes/batch | chunks/batch | batches/chunk | same-chunk pairs/batch | "
             "neighbour gap | epoch overlap |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['order']} | {r['window'] or '-'} | {r['classes_per_batch']:.1f} | {r['chunks_per_batch']:.1f} "
                     f"| {r['batches_per_chunk']:.2f} | {r['same_chunk_pairs_per_batch']:.2f} | "
                     f"{r['neighbour_gap']:.2g} | {r['epoch_overlap']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=IMAGENET_TRAIN_IMAGES)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--block", type=int, default=16, help="rows per inner chunk (the build's default)")
    p.add_argument("--batch", type=int, default=256, help="rows per batch of one rank")
    p.add_argument("--world", type=int, default=1, help="ranks (each reads its own blocks)")
    p.add_argument("--windows", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the numbers here")
    a = p.parse_args(argv)
    table = measure(rows=a.rows, classes=a.classes, block=a.block, batch=a.batch, world=a.world,
                    windows=tuple(a.windows), seed=a.seed)
    print(f"{a.rows:,} rows in {a.classes} classes (class after class), chunks of {a.block}, batch {a.batch}, "
          f"{a.world} rank(s), seed {a.seed}")
    print(markdown(table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": a.rows, "classes": a.classes, "block": a.block, "batch": a.batch, "world": a.world,
                       "seed": a.seed, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
