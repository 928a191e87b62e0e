"""Benchmark the training step: from the cache, against its in-memory limit and an online teacher.

    python -m tools.bench.train [--preset cpu|gpu] [--models tiny,sitdown-b] [--batch-sizes 8,2]
        [--compile-modes off,on] [--feature-dtypes fp16 int8] [--steps 5] [--warmup 2]

For each model, batch size and compile setting, four ways to run the same training step
(``trainer.train.Trainer.train_step``, U-REPA losses, AdamW, EMA):

(a) loop   the full loop: batches read by the cache loader (a cache with the real shapes, random
           values), copied to the device, the step;
(b) limit  the same step on device-resident in-memory tensors (no reads, no copies);
(c) online both encoders online: the SD-VAE encoder and DINOv2 run on the step's images
           (device-resident uint8, so decoding is not even counted) before the same step.
(d) repa   REPA's own arrangement: the VAE latents come from the cache through the loader (REPA's
           preprocessing stores them), DINOv2 runs online on the step's images before the step.

``--feature-dtypes fp16 int8`` measures each storage of the teacher tokens: with int8, (a) reads int8
values and their float32 scales and (b) holds them resident, and the step dequantises them on the device
(``Trainer.losses``), so (a)/(b) is the loop from an int8 cache against the in-memory int8 step; (c)
and (d) are the same either way (their teacher's tokens are fresh) and run with fp16 only.

The three take turns in blocks of consecutive steps (see ``timed``), each reports its median. Prints ms/step, img/s and
peak memory (GPU; the resident set on CPU) for each, then throughput ratios, each its own column:
(a)/(b) (goal >= 0.97 on a GPU), (c)/(a) (both encoders online against the cache) and (d)/(a) (REPA's
online DINOv2 against the cache; 1 / that ratio is how many times faster the cache trains). Random
weights: speed only. Writes ``OUT/bench_train.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from cache import open_cache
from cache.cli.config import ConfigError, check_fields, config_to_dict, parse_config
from cache.cli.runtime import autocast_dtype, make_accelerator
from cache.layout import stored_dtype
from pipeline.build import Encoders
from pipeline.encoders import load_teacher, load_vae
from tools.bench.cache import machine_info, sync, synthetic_cache
from trainer.train import TrainConfig, Trainer, micro_batches


@dataclass(frozen=True)
class BenchTrainConfig:
    """Benchmark the training step against its limit and an online teacher."""

    out: str = field(default="bench-out", metadata={"help": "folder for the synthetic caches and bench_train.json"})
    models: str = field(default="tiny,sitdown-b", metadata={"help": "comma-separated model presets"})
    batch_sizes: str = field(default="8,2", metadata={"help": "global batch per model (same order), or one for all"})
    compile_modes: str = field(default="off", metadata={"help": "off, on, or off,on"})
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = field(default="fp32", metadata={
        "help": "training precision (trainer.train --precision); the online encoders of (c) and (d) run under the "
                "same autocast, as REPA runs DINOv2 under its training's"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: accelerate decides"})
    steps: int = field(default=4, metadata={
        "min": 1, "max": 1_000_000,
        "help": "timed steps per block (each variant runs rounds blocks, in turns)"})
    warmup: int = field(default=2, metadata={
        "min": 1, "max": 1_000_000, "help": "untimed steps first (compilation happens here)"})
    rounds: int = field(default=2, metadata={"min": 1, "max": 1000, "help": "blocks per variant"})
    resolution: int = field(default=256, metadata={
        "min": 8, "max": 4096, "help": "image side; latents are resolution/8"})
    vae: str = field(default="", metadata={
        "help": "online VAE spec per model (same order), or one for all; default: tiny for the tiny model, "
                "else the SD-VAE architecture with random weights"})
    teacher: str = field(default="", metadata={
        "help": "online and cached teacher spec per model (same order), or one for all; default: tiny for "
                "the tiny model, else DINOv2-B with random weights"})
    loader_workers: int = field(default=4, metadata={"min": 1, "max": 256, "help": "cache reader threads"})
    feature_dtypes: tuple[Literal["fp16", "int8"], ...] = field(default=("fp16",), metadata={
        "help": "teacher token storage of the synthetic cache, each measured: fp16, int8 (values and scales, "
                "dequantised inside the step) or both"})
    skip_online: bool = field(default=False, metadata={"help": "skip (c) and (d)"})

    def __post_init__(self) -> None:
        check_fields(self)
        n = len(self.model_list)
        for name in ("batch_sizes", "vae", "teacher"):
            if getattr(self, name) and len(getattr(self, name).split(",")) not in (1, n):
                raise ConfigError(f"--{name.replace('_', '-')} needs 1 or {n} comma-separated values")
        if set(self.compile_modes.split(",")) - {"off", "on"}:
            raise ConfigError("--compile-modes takes off, on or off,on")

    @property
    def model_list(self) -> list[str]:
        return self.models.split(",")

    def per_model(self, name: str, i: int) -> str:
        if not getattr(self, name):
            tiny = self.model_list[i] == "tiny"
            return "tiny" if tiny else DEFAULT_RANDOM[name]
        values = getattr(self, name).split(",")
        return values[i] if len(values) > 1 else values[0]


DEFAULT_RANDOM = {"vae": "random:stabilityai/sd-vae-ft-ema", "teacher": "random:vit_base_patch14_dinov2.lvd142m"}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(models="tiny,sitdown-b", batch_sizes="8,2", compile_modes="off", precision="fp32", steps=4,
                warmup=2, rounds=2),
    "gpu": dict(models="sitdown-b,sitdown-xl", batch_sizes="256,64", compile_modes="off,on", precision="bf16",
                steps=10, warmup=5, rounds=3, loader_workers=8),
}


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _memory_gb(device: torch.device) -> float:
    """Peak device memory since the last reset (GPU), or the current resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def timed(device: torch.device, steps: int, warmup: int, rounds: int, fns: dict[str, Any]) -> dict[str, float]:
    """Median seconds per call and peak memory of each ``fns[name](i)``.

    After ``warmup`` calls of each, the variants take turns in blocks of ``steps + 1`` consecutive
    calls, ``rounds`` times, so that drift of the machine reaches all of them alike. The first call
    of a block is not timed: the loader's prefetch had the other variants' time to read ahead.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    memory = dict.fromkeys(fns, 0.0)
    calls = dict.fromkeys(fns, 0)
    for name, fn in fns.items():
        for _ in range(warmup):
            fn(calls[name])
            calls[name] += 1
    for _ in range(rounds):
        for name, fn in fns.items():
            for j in range(steps + 1):
                sync(device)
                _reset_memory(device)
                t = time.perf_counter()
                fn(calls[name])
                sync(device)
                calls[name] += 1
                if j:
                    times[name].append(time.perf_counter() - t)
                    memory[name] = max(memory[name], _memory_gb(device))
    out = {}
    for name in fns:
        out[f"{name}_s"] = statistics.median(times[name])
        out[f"{name}_mem_gb"] = memory[name]
    return out


#: Throughput ratios of the table, each against its denominator: name -> (numerator, denominator) variants.
RATIOS = {"loop_vs_limit": ("loop", "limit"), "online_vs_loop": ("online", "loop"), "repa_vs_loop": ("repa", "loop")}


def throughput_ratios(row: dict[str, Any], batch: int) -> dict[str, float]:
    """img/s of each timed variant (``<name>_s`` seconds per step of ``batch`` images) and the :data:`RATIOS`
    of their throughputs (numerator img/s over denominator img/s) where both were timed."""
    out = {f"{k}_img_s": batch / row[f"{k}_s"] for k in ("loop", "limit", "online", "repa") if f"{k}_s" in row}
    for name, (a, b) in RATIOS.items():
        if f"{a}_s" in row and f"{b}_s" in row:
            out[name] = row[f"{b}_s"] / row[f"{a}_s"]
    return out


def cache_path(out: Path, model: str, feature_dtype: str) -> Path:
    return out / f"train-cache-{model}-{feature_dtype}.zarr"


def bench_one(bc: BenchTrainConfig, i: int, compiled: bool, accelerator: Any, device: torch.device,
              out: Path, feature_dtype: str = "fp16") -> dict[str, Any]:
    model, batch = bc.model_list[i], int(bc.per_model("batch_sizes", i))
    vae_spec, teacher_spec = bc.per_model("vae", i), bc.per_model("teacher", i)
    teacher = load_teacher(teacher_spec, resolution=bc.resolution)
    tokens, dim = teacher.info["tokens"], teacher.info["dim"]
    path = cache_path(out, model, feature_dtype)
    rows = batch * (bc.warmup + bc.rounds * (bc.steps + 1) + 2)
    if not path.exists():
        synthetic_cache(path, rows, tokens, dim, shard_rows=64, chunk_rows=16, resolution=bc.resolution,
                        teacher="teacher", classes=1000, feature_dtype=stored_dtype(feature_dtype))
    c = open_cache(path)
    cfg = TrainConfig(cache=str(path), out=str(out / "unused"), model=model, batch_size=batch,
                      steps=bc.steps + bc.warmup, precision=bc.precision, compile=compiled,
                      loader_workers=bc.loader_workers)
    trainer = Trainer(cfg, c, accelerator, device)
    steps_per_epoch = len(c) // batch
    row: dict[str, Any] = {"model": model, "batch_size": batch, "compile": compiled, "precision": bc.precision,
                           "feature_dtype": feature_dtype,
                           "params_M": round(sum(p.numel() for p in trainer.params) / 1e6, 2)}

    # (a) the full loop from the cache
    data = micro_batches(c, cfg, micro=trainer.micro, rank=0, world=1, step=0, steps_per_epoch=steps_per_epoch,
                         teachers=trainer.teachers_read)
    fns = {"loop": lambda k: trainer.train_step(next(data)[1], k)}

    # (b) the limit: the same step on device-resident tensors (int8: values and scales, as the loop gets them)
    first = next(iter(c.loader(batch, num_workers=bc.loader_workers)))
    resident = [{"latents": first["latents"].to(device), "labels": first["labels"].to(device),
                 "features": {k: v.to(device) for k, v in first["features"].items()},
                 "feature_scales": {k: v.to(device) for k, v in first["feature_scales"].items()}}]
    fns["limit"] = lambda k: trainer.train_step(resident, k)
    row["tokens_read_as"] = str(first["features"]["teacher"].dtype).removeprefix("torch.")

    online_data = None
    if not bc.skip_online and feature_dtype == "fp16":
        autocast = autocast_dtype(bc.precision)
        vae = load_vae(vae_spec)
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, bc.resolution, bc.resolution, 3), dtype=torch.uint8,
                               generator=gen).to(device)
        labels = first["labels"].to(device)
        # (c) both encoders online: encode the step's images first
        enc = Encoders(vae.module, {"teacher": teacher.module}, flip=False, autocast=autocast).to(device).eval()
        # (d) REPA's arrangement: latents from the cache (the loader reads no tokens), DINOv2 online
        dino = Encoders(None, {"teacher": teacher.module}, flip=False, autocast=autocast).to(device).eval()
        if compiled:
            enc.compile()
            dino.compile()

        def online(k: int) -> None:
            lat, feats = enc(images)
            trainer.train_step([{"latents": lat[:, 0], "labels": labels,
                                 "features": {"teacher": feats["teacher"][:, 0]}}], k)

        online_data = micro_batches(c, cfg, micro=trainer.micro, rank=0, world=1, step=0,
                                    steps_per_epoch=steps_per_epoch, teachers=[])

        def repa(k: int) -> None:
            batches = next(online_data)[1]
            _, feats = dino(images[:len(batches[0]["labels"])])
            trainer.train_step([{**b, "features": {"teacher": feats["teacher"][:, 0]}} for b in batches], k)

        fns["online"] = online
        fns["repa"] = repa
    row.update(timed(device, bc.steps, bc.warmup, bc.rounds, fns))
    data.close()
    if online_data is not None:
        online_data.close()
    row.update(throughput_ratios(row, batch))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchTrainConfig, argv, presets=PRESETS, default_preset="cpu")
    if dry:
        return 0
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = TrainConfig(cache="-", out="-", device="cpu" if bc.device == "cpu" else "auto")
    accelerator, device, _ = make_accelerator(run_cfg.device, run_cfg.precision)
    machine = machine_info(device)
    rows = []
    for i in range(len(bc.model_list)):
        for mode in bc.compile_modes.split(","):
            for dtype in bc.feature_dtypes:
                rows.append(bench_one(bc, i, mode == "on", accelerator, device, out, dtype))
                r = rows[-1]
                print(f"{r['model']:11s} batch {r['batch_size']:4d} compile={mode:3s} {dtype}: loop "
                      f"{r['loop_s'] * 1e3:9.1f} ms, limit {r['limit_s'] * 1e3:9.1f} ms, online "
                      f"{r.get('online_s', float('nan')) * 1e3:9.1f} ms, repa "
                      f"{r.get('repa_s', float('nan')) * 1e3:9.1f} ms", flush=True)
    for model in bc.model_list:
        for dtype in bc.feature_dtypes:
            shutil.rmtree(cache_path(out, model, dtype), ignore_errors=True)
    (out / "bench_train.json").write_text(json.dumps({"config": config_to_dict(bc), "machine": machine,
                                                      "results": rows}, indent=2))
    print(f"\nmachine: {machine['device']}, {machine['cpus']} CPUs, torch {machine['torch']}, {bc.precision}  "
          "(random weights: speed only)")
    print(f"{'model':11s} {'batch':>5s} {'compile':>7s} {'tokens':>6s} {'(a) loop':>16s} {'(b) limit':>16s} "
          f"{'(c) online':>16s} {'(d) repa':>16s} {'mem a/b/c/d GB':>18s} {'(a)/(b)':>8s} {'(c)/(a)':>8s} "
          f"{'(d)/(a)':>8s}")
    for r in rows:
        online = f"{r['online_img_s']:8.2f} img/s" if "online_s" in r else f"{'-':>14s}"
        repa = f"{r['repa_img_s']:8.2f} img/s" if "repa_s" in r else f"{'-':>14s}"
        mem = "/".join(f"{r[k]:.1f}" for k in ("loop_mem_gb", "limit_mem_gb", "online_mem_gb", "repa_mem_gb")
                       if k in r)
        print(f"{r['model']:11s} {r['batch_size']:5d} {str(r['compile']):>7s} {r['feature_dtype']:>6s} "
              f"{r['loop_img_s']:10.2f} img/s {r['limit_img_s']:10.2f} img/s {online:>16s} {repa:>16s} {mem:>18s} "
              f"{r['loop_vs_limit']:8.3f} {r.get('online_vs_loop', float('nan')):8.3f} "
              f"{r.get('repa_vs_loop', float('nan')):8.3f}")
    print("throughput ratios: (a)/(b) loop over the in-memory limit (goal >= 0.97 on a GPU); (c)/(a) both encoders "
          "online over the cached loop; (d)/(a) REPA's arrangement (cached latents, DINOv2 online) over the cached "
          "loop (1 / ratio = how many times faster the cache trains)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
