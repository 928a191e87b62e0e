"""Benchmark sampling and evaluation: the sampler loop against the bare model, the VAE decoder, Inception.

    python -m tools.bench.sample [--preset cpu|gpu] [--model sitdown-xl] [--batch-size 256] [--steps 25]

(a) loop   REPA's Euler-Maruyama sampler (``tools.sampling``) with guidance over the interval [0, 0.7],
           per-sample CPU noise streams and float64 state, as ``tools.sample`` runs it, for ``--steps``
           steps of a grid spaced like the 250-step one (the same share of guided steps);
(b) limit  the model forwards alone that (a) makes: batch 2B on guided steps, B elsewhere, on resident
           inputs (no noise, no sampler arithmetic).
(a)/(b) is the sampler's efficiency. Then the SD-VAE decoder (random weights) and Inception-v3 feature
extraction (random weights) in img/s, and the time 50,000 samples of the paper's setting (250 SDE steps,
CFG) take on this device: model + decoder + features. Optionally (``--compile``) (b) again with the model
compiled. Random weights: speed only. Writes ``OUT/bench_sample.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from cache.cli.config import check_fields, config_to_dict, parse_config
from cache.cli.runtime import resolve_device
from pipeline.encoders import load_vae_decoder
from tools.bench.cache import machine_info, sync
from tools.bench.train import timed
from tools.inception import random_inception
from tools.sampling import PerSampleNoise, euler_maruyama, model_velocity, sde_time_grid, with_guidance
from trainer.models import create_model


@dataclass(frozen=True)
class BenchSampleConfig:
    """Benchmark the sampler against the bare model, the VAE decoder and Inception features."""

    out: str = field(default="bench-out", metadata={"help": "folder for bench_sample.json"})
    model: str = field(default="tiny", metadata={"help": "trainer.models preset (random weights)"})
    batch_size: int = field(default=16, metadata={
        "min": 1, "max": 1 << 16, "help": "samples per sampler batch (guided steps run 2x this)"})
    steps: int = field(default=10, metadata={
        "min": 2, "max": 10000,
        "help": "SDE steps timed; the grid keeps the 250-step grid's share of guided steps"})
    cfg: float = field(default=1.65, metadata={
        "min": 0, "max": 100, "help": "classifier-free guidance scale"})
    precision: Literal["fp32", "tf32", "bf16"] = field(default="fp32", metadata={
        "help": "fp32, tf32 or bf16 (autocast) for the model"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    repeats: int = field(default=3, metadata={
        "min": 1, "max": 1000, "help": "timed repetitions; medians are reported"})
    decode_batch: int = field(default=8, metadata={
        "min": 1, "max": 1 << 16, "help": "images per VAE decoder batch"})
    inception_batch: int = field(default=16, metadata={
        "min": 1, "max": 1 << 16, "help": "images per Inception batch"})
    resolution: int = field(default=256, metadata={
        "min": 8, "max": 4096, "help": "image side; latents are resolution/8"})
    compile: bool = field(default=False, metadata={"help": "also time (b) with torch.compile"})
    skip_decode: bool = field(default=False, metadata={"help": "skip the VAE decoder timing"})
    skip_inception: bool = field(default=False, metadata={"help": "skip the Inception timing"})

    def __post_init__(self) -> None:
        check_fields(self)


PRESETS = {
    "cpu": dict(model="tiny", batch_size=16, steps=10, precision="fp32", device="cpu", decode_batch=4,
                inception_batch=16, resolution=64),
    "gpu": dict(model="sitdown-xl", batch_size=256, steps=25, precision="bf16", device="cuda", decode_batch=64,
                inception_batch=250, compile=True),
}
PAPER_STEPS, INTERVAL, PAPER_SAMPLES = 250, (0.0, 0.7), 50_000


def guided_steps(steps: int) -> tuple[int, int]:
    """(guided, plain) model calls of an SDE run of ``steps`` steps with guidance on [0, 0.7]."""
    ts = sde_time_grid(steps).tolist()[:-1]  # the times at which the velocity is evaluated
    guided = sum(INTERVAL[0] <= t <= INTERVAL[1] for t in ts)
    return guided, len(ts) - guided


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchSampleConfig, argv, presets=PRESETS, default_preset="cpu")
    if dry:
        return 0
    device = resolve_device(bc.device)
    if bc.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    latent = bc.resolution // 8
    torch.manual_seed(0)
    model = create_model(bc.model, input_size=latent).to(device).eval().requires_grad_(False)
    autocast = torch.bfloat16 if bc.precision == "bf16" else None
    null = model.config.num_classes
    b = bc.batch_size
    shape = (model.config.in_channels, latent, latent)
    y = torch.randint(0, null, (b,), device=device)
    result: dict[str, Any] = {"model": bc.model, "batch_size": b, "steps": bc.steps, "precision": bc.precision}

    # (a) the sampler loop
    velocity = with_guidance(model_velocity(model, autocast=autocast), null=null, scale=bc.cfg, interval=INTERVAL)

    def loop() -> None:
        noise = PerSampleNoise(0, range(b), shape, device=device)
        with torch.no_grad():
            euler_maruyama(velocity, noise(), y, noise=noise, steps=bc.steps)

    # (b) the forwards alone
    guided, plain = guided_steps(bc.steps)

    def forwards(net: torch.nn.Module) -> Any:
        x2, y2 = torch.randn(2 * b, *shape, device=device), torch.cat([y, torch.full_like(y, null)])
        t2 = torch.full((2 * b,), 0.5, device=device)

        def run() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None):
                for _ in range(guided):
                    net(x2, t2, y2)
                for _ in range(plain):
                    net(x2[:b], t2[:b], y2[:b])
        return run

    # the two take turns (tools.bench.train.timed), so drift of the machine reaches both alike
    limit = forwards(model)
    result.update(timed(device, bc.repeats, 1, 1, {"loop": lambda i: loop(), "limit": lambda i: limit()}))
    result["guided_calls"], result["plain_calls"] = guided, plain
    if bc.compile:
        limit_compiled = forwards(torch.compile(model))
        t0 = time.perf_counter()
        limit_compiled()
        sync(device)
        result["compile_warmup_s"] = time.perf_counter() - t0
        result.update(timed(device, bc.repeats, 0, 1, {"limit_compiled": lambda i: limit_compiled()}))
    per_step = result["loop_s"] / bc.steps
    g250, p250 = guided_steps(PAPER_STEPS)
    scale = (g250 + p250) / (guided + plain)  # the same mix of guided and plain calls
    result["paper_img_s"] = b / (result["loop_s"] * scale)
    result["loop_vs_limit"] = result["limit_s"] / result["loop_s"]
    print(f"{bc.model} batch {b}: {bc.steps} SDE steps ({guided} guided, {plain} plain) loop "
          f"{result['loop_s']:.3f} s ({per_step * 1e3:.1f} ms/step), forwards alone {result['limit_s']:.3f} s: "
          f"(a)/(b) throughput {result['loop_vs_limit']:.3f}", flush=True)

    # the decoder and Inception
    if not bc.skip_decode:
        decoder = load_vae_decoder("random:stabilityai/sd-vae-ft-ema").module.to(device).eval()
        z = torch.randn(bc.decode_batch, 4, latent, latent, device=device)
        with torch.no_grad():
            result["decode_img_s"] = bc.decode_batch / timed(device, bc.repeats, 1, 1,
                                                             {"decode": lambda i: decoder(z)})["decode_s"]
        del decoder
    if not bc.skip_inception:
        net = random_inception().to(device)
        images = torch.randint(0, 256, (bc.inception_batch, bc.resolution, bc.resolution, 3), dtype=torch.uint8,
                               device=device)
        result["inception_img_s"] = bc.inception_batch / timed(device, bc.repeats, 1, 1,
                                                               {"inception": lambda i: net(images)})["inception_s"]
    per_image = 1 / result["paper_img_s"] + 1 / result.get("decode_img_s", float("inf")) + \
        1 / result.get("inception_img_s", float("inf"))
    result["paper_50k_hours"] = PAPER_SAMPLES * per_image / 3600
    machine = machine_info(device)
    (out / "bench_sample.json").write_text(json.dumps({"config": config_to_dict(bc), "machine": machine,
                                                       "results": result}, indent=2))
    print(f"\nmachine: {machine['device']}, {machine['cpus']} CPUs, torch {machine['torch']}, {bc.precision} "
          "(random weights: speed only)")
    print(f"sampler loop vs forwards alone: {result['loop_vs_limit']:.3f}")
    if "limit_compiled_s" in result:
        print(f"forwards compiled: {result['limit_compiled_s']:.3f} s vs eager {result['limit_s']:.3f} s "
              f"({result['limit_s'] / result['limit_compiled_s']:.2f}x; compile warm-up {result['compile_warmup_s']:.0f} s)")
    rate = {k: f"{result[k]:.3g} img/s" if k in result else "not measured"
            for k in ("paper_img_s", "decode_img_s", "inception_img_s")}
    print(f"250-step SDE with CFG: {rate['paper_img_s']}; decoder {rate['decode_img_s']}; "
          f"Inception {rate['inception_img_s']}")
    print(f"50,000 samples of the paper's setting on this device: {result['paper_50k_hours']:.3g} h"
          + ("" if "decode_img_s" in result and "inception_img_s" in result else " (sampling alone)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
