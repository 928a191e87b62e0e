"""Benchmark the cache loader in each format (zarr, HDF5, FFCV) against a raw read of the same bytes.

    python -m tools.bench.formats [--rows 2048] [--workers 4] [--train-model tiny]

One synthetic cache with DINOv2-B shapes (256 tokens x 768, 32x32 latents; random values) is written
as zarr and converted to HDF5 and FFCV (``cache.convert``). For each format: bytes on disk, one
shuffled epoch through ``open_cache(...).loader(...)`` (best of ``--epochs`` after a warm-up epoch) in
samples/s and MB/s, next to a raw sequential read of the same files in the same run (goal >= 0.7) and
to the zarr loader. Then the training loop from each format against the same step on in-memory
tensors (``tools.bench.train``'s (a)/(b)). Prints a table and writes ``OUT/bench_formats.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cache import open_cache
from cache.cli.config import check_fields, config_to_dict, parse_config
from cache.cli.runtime import make_accelerator
from cache.convert import convert
from tools.bench.cache import machine_info, raw_sequential, synthetic_cache
from tools.bench.cachefiles import shard_paths
from tools.bench.train import timed
from trainer.train import TrainConfig, Trainer, micro_batches


@dataclass(frozen=True)
class BenchFormatsConfig:
    """Benchmark the cache loader in each format against raw reads."""

    out: str = field(default="bench-out", metadata={"help": "folder of the synthetic caches and the JSON"})
    rows: int = field(default=2048, metadata={
        "min": 1, "max": 10_000_000, "help": "rows of the synthetic cache (DINOv2-B: 400 KiB a row)"})
    tokens: int = field(default=256, metadata={"min": 1, "max": 1 << 16, "help": "teacher tokens per row"})
    dim: int = field(default=768, metadata={"min": 1, "max": 1 << 16, "help": "teacher token width"})
    batch: int = field(default=256, metadata={"min": 1, "max": 1 << 16, "help": "loader batch size"})
    workers: int = field(default=4, metadata={
        "min": 1, "max": 256, "help": "loader threads (FFCV: its numba threads, at most the cores)"})
    epochs: int = field(default=2, metadata={
        "min": 1, "max": 1000, "help": "timed epochs per format (the best counts), after one warm-up"})
    train_model: str = field(default="tiny", metadata={"help": "model of the training-loop measurement"})
    train_batch: int = field(default=8, metadata={
        "min": 1, "max": 1 << 16, "help": "batch of the training-loop measurement"})
    train_steps: int = field(default=4, metadata={
        "min": 1, "max": 1_000_000, "help": "timed steps of the training-loop measurement"})
    skip_train: bool = field(default=False, metadata={"help": "measure the loaders only"})

    def __post_init__(self) -> None:
        check_fields(self)


def data_files(c: Any) -> list[Path]:
    """The files holding a cache's rows, for the raw read."""
    if c.format == "zarr":
        return [Path(p) for paths in shard_paths(c).values() for p in paths]
    return [Path(c.url if c.format == "hdf5" else c.beton)]


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def loader_epoch(c: Any, bc: BenchFormatsConfig, epoch: int) -> tuple[float, int, int]:
    """Seconds, samples and bytes of one shuffled epoch."""
    t = time.perf_counter()
    n = nbytes = 0
    for batch in c.loader(bc.batch, seed=0, epoch=epoch, num_workers=bc.workers, prefetch=4):
        n += len(batch["index"])
        nbytes += batch["latents"].nbytes + sum(f.nbytes for f in batch["features"].values())
    return time.perf_counter() - t, n, nbytes


