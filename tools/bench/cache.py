"""Benchmark the build and the loader against their limits, measured in the same run.

    python -m tools.bench.cache [--preset cpu|gpu] [--images N] [--precisions fp32,bf16] [--compile]

Build: img/s of ``pipeline.build`` on synthetic JPEGs (ImageNet-like sizes) next to the encoders'
forward-only img/s on device-resident batches of the same size, precision and compile setting
(goal: ratio >= 0.9 on a GPU). The build rate is the steady state between the first and the last
shard commit (model loading, worker start-up and compilation excluded).

Loader: samples/s and MB/s of one shuffled epoch of a cache with DINOv2-B shapes next to a raw
sequential read of the same shard files (goal: ratio >= 0.7), plus single-row ``pread`` in random
order and zarr's own reads as further references.

Random weights throughout: the figures are speed, never quality. Prints a table last and writes
``OUT/bench_cache.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache import CacheWriter, open_cache, zarr_layout
from cache.cli.config import ConfigError, check_fields, config_to_dict, parse_config
from cache.cli.runtime import autocast_dtype, resolve_device
from pipeline.build import BuildConfig, Encoders, build, load_encoders
from tools.bench.cachefiles import progress_records, shard_paths


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark the feature-cache build and loader."""

    out: str = field(default="bench-out", metadata={"help": "folder for the synthetic data and results"})
    images: int = field(default=192, metadata={
        "min": 1, "max": 1_000_000, "help": "synthetic JPEGs for the build benchmark"})
    resolution: int = field(default=256, metadata={"min": 8, "max": 4096, "help": "image side"})
    vae: str = field(default="tiny", metadata={"help": "VAE spec (pipeline.build --vae)"})
    teacher: str = field(default="tiny", metadata={"help": "teacher spec (pipeline.build --teacher)"})
    batch_size: int = field(default=16, metadata={
        "min": 1, "max": 1 << 16, "help": "images per encoder batch"})
    precisions: str = field(default="fp32", metadata={
        "help": "comma-separated encoder precisions to measure (fp32, bf16)"})
    compile: bool = field(default=False, metadata={"help": "also measure torch.compile'd encoders"})
    workers: int = field(default=2, metadata={"min": 0, "max": 256, "help": "decoding processes"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    forward_iters: int = field(default=5, metadata={"min": 1, "max": 10000, "help": "timed encoder forwards"})
    loader_rows: int = field(default=3072, metadata={
        "min": 1, "max": 10_000_000, "help": "rows of the synthetic loader cache (DINOv2-B: 400 KiB a row)"})
    loader_batch: int = field(default=256, metadata={
        "min": 1, "max": 1 << 16, "help": "rows per loader batch"})
    loader_workers: str = field(default="1,2,4", metadata={"help": "comma-separated reader thread counts to measure"})
    tokens: int = field(default=256, metadata={
        "min": 1, "max": 1 << 16, "help": "teacher tokens per row of the synthetic loader cache"})
    dim: int = field(default=768, metadata={
        "min": 1, "max": 1 << 16, "help": "teacher feature width of the synthetic loader cache"})
    skip_build: bool = field(default=False, metadata={"help": "skip the build benchmark"})
    skip_loader: bool = field(default=False, metadata={"help": "skip the loader benchmark"})
    chunk_sweep: bool = field(default=False, metadata={
        "help": "also compare chunk and shard sizes (zarr reads and the loader)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if any(p not in ("fp32", "bf16") for p in self.precisions.split(",")):
            raise ConfigError(f"--precisions takes fp32 and/or bf16, got {self.precisions!r}")


PRESETS = {
    "cpu": {},
    "gpu": dict(images=3072, vae="random:stabilityai/sd-vae-ft-ema", teacher="random:vit_base_patch14_dinov2.lvd142m",
                batch_size=128, precisions="fp32,bf16", workers=15, forward_iters=10, loader_rows=8192,
                loader_workers="2,4,8"),
}


# ------------------------------------------------------------------------------------------
# Synthetic JPEGs


def _write_jpeg(args: tuple[str, int]) -> None:
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    h, w = (375, 500) if seed % 3 else (500, 333)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(5, 40, size=(3, 2))
    img = np.stack([127 + 90 * np.sin(xx / f[c, 0] + c) * np.cos(yy / f[c, 1]) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def synthetic_folder(root: Path, n: int, classes: int = 10, procs: int | None = None) -> Path:
    marker = root / f".n{n}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for i in range(n):
        d = root / f"class{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"img{i:06d}.JPEG"), i))
    with Pool(procs or os.cpu_count()) as pool:
        pool.map(_write_jpeg, jobs, chunksize=16)
    marker.touch()
    return root


# ------------------------------------------------------------------------------------------
# Build against forward-only


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing boundaries)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a benchmark ran on, for its JSON and its printed table."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]}


def forward_only(cfg: BuildConfig, device: torch.device, iters: int) -> tuple[float, Encoders]:
    """img/s of the encoders alone on a device-resident uint8 batch (no decode, no copies, no writes)."""
    _, vae, teachers, _ = load_encoders(cfg)
    enc = Encoders(vae, teachers, flip=False, autocast=autocast_dtype(cfg.precision)).to(device).eval()
    if cfg.compile:
        enc.compile()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, 256, (cfg.batch_size, cfg.resolution, cfg.resolution, 3), dtype=torch.uint8, generator=gen).to(device)
    for _ in range(2):
        enc(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        enc(x)
    sync(device)
    rate = iters * cfg.batch_size / (time.perf_counter() - t)
    return rate, enc


def row_error(enc: Encoders, path: str, source: Path, device: torch.device, rows: int = 8) -> float:
    """Largest relative L2 error between stored rows and the same images encoded again, apart.
    Proves that the timed build stored the right rows (float16 storage, batch-dependent kernels)."""
    from pipeline.decode import load_image

    c = open_cache(path)
    images = torch.stack([torch.from_numpy(load_image(str(source / c.source_path(r)), c.layout.resolution,
                                                      max_pixels=1 << 28)) for r in range(rows)])
    lat, feats = enc(images.to(device))
    pairs = [(c.latents[:rows], lat)] + [(c.features[k][:rows], feats[k]) for k in c.features]
    err = 0.0
    for stored, fresh in pairs:
        fresh = fresh.float().cpu().numpy()
        err = max(err, float(np.linalg.norm(stored.astype(np.float32) - fresh) / np.linalg.norm(fresh)))
    return err


def steady_build_rate(path: str, skip_first: int = 2) -> float:
    """img/s between the commits of the first ``skip_first`` shards and the last one."""
    records = sorted(progress_records(open_cache(path)), key=lambda r: r["time"])
    if len(records) <= skip_first + 1:
        skip_first = 0
    head, tail = records[skip_first], records[skip_first + 1:]
    rows = sum(r["rows"][1] - r["rows"][0] for r in tail)
    return rows / max(tail[-1]["time"] - head["time"], 1e-9)


def bench_build(bc: BenchConfig, out: Path) -> list[dict[str, Any]]:
    src = synthetic_folder(out / "jpegs", bc.images)
    results = []
    for precision in bc.precisions.split(","):
        for compiled in ([False, True] if bc.compile else [False]):
            cfg = BuildConfig(source=str(src), out=str(out / f"build-{precision}{'-compile' if compiled else ''}.zarr"),
                              resolution=bc.resolution, vae=bc.vae, teacher=bc.teacher, precision=precision,
                              compile=compiled, batch_size=bc.batch_size, workers=bc.workers, device=bc.device,
                              shard_rows=bc.batch_size * 2 if bc.batch_size * 2 <= 512 else bc.batch_size,
                              chunk_rows=16 if bc.batch_size % 16 == 0 else bc.batch_size, overwrite=True)
            device = resolve_device(bc.device)
            fwd, enc = forward_only(cfg, device, bc.forward_iters)
            t = time.perf_counter()
            build(cfg)
            wall = time.perf_counter() - t
            rate = steady_build_rate(cfg.out)
            err = row_error(enc, cfg.out, src, device)
            del enc
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append({"precision": precision, "compile": compiled, "batch_size": bc.batch_size,
                            "images": bc.images, "forward_img_s": round(fwd, 1), "build_img_s": round(rate, 1),
                            "ratio": round(rate / fwd, 3), "build_wall_s": round(wall, 1),
                            "stored_row_rel_err": round(err, 5)})
            print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(cfg.out, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------
# Loader against raw reads


def synthetic_cache(path: Path, rows: int, tokens: int, dim: int, shard_rows: int = 256, chunk_rows: int = 16,
                    *, resolution: int = 256, teacher: str = "dinov2_b", classes: int = 10,
                    feature_dtype: str = "float16") -> None:
    """A cache of random moments and tokens with the shapes of a real one (for speed measurements); with
    ``feature_dtype="int8"`` the same tokens stored as int8 with their scales (quantised by the writer)."""
    layout = zarr_layout(num_rows=rows, resolution=resolution, variants=1, teachers={teacher: (tokens, dim)},
                         shard_rows=shard_rows, chunk_rows=chunk_rows, feature_dtypes={teacher: feature_dtype})
    manifest = {"classes": [str(i) for i in range(classes)], "source": {"fingerprint": "synthetic"},
                "vae": {"random_weights": True}, "teachers": {teacher: {"random_weights": True}},
                "preprocessing": {"resolution": resolution}}
    writer, _ = CacheWriter.create_or_resume(path, layout=layout, manifest=manifest,
                                             sources=[{"path": f"{i}", "size": 0, "label": i % classes}
                                                      for i in range(rows)], overwrite=True)
    rng = np.random.default_rng(0)
    h = resolution // 8
    feat = rng.standard_normal((shard_rows, 1, tokens, dim), dtype=np.float32).astype(np.float16)
    lat = rng.standard_normal((shard_rows, 1, 8, h, h), dtype=np.float32).astype(np.float16)
    lat[:, :, 4:] = np.abs(lat[:, :, 4:])  # the std half of the moments
    for s in range(writer.num_shards):
        lo, hi = writer.shard_range(s)
        feat[:, 0, 0, 0] = np.arange(lo, lo + shard_rows)  # rows differ
        writer.write_shard(s, latents=lat[: hi - lo], features={teacher: feat[: hi - lo]},
                           labels=np.arange(lo, hi, dtype=np.int32) % classes)
    writer.finalize({})
    os.sync()  # no write-back of the fresh files during the timed reads


def raw_sequential(files: list[Path], block: int) -> tuple[float, int]:
    """Seconds and bytes to read every file front to back into one buffer of ``block`` bytes (one
    thread); with ``block`` = one loader batch, the bytes land in as much memory as a batch uses."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return time.perf_counter() - t, total


def raw_random_rows(c: Any, threads: int, block: int) -> tuple[float, int]:
    """Seconds and bytes to pread one row-sized block per row and array, in random order, from the
    same files into batch-sized buffers (``block`` bytes in all): the loader's access pattern with
    nothing else (no shard index, no batch assembly)."""
    jobs = []
    for name, paths in shard_paths(c).items():
        arr = c.latents if name == "latents" else c.features[name.split("/", 1)[1]]
        row_bytes = int(np.prod(arr.shape[1:])) * 2
        for p in paths:
            n = os.path.getsize(p) // row_bytes
            jobs += [(p, k * row_bytes, row_bytes) for k in range(n)]
    order = np.random.default_rng(1).permutation(len(jobs))
    fds = {p: os.open(p, os.O_RDONLY) for p in {j[0] for j in jobs}}
    bufs = [memoryview(bytearray(block // threads)) for _ in range(threads)]

    def work(part: tuple[int, np.ndarray]) -> int:
        t, idx = part
        buf, pos, total = bufs[t], 0, 0
        for i in idx:
            p, off, size = jobs[i]
            if pos + size > len(buf):
                pos = 0
            total += os.preadv(fds[p], [buf[pos:pos + size]], off)
            pos += size
        return total

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(work, enumerate(np.array_split(order, threads))))
    seconds = time.perf_counter() - t
    for fd in fds.values():
        os.close(fd)
    return seconds, total


def bench_loader(bc: BenchConfig, out: Path) -> dict[str, Any]:
    path = out / "loader.zarr"
    synthetic_cache(path, bc.loader_rows, bc.tokens, bc.dim)
    c = open_cache(path)
    files = [Path(p) for paths in shard_paths(c).values() for p in paths]
    block = bc.loader_batch * (bc.tokens * bc.dim + 8 * 32 * 32) * 2
    raw_sequential(files, block)  # warm the page cache
    seq_s, seq_bytes = min(raw_sequential(files, block) for _ in range(3))
    res: dict[str, Any] = {"rows": bc.loader_rows, "row_kib": round(seq_bytes / bc.loader_rows / 1024, 1),
                           "raw_seq_MBps": round(seq_bytes / seq_s / 1e6, 1)}
    for threads in (1, 4):
        s, b = min(raw_random_rows(c, threads, block) for _ in range(2))
        res[f"raw_pread_rows_{threads}t_MBps"] = round(b / s / 1e6, 1)
    best = 0.0
    for workers in map(int, bc.loader_workers.split(",")):
        s = float("inf")
        for epoch in range(3):  # best of three epochs
            loader = c.loader(bc.loader_batch, seed=0, epoch=epoch, num_workers=workers, prefetch=4)
            t = time.perf_counter()
            n = nbytes = 0
            for batch in loader:
                n += len(batch["index"])
                nbytes += batch["latents"].nbytes + sum(f.nbytes for f in batch["features"].values())
            s = min(s, time.perf_counter() - t)
        res[f"loader_{workers}w_samples_s"] = round(n / s, 1)
        res[f"loader_{workers}w_MBps"] = round(nbytes / s / 1e6, 1)
        best = max(best, nbytes / s / 1e6)
    res["loader_best_MBps"] = round(best, 1)
    res["ratio_vs_raw_seq"] = round(best / res["raw_seq_MBps"], 3)
    # zarr's own reads of the same cache, whole shards in order (what other tools would do)
    res["zarr_sequential_MBps"] = round(seq_bytes / _best_of(partial(_zarr_whole_shards, c), 2) / 1e6, 1)
    print(json.dumps(res), flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return res


def _zarr_whole_shards(c: Any) -> None:
    for s in range(c.storage.num_shards(c.layout)):
        lo, hi = c.storage.shard_range(c.layout, s)
        c.features["dinov2_b"][lo:hi]
        c.latents[lo:hi]


def _zarr_random_blocks(c: Any, block: int = 64) -> None:
    for b in np.random.default_rng(0).permutation(c.layout.num_rows // block):
        c.features["dinov2_b"][b * block:(b + 1) * block]
        c.latents[b * block:(b + 1) * block]


def _loader_epoch(c: Any) -> None:
    for _ in c.loader(256, seed=0, num_workers=2):
        pass


def _best_of(fn: Any, times: int = 3) -> float:
    best = float("inf")
    for _ in range(times):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_chunks(bc: BenchConfig, out: Path) -> list[dict[str, Any]]:
    """The storage sizes: zarr's own whole-shard reads, zarr's reads of aligned 64-row blocks in random
    order, and the loader, for several chunk and shard sizes (DINOv2-B rows)."""
    results = []
    rows = 1024
    for shard_rows, chunk_rows in ((256, 1), (256, 16), (256, 64), (64, 16), (1024, 16)):
        path = out / f"sweep-{shard_rows}-{chunk_rows}.zarr"
        synthetic_cache(path, rows, bc.tokens, bc.dim, shard_rows=shard_rows, chunk_rows=chunk_rows)
        c = open_cache(path)
        nbytes = rows * (bc.tokens * bc.dim + 8 * 32 * 32) * 2
        zarr_seq, zarr_blocks, loader = (nbytes / _best_of(partial(fn, c)) / 1e6
                                         for fn in (_zarr_whole_shards, _zarr_random_blocks, _loader_epoch))
        results.append({"shard_rows": shard_rows, "chunk_rows": chunk_rows, "zarr_shards_MBps": round(zarr_seq),
                        "zarr_random_64row_blocks_MBps": round(zarr_blocks), "loader_random_rows_MBps": round(loader)})
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(path, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchConfig, argv, presets=PRESETS, default_preset="cpu")
    if dry:
        return 0
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(bc.device)
    machine = machine_info(device)
    report: dict[str, Any] = {"config": config_to_dict(bc), "machine": machine}
    if not bc.skip_build:
        report["build"] = bench_build(bc, out)
    if not bc.skip_loader:
        report["loader"] = bench_loader(bc, out)
    if bc.chunk_sweep:
        report["chunk_sweep"] = bench_chunks(bc, out)
    (out / "bench_cache.json").write_text(json.dumps(report, indent=2))
    print(f"\nmachine: {machine['device']}, {machine['cpus']} CPUs, torch {machine['torch']}  (random weights: speed only)")
    for r in report.get("build", []):
        print(f"build  {r['precision']:4s} compile={str(r['compile']):5s} batch {r['batch_size']:4d}: "
              f"build {r['build_img_s']:8.1f} img/s / encoders forward-only {r['forward_img_s']:8.1f} img/s "
              f"= {r['ratio']:.3f}  (goal >= 0.9 on a GPU); stored rows rel. err {r['stored_row_rel_err']:.1e}")
    if "loader" in report:
        r = report["loader"]
        print(f"loader {r['rows']} rows of {r['row_kib']} KiB: best {r['loader_best_MBps']:.0f} MB/s "
              f"({max(v for k, v in r.items() if k.endswith('samples_s')):.0f} samples/s) / raw sequential "
              f"{r['raw_seq_MBps']:.0f} MB/s = {r['ratio_vs_raw_seq']:.3f}  (goal >= 0.7); "
              f"raw random pread 1t/4t {r['raw_pread_rows_1t_MBps']:.0f}/{r['raw_pread_rows_4t_MBps']:.0f} MB/s; "
              f"zarr sequential {r['zarr_sequential_MBps']:.0f} MB/s")
    for r in report.get("chunk_sweep", []):
        print(f"sizes  shard {r['shard_rows']:5d} rows, chunk {r['chunk_rows']:3d}: zarr whole shards {r['zarr_shards_MBps']:6d} MB/s, "
              f"zarr random 64-row blocks {r['zarr_random_64row_blocks_MBps']:6d} MB/s, loader {r['loader_random_rows_MBps']:6d} MB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