def bench_loaders(bc: BenchFormatsConfig, caches: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for fmt, c in caches.items():
        files = data_files(c)
        block = bc.batch * (bc.tokens * bc.dim + 8 * 32 * 32) * 2
        raw_sequential(files, block)  # warm the page cache
        raw_s, raw_bytes = min(raw_sequential(files, block) for _ in range(2))
        loader_epoch(c, bc, 99)  # warm-up (FFCV compiles its pipeline here)
        best = min(loader_epoch(c, bc, e) for e in range(bc.epochs))
        s, n, nbytes = best
        rows.append({"format": fmt, "disk_bytes": disk_bytes(c.url), "raw_MBps": raw_bytes / raw_s / 1e6,
                     "loader_MBps": nbytes / s / 1e6, "loader_samples_s": n / s})
    zarr_mbps = rows[0]["loader_MBps"]
    for r in rows:
        r["ratio_vs_raw"] = r["loader_MBps"] / r["raw_MBps"]
        r["ratio_vs_zarr_loader"] = r["loader_MBps"] / zarr_mbps
    return rows


def bench_train_loop(bc: BenchFormatsConfig, caches: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """(a) the training loop reading each format against (b) the same step on resident tensors."""
    run_cfg = TrainConfig(cache="-", out="-", device="auto")
    accelerator, device, _ = make_accelerator(run_cfg.device, run_cfg.precision)
    rows = []
    for fmt, c in caches.items():
        cfg = TrainConfig(cache=c.url, out=str(out / "unused"), model=bc.train_model, batch_size=bc.train_batch,
                          steps=bc.train_steps + 2, precision="fp32", loader_workers=bc.workers)
        trainer = Trainer(cfg, c, accelerator, device)
        data = micro_batches(c, cfg, micro=trainer.micro, rank=0, world=1, step=0,
                             steps_per_epoch=len(c) // bc.train_batch, teachers=trainer.teachers_read)
        first = next(iter(c.loader(bc.train_batch, num_workers=bc.workers)))
        resident = [{"latents": first["latents"].to(device), "labels": first["labels"].to(device),
                     "features": {k: v.to(device) for k, v in first["features"].items()}}]
        fns = {"loop": lambda k, t=trainer, d=data: t.train_step(next(d)[1], k),
               "limit": lambda k, t=trainer, r=resident: t.train_step(r, k)}
        res = timed(device, bc.train_steps, 2, 2, fns)
        data.close()
        rows.append({"format": fmt, "model": bc.train_model, "batch": bc.train_batch, "device": device.type,
                     "loop_img_s": bc.train_batch / res["loop_s"], "limit_img_s": bc.train_batch / res["limit_s"],
                     "loop_vs_limit": res["limit_s"] / res["loop_s"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchFormatsConfig, argv)
    if dry:
        return 0
    out = Path(bc.out)
    folder = out / "formats"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    synthetic_cache(folder / "c.zarr", bc.rows, bc.tokens, bc.dim, teacher="dinov2_b")
    caches = {"zarr": open_cache(folder / "c.zarr")}
    caches["hdf5"] = convert(folder / "c.zarr", folder / "c.h5", format="hdf5", progress=False)
    caches["ffcv"] = convert(folder / "c.zarr", folder / "c.ffcv", format="ffcv", progress=False)
    os.sync()
    report: dict[str, Any] = {"config": config_to_dict(bc), "machine": machine_info(torch.device("cpu")),
                              "loader": bench_loaders(bc, caches)}
    if not bc.skip_train:
        report["train"] = bench_train_loop(bc, caches, out)
    with open(out / "bench_formats.json", "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{bc.rows} rows of {(bc.tokens * bc.dim + 8 * 32 * 32) * 2 / 1024:.0f} KiB, batch {bc.batch}, "
          f"{bc.workers} workers")
    print("| format | bytes on disk | loader MB/s | samples/s | raw MB/s | loader / raw | loader / zarr loader |")
    print("|---|---|---|---|---|---|---|")
    for r in report["loader"]:
        print(f"| {r['format']} | {r['disk_bytes']:,} | {r['loader_MBps']:.0f} | {r['loader_samples_s']:.0f} | "
              f"{r['raw_MBps']:.0f} | {r['ratio_vs_raw']:.2f} | {r['ratio_vs_zarr_loader']:.2f} |")
    for r in report.get("train", []):
        print(f"train {r['format']}: {r['model']} B={r['batch']} on {r['device']}: loop {r['loop_img_s']:.1f} img/s, "
              f"in-memory limit {r['limit_img_s']:.1f} img/s, loop/limit {r['loop_vs_limit']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
