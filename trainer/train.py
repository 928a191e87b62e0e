"""Train SiT-down with U-REPA alignment (or SiT with REPA) from a feature cache; never runs an encoder.

    python -m trainer.train --cache in256.zarr --out runs/urepa-xl --preset urepa-xl-256
    python -m trainer.train --cache in256.zarr --out runs/repa --preset repa-sit-xl-256 --steps 400000
    python -m trainer.train --cache demo/cache.zarr --out demo/run --preset demo --dry-run

    # several GPUs or nodes: the global --batch-size is split over the ranks; results do not
    # depend on how many there are (same samples, same noise per global batch position)
    accelerate launch --num_processes 8 -m trainer.train --cache ... --out ... --preset urepa-xl-256
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m trainer.train ...

    # a cache in an object store, each node keeping a local copy of the shards it reads (docs/remote.md)
    python -m trainer.train --cache s3://bucket/in256.zarr --cache-local /scratch/urepa --out ... --preset ...

Resume by running the same command again: the latest checkpoint in OUT/checkpoints restores the
weights, EMA, optimizer and step; the data order and every random draw are pure functions of
(seed, step), so nothing else needs saving. A rerun may change the length (``--steps``), where the
cache or the run folder lives (same cache identity: source, encoders, rows, and the teacher's stored
dtype and int8 channel scales, so an int8 copy of the cache is refused by name), and bookkeeping (workers, device, logging and
checkpoint intervals, ``--compile``, ``--cache-local``, the ``--store-*`` settings); any setting that changes the
maths is refused with its name, the data order (``--order``, ``--shuffle-window``) among them. ``--order blocks``
(docs/remote.md) lays the epoch out per rank, so its run resumes on the same number of ranks only.
A damaged latest checkpoint (checksums in its manifest.json) is set aside as damaged-step-* and the
run resumes from the one before it.

A non-finite loss or gradient norm stops the run with an error naming the step, before the update
is applied (``--skip-nonfinite N`` skips up to N such steps instead, with no optimizer or EMA
update); no checkpoint with non-finite weights is ever written.

``--precision fp16`` is REPA's setting (its train.py default, accelerate's float16 mixed precision):
float16 autocast and a dynamic gradient scaler (``torch.amp.GradScaler``, initial scale 2^16, halved on
an overflow, doubled after 2000 clean steps). The loss is scaled before backward, the gradients are
unscaled before clipping, and a step whose gradients overflow float16 (finite loss, non-finite gradient
norm) is skipped with no optimizer or EMA update: that is the scaler at work, not a failure, so it is
counted (``skipped_overflow`` in metrics.jsonl and the checkpoint state, one log line per metrics
window) and never stops the run. The scaler's state is part of the checkpoint, so a resumed run equals
an uninterrupted one in fp16 too.

Outputs in OUT: urepa-run.json (marks the folder as a run, written first: a non-empty folder without
it is refused), config.json (the resolved config, model and cache identity), log.txt,
metrics.jsonl, tensorboard/, losses.png, checkpoints/step-<8-digit step>/ (e.g. step-00010000),
urepa.lock (held while a training writes there: a second one into the same folder, a resume while the
first still runs, stops at once naming it; the lock goes with its process, even a killed one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

import cache as cache_lib
from cache.cli.advice import explain
from cache.cli.config import ConfigError, StoreSettings, check_fields, config_to_dict, parse_config
from cache.cli.runtime import (
    FolderLock,
    SetupError,
    autocast_dtype,
    broadcast_from_rank0,
    claim_folder,
    make_accelerator,
    setup_logging,
    write_json,
)
from cache.loader import DEFAULT_WINDOW
from cache.quant import dequantize_tokens

from .checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    checkpoints,
    clean_partial,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .losses import interpolate, total_loss, urepa_alignment, velocity_loss, velocity_target
from .metrics import MetricsLog, plot_losses, read_metrics
from .models import MODEL_PRESETS, create_model
from .run import (
    CacheIdentity,
    LatentTransform,
    RunRecord,
    legacy_model_fields,
    recorded_model,
    recorded_train,
    refuse_changed_rerun,
    unrecorded_cache_entries,
)

_logger = logging.getLogger("trainer.train")

#: Settings a rerun may change (they change no result): everything else must match the run it resumes.
RESUMABLE_CHANGES = frozenset({"steps", "cache", "out", "loader_workers", "device", "tensorboard", "log_every",
                               "ckpt_every", "keep_ckpts", "compile", "skip_nonfinite", "cache_local",
                               "cache_local_gb"}) | {f.name for f in dataclasses.fields(StoreSettings)}
#: The file that marks a folder as a training run of ours; written before anything else.
RUN_MARKER = "urepa-run.json"
#: What :meth:`Trainer.train_step` returns, in this order (a 1-d tensor on device).
STEP_STATS = ("loss", "loss_v", "loss_align", "loss_manifold", "grad_norm")
_S = {name: i for i, name in enumerate(STEP_STATS)}
#: What became of one step's update (the second value :meth:`Trainer.train_step` returns).
APPLIED, OVERFLOW, NONFINITE = "applied", "overflow", "nonfinite"


@dataclass(frozen=True)
class TrainConfig(StoreSettings):
    """Train SiT-down + U-REPA (or SiT + REPA) from a feature cache."""

    cache: str = field(default="", metadata={
        "help": "feature cache built by pipeline.build (a folder or store URL, s3://bucket/c.zarr), or a converted copy"})
    out: str = field(default="", metadata={"help": "run folder (created; rerun the same command to resume)"})
    model: str = field(default="sitdown-xl", metadata={"help": "model preset", "choices": tuple(MODEL_PRESETS)})
    teacher: str = field(default="", metadata={"help": "cached teacher to align to (default: the cache's only teacher)"})
    align_block: int = field(default=0, metadata={
        "min": 0, "max": 1000,
        "help": "blocks before the alignment head (0: the model's default, block 18 of 36 for XL)"})
    upsample: Literal["bilinear", "nearest"] = field(default="bilinear",
                                                     metadata={"help": "projected tokens -> teacher grid"})
    batch_size: int = field(default=256, metadata={
        "min": 1, "max": 1 << 20, "help": "global batch (all ranks and accumulation steps together)"})
    grad_accum: int = field(default=1, metadata={
        "min": 1, "max": 4096, "help": "micro-batches per optimizer step"})
    steps: int = field(default=1_000_000, metadata={
        "min": 1, "max": 1_000_000_000,
        "help": "optimizer steps in total (the one setting a rerun may change)"})
    lr: float = field(default=1e-4, metadata={"min": 0, "max": 1, "help": "AdamW learning rate (constant)"})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 1, "help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"min": 0, "max": 1, "help": "AdamW beta2"})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "max": 10, "help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={
        "min": 0, "max": 1000000.0, "help": "max global grad norm (0: no clipping)"})
    ema_decay: float = field(default=0.9999, metadata={
        "min": 0, "max": 1, "help": "EMA decay per step (fp32 copy)"})
    class_dropout: float = field(default=0.1, metadata={
        "min": 0, "max": 1, "help": "probability of the null label (for classifier-free guidance)"})
    align_weight: float = field(default=0.5, metadata={
        "min": 0, "max": 1000,
        "help": "lambda in L = L_v + lambda (L_align + w L_manifold); 0 trains without a head"})
    manifold_weight: float = field(default=3.0, metadata={
        "min": 0, "max": 1000, "help": "w in L = L_v + lambda (L_align + w L_manifold); 0 is REPA"})
    cross_sample: bool = field(default=False, metadata={
        "help": "manifold loss across the samples of a batch instead of across tokens"})
    latent_scale: float = field(default=0.18215, metadata={
        "min": 0, "max": 1000,
        "help": "x = (z - shift) * scale for z ~ N(mean, std) from the cached moments"})
    latent_shift: float = field(default=0.0, metadata={"min": -1000, "max": 1000, "help": "see latent_scale"})
    flip: bool = field(default=False, metadata={
        "help": "use the cached mirrored variant with probability 1/2 (needs --flip both at build)"})
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = field(default="bf16", metadata={
        "help": "bf16 (autocast; TF32 outside it), fp16 (float16 autocast with a dynamic gradient scaler: REPA's "
                "train.py default, the setting that reproduces the papers of --preset repa-sit-xl-256 and "
                "urepa-xl-256; those presets use bf16, recommended: the range of float32, no loss scale, no "
                "skipped steps), tf32 (TF32 matmuls and convolutions on GPU) or fp32 (strict)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the training step (model and losses; fused AdamW on GPU)"})
    seed: int = field(default=0, metadata={
        "min": 0, "max": 2**32 - 1, "help": "model init, data order and every random draw"})
    log_every: int = field(default=100, metadata={
        "min": 1, "max": 1_000_000_000, "help": "steps per metrics line"})
    ckpt_every: int = field(default=10_000, metadata={
        "min": 1, "max": 1_000_000_000, "help": "steps per checkpoint (one is also written at the end)"})
    keep_ckpts: int = field(default=2, metadata={
        "min": 0, "max": 1_000_000, "help": "checkpoints kept (0: all)"})
    loader_workers: int = field(default=4, metadata={
        "min": 1, "max": 256, "help": "cache reader threads per rank"})
    cache_local: str = field(default="", metadata={
        "help": "a local folder for node-local copies of a --cache in an object store: each shard object downloaded "
                "once, checked against its recorded checksum, shared by the node's processes (empty: rows "
                "by range from the store)"})
    cache_local_gb: float = field(default=0.0, metadata={
        "min": 0, "max": 1e9, "help": "size bound of --cache-local in GB, least recently used copies evicted (0: the "
                                      "folder's free disk space)"})
    order: Literal["permutation", "blocks"] = field(default="permutation", metadata={
        "help": "data order of an epoch: permutation (every row anywhere) or blocks (shuffled chunk-aligned blocks of "
                "rows, mixed within --shuffle-window rows per rank: whole chunks per request from an object store, "
                "less random; depends on the number of ranks; docs/remote.md)"})
    shuffle_window: int = field(default=DEFAULT_WINDOW, metadata={
        "min": 1, "max": 2**31, "help": "--order blocks: rows per rank mixed together (a store reader holds about "
                                        "this many rows in memory)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: accelerate decides"})
    tensorboard: bool = field(default=True, metadata={"help": "write tensorboard events to OUT/tensorboard"})
    skip_nonfinite: int = field(default=0, metadata={
        "min": 0, "max": 1_000_000_000,
        "help": "skip up to N steps whose loss or gradient norm is NaN/inf (no update), then stop (0: stop at the "
                "first)"})

    def __post_init__(self) -> None:
        if not self.cache or not self.out:
            raise ConfigError("--cache and --out are required")
        check_fields(self)
        self.check_store(self.cache)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        for name in ("beta1", "beta2", "class_dropout", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.latent_scale == 0:
            raise ConfigError("--latent-scale must not be 0 (x = (z - shift) * scale would be all zeros)")

#: The precision each paper trained in: REPA's train.py defaults to float16 mixed precision (accelerate's, with
#: a dynamic gradient scaler) and U-REPA follows REPA's training. The presets below use bf16 instead,
#: which we recommend: bfloat16 has float32's exponent range, so nothing overflows, no loss scale is
#: needed and no step is skipped; its 8-bit mantissa (float16: 11) costs nothing measurable in these
#: losses. ``--precision fp16`` reproduces the papers' setting exactly.
PAPER_PRECISION = "fp16"

PRESETS: dict[str, dict[str, Any]] = {
    # U-REPA's main ImageNet 256 setting: SiT-down-XL/2, block 18, lambda 0.5, w 3 (FID 1.48 at 1M, CFG).
    # bf16 recommended; the paper's own precision is fp16 (REPA's, see PAPER_PRECISION): add --precision fp16.
    "urepa-xl-256": dict(model="sitdown-xl", batch_size=256, steps=1_000_000, precision="bf16", compile=True),
    # REPA's SiT-XL/2 at block 8 with the token loss only (FID 1.42 at 4M, CFG). bf16 recommended;
    # REPA's train.py runs fp16 with a gradient scaler: add --precision fp16 to reproduce it.
    "repa-sit-xl-256": dict(model="sit-xl", manifold_weight=0.0, batch_size=256, steps=4_000_000,
                            precision="bf16", compile=True),
    # The tiny model on the demo cache, a few CPU minutes. A higher learning rate and a shorter EMA
    # than the paper so that the losses visibly fall in that time.
    "demo": dict(model="tiny", batch_size=32, steps=300, lr=5e-4, ema_decay=0.99, precision="tf32",
                 log_every=10, ckpt_every=100, loader_workers=2, device="cpu"),
}


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity; the message names the step and says what to check."""


# ------------------------------------------------------------------------------------------
# Small pure pieces


def step_seed(seed: int, step: int) -> int:
    """The generator seed of one step, from (seed, step) alone: resumed runs repeat every draw."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_noise(seed: int, step: int, n: int, latent_shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """Every random draw of one optimizer step, for all ``n`` samples of the global batch.

    ``t`` ~ U[0, 1), ``z_noise`` (the posterior sample), ``eps`` (the interpolant noise) ~ N(0, I) and
    ``drop`` ~ U[0, 1) (class dropout). Each rank takes the slice of its own global positions, so the
    draws of a sample depend on its position in the global batch, not on the number of ranks.
    """
    g = torch.Generator(device=device).manual_seed(step_seed(seed, step))
    return {
        "t": torch.rand(n, generator=g, device=device),
        "z_noise": torch.randn(n, *latent_shape, generator=g, device=device),
        "eps": torch.randn(n, *latent_shape, generator=g, device=device),
        "drop": torch.rand(n, generator=g, device=device),
    }


def cache_identity(cache: cache_lib.CacheReader, teacher: str) -> CacheIdentity:
    """What makes a cache the same data for a resumed run: source, encoders, rows, the teacher's stored dtype
    and channel scales."""
    m = cache.manifest
    if m.source is None or m.vae is None or m.preprocessing is None:
        raise SetupError(f"the manifest of {cache.url} lacks its source, VAE or preprocessing record: not a cache "
                         "pipeline.build wrote")
    info = m.teacher(teacher)
    channels = cache.channel_scales(teacher)
    return CacheIdentity(
        source_fingerprint=m.source.fingerprint,
        vae_sha256=m.vae.weights_sha256,
        teacher=teacher,
        teacher_sha256=info.weights_sha256 if info else None,
        rows=len(cache),
        resolution=m.preprocessing.resolution,
        random_weights=m.random_weights(teacher),
        vae_random_weights=m.vae.random_weights,
        teacher_random_weights=info.random_weights if info else None,
        teacher_dtype=cache.layout.feature_dtype(teacher),
        teacher_channel_scales=None if channels is None else [float(c) for c in channels],
    )


def model_overrides(cfg: TrainConfig, cache: cache_lib.CacheReader) -> tuple[str, dict[str, Any]]:
    """(teacher name, create_model overrides) that fit ``cache``; a mismatch is a SetupError."""
    _, variants, channels, h, w = cache.latents.shape
    if h != w or channels % 2:
        raise SetupError(f"cache latents {tuple(cache.latents.shape)} are not square [mean, std] moments")
    teachers = sorted(cache.features)
    teacher = cfg.teacher
    if not teacher:
        if len(teachers) != 1:
            raise SetupError(f"the cache holds teachers {teachers}: choose one with --teacher")
        teacher = teachers[0]
    if teacher not in cache.features:
        raise SetupError(f"--teacher {teacher!r} is not in the cache, which holds {teachers}")
    _, _, tokens, dim = cache.features[teacher].shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise SetupError(f"teacher {teacher!r} has {tokens} tokens per image: not a square grid")
    if cfg.flip and variants < 2:
        raise SetupError("--flip needs a cache built with --flip both (this one stores 1 variant)")
    if cache.num_classes < 1:
        raise SetupError("the cache has no classes")
    overrides: dict[str, Any] = dict(input_size=h, in_channels=channels // 2, num_classes=cache.num_classes,
                                     upsample=cfg.upsample)
    if cfg.align_weight > 0:
        overrides.update(teacher_dim=dim, teacher_grid=grid)
    else:
        overrides.update(teacher_dim=0)
    if cfg.align_block:
        overrides["align_block"] = cfg.align_block
    return teacher, overrides


def build_model(cfg: TrainConfig, overrides: dict[str, Any]) -> torch.nn.Module:
    try:
        return create_model(cfg.model, **overrides)
    except ValueError as e:
        raise SetupError(f"model {cfg.model!r} does not fit the cache: {e}") from e


# ------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Model, EMA, optimizer and one compiled step; the loop lives in :func:`train`.

    ``train_step(micro_batches, step)`` consumes the ``grad_accum`` micro-batches this rank reads for
    ``step`` and returns the step's :data:`STEP_STATS` on device (this rank's means, not yet reduced over
    ranks) and whether they are finite.
    """

    def __init__(self, cfg: TrainConfig, cache: cache_lib.CacheReader, accelerator: Any, device: torch.device, *,
                 legacy: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise SetupError(f"--batch-size {cfg.batch_size} is not divisible by {self.world} ranks x "
                             f"{cfg.grad_accum} accumulation steps")
        self.micro = cfg.batch_size // (self.world * cfg.grad_accum)  # per rank, per micro-batch
        self.teacher, overrides = model_overrides(cfg, cache)
        overrides.update(legacy or {})  # a run recorded before a model field existed keeps what it was built with
        self.teachers_read = [self.teacher] if cfg.align_weight > 0 else []  # what the loader reads
        channels = cache.channel_scales(self.teacher) if cfg.align_weight > 0 else None  # int8 tokens' (D,)
        self.channel_scales = None if channels is None else torch.from_numpy(channels).to(device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and device
        model = build_model(cfg, overrides)
        self.model_config = model.config
        self.num_classes = model.config.num_classes
        self.latent_shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
        model.to(device)
        self.raw = model
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone().float() for p in self.params]
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           weight_decay=cfg.weight_decay, fused=fused, foreach=not fused)
        self.model = accelerator.prepare_model(model) if self.world > 1 else model
        self.latent = LatentTransform(scale=cfg.latent_scale, shift=cfg.latent_shift)
        self.autocast = autocast_dtype(cfg.precision)
        # fp16 only: scale the loss, unscale before clipping, skip steps whose gradients overflow (REPA's).
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.loss_fn = torch.compile(self.losses) if cfg.compile else self.losses

    # -- the step ----------------------------------------------------------------------------
    def losses(self, moments: torch.Tensor, features: torch.Tensor | None, scales: torch.Tensor | None,
               labels: torch.Tensor, t: torch.Tensor, z_noise: torch.Tensor, eps: torch.Tensor, drop: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss and the detached [loss, loss_v, loss_align, loss_manifold] of one micro-batch.

        ``features`` are the teacher tokens as the cache stores them: float16, or int8 with their float32
        per-token ``scales``, dequantised here, on the device and inside the compiled step (so the host and
        the host-to-device copy move the int8 bytes)."""
        cfg = self.cfg
        if scales is not None:
            features = dequantize_tokens(features, scales, self.channel_scales)
        x = self.latent.encode(moments, z_noise)
        xt = interpolate(x, eps, t)
        target = velocity_target(x, eps)
        y = torch.where(drop < cfg.class_dropout, self.num_classes, labels)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            v, proj = self.model(xt, t, y)
        loss_v = velocity_loss(v, target)
        if proj is None:
            loss_align = loss_manifold = torch.zeros((), device=loss_v.device)
        else:
            loss_align, loss_manifold = urepa_alignment(proj, features, cross_sample=cfg.cross_sample)
        loss = total_loss(loss_v, loss_align, loss_manifold, lam=cfg.align_weight, w=cfg.manifold_weight)
        return loss, torch.stack([loss, loss_v, loss_align, loss_manifold]).detach()

    def to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {
            "moments": batch["latents"].to(self.device, non_blocking=True),
            "labels": batch["labels"].to(self.device, non_blocking=True),
            "features": None,
            "scales": None,
        }
        if self.cfg.align_weight > 0:
            out["features"] = batch["features"][self.teacher].to(self.device, non_blocking=True)
            scales = batch.get("feature_scales", {}).get(self.teacher)
            if scales is not None:
                out["scales"] = scales.to(self.device, non_blocking=True)
        return out

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> tuple[torch.Tensor, str]:
        cfg, b = self.cfg, self.micro
        noise = step_noise(cfg.seed, step, cfg.batch_size, self.latent_shape, self.device)
        totals = torch.zeros(4, device=self.device)
        for k, batch in enumerate(micro_batches):
            lo = (k * self.world + self.rank) * b  # this rank's global positions in micro-batch k
            d = self.to_device(batch)
            last = k == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.model)
            with sync:
                loss, stats = self.loss_fn(d["moments"], d["features"], d["scales"], d["labels"],
                                           *(noise[key][lo:lo + b] for key in ("t", "z_noise", "eps", "drop")))
                self.scaler.scale(loss / len(micro_batches)).backward()  # fp16: times the loss scale
            totals += stats / len(micro_batches)
        scaling = self.scaler.is_enabled()
        if scaling:
            self.scaler.unscale_(self.optimizer)  # true gradients before clipping and the logged norm
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # the norm is logged either way
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        stats = torch.cat([totals, grad_norm.detach().float().view(1)])
        # The global grad norm (after DDP's all-reduce) is the same on every rank, so every rank takes the
        # same decision; one host sync per step keeps a non-finite update from ever being applied.
        finite = bool(torch.isfinite(stats if self.world == 1 else stats[_S["grad_norm"]:]).all())
        if finite:
            outcome = APPLIED
        elif scaling and not bool(torch.isfinite(grad_norm)) and self._losses_finite(totals):
            outcome = OVERFLOW  # float16 gradients overflowed at this loss scale: the scaler skips and lowers it
        else:
            outcome = NONFINITE
        if finite:
            if scaling:
                self.scaler.step(self.optimizer)  # steps: the unscaled gradients were checked finite above
            else:
                self.optimizer.step()
        if scaling:
            self.scaler.update()  # halves the scale after an overflow, doubles it after growth_interval clean steps
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - cfg.ema_decay)
        return stats, outcome

    def _losses_finite(self, totals: torch.Tensor) -> bool:
        """Whether every rank's losses of this step are finite: with float16 gradients that overflowed, a finite
        loss means the scaler's overflow (skip and lower the scale), a non-finite one a real failure. Every rank
        calls it together (the gradient norm they all saw is the same)."""
        ok = torch.isfinite(totals).all().float().view(1)
        if self.world > 1:
            ok = self.accelerator.reduce(ok, reduction="sum") / self.world
        return bool(ok.item() == 1.0)

    # -- state -------------------------------------------------------------------------------
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.raw.state_dict(), **dict(zip(self.param_names, self.ema))}

    def save(self, folder: str, step: int, state: dict[str, Any]) -> str:
        if self.scaler.is_enabled():
            state = {**state, "grad_scaler": self.scaler.state_dict()}
        return save_checkpoint(folder, step, model=self.raw.state_dict(), ema=self.ema_state_dict(),
                               optimizer=self.optimizer, state=state)

    def load(self, path: str) -> dict[str, Any]:
        """Restore weights, EMA and optimizer from a checkpoint (verified first); returns its state."""
        ck = load_checkpoint(path, device=self.device)
        missing = [n for n in self.param_names if n not in ck["ema"]]
        if missing:
            raise CheckpointError(f"{path}/ema.safetensors lacks {', '.join(missing[:3])}: not this run's model")
        self.raw.load_state_dict(ck["model"])
        with torch.no_grad():
            for name, e in zip(self.param_names, self.ema):
                e.copy_(ck["ema"][name])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scaler.is_enabled():
            scaler = ck["state"].get("grad_scaler")
            if not isinstance(scaler, dict) or not math.isfinite(scaler.get("scale", math.nan)):
                raise CheckpointError(f"{path}/state.json holds no gradient scaler state, which every fp16 checkpoint "
                                      "has: not a checkpoint of this run")
            self.scaler.load_state_dict(scaler)
        return ck["state"]


# ------------------------------------------------------------------------------------------
# Data


def micro_batches(cache: cache_lib.CacheReader, cfg: TrainConfig, *, micro: int, rank: int, world: int, step: int,
                  steps_per_epoch: int, teachers: list[str]):
    """Yield (step, [grad_accum micro-batches of this rank]) from ``step`` on, epoch after epoch,
    reading the tokens of ``teachers`` only.

    Step s reads positions [s' G, (s' + 1) G) of epoch s // steps_per_epoch (s' = s mod steps_per_epoch,
    G the global batch): the same samples whatever the number of ranks or accumulation steps.
    """
    while True:
        epoch, s = divmod(step, steps_per_epoch)
        loader = cache.loader(micro, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world,
                              start=s * cfg.batch_size, flip=cfg.flip, drop_last=True,
                              num_workers=cfg.loader_workers, teachers=teachers, order=cfg.order,
                              shuffle_window=cfg.shuffle_window)
        it = iter(loader)
        try:
            for _ in range(s, steps_per_epoch):
                yield step, [next(it) for _ in range(cfg.grad_accum)]
                step += 1
        finally:
            it.close()
            loader.close()


# ------------------------------------------------------------------------------------------
# The loop


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        gb = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return gb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def order_free(out: str, cfg: TrainConfig, world: int) -> frozenset[str]:
    """The data-order settings a rerun in ``out`` leaves uncompared: ``--shuffle-window`` where neither run uses
    the block order (it orders nothing then), both where the record predates them and this run uses the
    permutation (what every run did then). SetupError (one line) for a block-order run resumed on another number
    of ranks: its order is laid out per rank, so the rest of the epoch would be another one."""
    old = recorded_train(out)
    if old.get("order") == "blocks" and cfg.order == "blocks" and old.get("ranks") not in (None, world):
        raise SetupError(f"{out} was trained with --order blocks on {old['ranks']} rank(s), and this run has {world}: "
                         "the block order is laid out per rank, so it resumes exactly on the same number of ranks "
                         f"only: rerun on {old['ranks']} rank(s), or start a new --out")
    if not old or ("order" not in old and cfg.order == "permutation"):
        return frozenset({"train.order", "train.shuffle_window"})
    return frozenset({"train.shuffle_window"}) if old.get("order") == cfg.order == "permutation" else frozenset()


def claim_run_dir(out: str) -> FolderLock:
    """Claim ``out`` for a training run (see :func:`cache.cli.runtime.claim_folder`) and hold its lock (FolderBusy
    naming the holder if another training writes there); an older run's config.json (train, model, cache)
    counts as ours."""
    lock = claim_folder(out, marker=RUN_MARKER, kind="training run", legacy_keys=frozenset({"train", "model", "cache"}),
                        lock=True)
    assert lock is not None
    return lock


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; every rank calls this. Returns the last metrics and paths."""
    accelerator, device, _ = make_accelerator(cfg.device, cfg.precision)
    rank = accelerator.process_index
    bound = int(cfg.cache_local_gb * 1e9) if cfg.cache_local and cfg.cache_local_gb else None  # None: free disk space
    # before the folder is claimed: a missing cache leaves no run folder
    cache = cache_lib.open_cache(cfg.cache, local_cache=cfg.cache_local or None, local_cache_bytes=bound,
                                 storage_options=cfg.storage_options())
    problem, lock = "", None
    if rank == 0:  # the others wait: they would see rank 0's files appear before its marker
        try:
            lock = claim_run_dir(cfg.out)  # before the log file goes there
        except SetupError as e:
            problem = str(e)
    problem = broadcast_from_rank0(problem, accelerator.num_processes)  # every rank stops, none waits forever
    if problem:
        raise SetupError(problem)
    try:
        return _train(cfg, cache, accelerator, device, rank)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, cache: cache_lib.CacheReader, accelerator: Any, device: torch.device, rank: int
           ) -> dict[str, Any]:
    """:func:`train` once the run folder is claimed and locked."""
    setup_logging(rank, os.path.join(cfg.out, "log.txt"), stream=_TqdmHandler())
    legacy = legacy_model_fields(recorded_model(cfg.out))  # e.g. a run from before bias-free down/up convolutions
    trainer = Trainer(cfg, cache, accelerator, device, legacy=legacy)
    world = accelerator.num_processes
    # not the world size, on which results do not depend, except in the block order (laid out per rank)
    train_record = {**config_to_dict(cfg), **({"ranks": world} if cfg.order == "blocks" else {})}
    record = RunRecord(train=train_record, model=dataclasses.asdict(trainer.model_config),
                       cache=cache_identity(cache, trainer.teacher))
    run_config = record.to_dict()
    free = (frozenset(f"train.{k}" for k in RESUMABLE_CHANGES) | {f"cache.{k}" for k in CacheIdentity.DERIVED}
            | {f"model.{k}" for k in legacy} | order_free(cfg.out, cfg, world)
            | unrecorded_cache_entries(cfg.out))  # an older record did not say: not compared, written now
    refuse_changed_rerun(cfg.out, run_config, free=free, what="a run")
    steps_per_epoch = len(cache) // cfg.batch_size
    if steps_per_epoch < 1:
        raise SetupError(f"the cache holds {len(cache)} samples, fewer than one global batch of {cfg.batch_size}")

    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    if rank == 0:
        clean_partial(ckpt_dir)
        write_json(os.path.join(cfg.out, "config.json"), run_config)
    accelerator.wait_for_everyone()
    latest, state = resume(trainer, ckpt_dir, rank=rank)
    accelerator.wait_for_everyone()
    step, skipped = int(state.get("step", 0)), int(state.get("skipped_nonfinite", 0))
    if accelerator.num_processes > 1:  # rank 0 writes the checkpoints; every rank must resume from the same one
        found = [int(s) for s in accelerator.gather(torch.tensor([step], device=device)).tolist()]
        if len(set(found)) > 1:
            raise SetupError(f"the ranks found different checkpoints to resume from (step by rank: {found}): each rank "
                             f"resumes from the newest checkpoint in its --out ({cfg.out}), which rank 0 writes; put "
                             "--out on a file system every node sees (or copy OUT/checkpoints to every node) and rerun")
    overflows = int(state.get("skipped_overflow", 0))  # fp16 steps the gradient scaler skipped (not failures)
    n_params = sum(p.numel() for p in trainer.params)
    _logger.info("model %s: %.2fM parameters, %s; cache %s: %d samples, teacher %s; %d rank(s) x %d samples x %d "
                 "accumulation = global batch %d; %d steps per epoch; %s", cfg.model, n_params / 1e6,
                 trainer.model_config, cfg.cache, len(cache), trainer.teacher, accelerator.num_processes,
                 trainer.micro, cfg.grad_accum, cfg.batch_size, steps_per_epoch,
                 f"resumed from {latest}" if latest else "starting from scratch")
    if record.cache.random_weights:
        _logger.warning("the cache was encoded with random-weight encoders: fine for plumbing and speed, "
                        "meaningless for sample quality")

    log = MetricsLog(cfg.out, resume_step=step, tensorboard=cfg.tensorboard) if rank == 0 else None
    png = os.path.join(cfg.out, "losses.png")
    last: dict[str, Any] = {}
    if step >= cfg.steps:
        _logger.info("already trained for %d steps (--steps %d); nothing to do", step, cfg.steps)
    else:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=rank != 0, dynamic_ncols=True, mininterval=1.0,
                   smoothing=0.1, desc=cfg.model)
        data = micro_batches(cache, cfg, micro=trainer.micro, rank=rank, world=accelerator.num_processes,
                             step=step, steps_per_epoch=steps_per_epoch, teachers=trainer.teachers_read)
        window = torch.zeros(len(STEP_STATS), device=device)
        t_window, n_window, n_taken, n_overflow = time.perf_counter(), 0, 0, 0
        try:
            for s, batches in data:
                stats_s, outcome = trainer.train_step(batches, s)
                n_window += 1
                step = s + 1
                if outcome == APPLIED:
                    window += stats_s
                    n_taken += 1
                elif outcome == OVERFLOW:  # the scaler's own skip: counted and logged, never a failure
                    overflows += 1
                    n_overflow += 1
                else:
                    skipped += 1
                    values = dict(zip(STEP_STATS, stats_s.tolist()))
                    what = (f"step {step}: the loss or the gradient norm is not finite (loss {values['loss']}, grad "
                            f"norm {values['grad_norm']}); the update was not applied")
                    if skipped > cfg.skip_nonfinite:
                        raise NonFiniteError(
                            f"{what}, and training stops ({skipped - 1} of --skip-nonfinite {cfg.skip_nonfinite} "
                            f"steps skipped before). The checkpoints in {ckpt_dir} are intact. Check the cache for "
                            "NaN values (python -m cache.inspect CACHE --verify), lower --lr or --latent-scale, or "
                            "rerun with --skip-nonfinite N to skip up to N such steps")
                    _logger.warning("%s; skipped (%d of --skip-nonfinite %d)", what, skipped, cfg.skip_nonfinite)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - t_window
                    last = {"step": step, "epoch": step / steps_per_epoch}
                    if n_taken:  # the same on every rank (see train_step); a window of skipped steps has no losses
                        stats = dict(zip(STEP_STATS, accelerator.reduce(window / n_taken, reduction="mean").tolist()))
                        if not all(map(math.isfinite, stats.values())):
                            raise NonFiniteError(f"steps {step - n_window + 1}..{step}: the mean losses over the "
                                                 f"ranks are not finite ({list(stats.values())}); training stops. Check "
                                                 "the cache for NaN values (python -m cache.inspect CACHE --verify) or "
                                                 "lower --lr")
                        last.update(stats)
                        last["cos"] = -stats["loss_align"]
                        bar.set_postfix(loss=f"{stats['loss']:.4f}", v=f"{stats['loss_v']:.4f}",
                                        cos=f"{-stats['loss_align']:.3f}",
                                        img_s=f"{n_window * cfg.batch_size / elapsed:.1f}")
                    last.update(img_per_s=n_window * cfg.batch_size / elapsed, mem_gb=_memory_gb(device),
                                skipped_nonfinite=skipped)
                    if trainer.scaler.is_enabled():
                        last.update(skipped_overflow=overflows, loss_scale=trainer.scaler.get_scale())
                        if n_overflow:
                            _logger.info("steps %d..%d: %d step(s) skipped by the fp16 gradient scaler (gradients "
                                         "overflowed float16; %d in all), loss scale now %g", step - n_window + 1,
                                         step, n_overflow, overflows, trainer.scaler.get_scale())
                    if log is not None:
                        log.write(last)
                    window.zero_()
                    t_window, n_window, n_taken, n_overflow = time.perf_counter(), 0, 0, 0
                if step % cfg.ckpt_every == 0 or step == cfg.steps:
                    t_ckpt = time.perf_counter()
                    if rank == 0:
                        try:
                            path = trainer.save(ckpt_dir, step, {"seed": cfg.seed, "epoch": step / steps_per_epoch,
                                                                 "skipped_nonfinite": skipped,
                                                                 "skipped_overflow": overflows})
                        except CheckpointWriteError:  # a full disk or a read-only folder: one line, as it says
                            raise
                        except CheckpointError as e:  # non-finite weights: nothing written, nothing pruned
                            raise NonFiniteError(f"{e}; training stops, the checkpoints in {ckpt_dir} are "
                                                 "intact. Lower --lr or check the cache for NaN values") from None
                        prune_checkpoints(ckpt_dir, cfg.keep_ckpts)
                        plot_losses(read_metrics(log.path), png, title=f"{cfg.model} on {os.path.basename(cfg.cache)}")
                        _logger.info("step %d: checkpoint %s", step, path)
                    accelerator.wait_for_everyone()
                    t_window += time.perf_counter() - t_ckpt  # img/s counts training only
                if step >= cfg.steps:
                    break
        finally:
            data.close()
            bar.close()
    if log is not None:
        rows = read_metrics(log.path)
        plot_losses(rows, png, title=f"{cfg.model} on {os.path.basename(cfg.cache)}")
        log.close()
        rows = [r for r in rows if "loss" in r]
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            _logger.info("step %d -> %d: loss %.4f -> %.4f, loss_v %.4f -> %.4f, loss_manifold %.4f -> %.4f, "
                         "token cosine %.3f -> %.3f", a["step"], b["step"], a["loss"], b["loss"], a["loss_v"],
                         b["loss_v"], a["loss_manifold"], b["loss_manifold"], a["cos"], b["cos"])
        _logger.info("done: %d steps; metrics %s; loss curves %s", step, log.path, png)
    accelerator.wait_for_everyone()
    return {"step": step, "metrics": last, "run": cfg.out, "losses_png": png}


def resume(trainer: Trainer, ckpt_dir: str, *, rank: int) -> tuple[str | None, dict[str, Any]]:
    """Load the newest checkpoint that verifies: (its path or None, its state). A damaged one is renamed
    ``damaged-step-*`` (by rank 0) with a warning, and the one before it is tried; SetupError if none is left."""
    found = checkpoints(ckpt_dir)
    errors = []
    for path in found:
        try:
            return path, trainer.load(path)
        except CheckpointError as e:
            errors.append(str(e))
            aside = os.path.join(ckpt_dir, "damaged-" + os.path.basename(path))
            _logger.warning("checkpoint %s is damaged: %s. It is moved to %s; resuming from the one before it", path,
                            e, aside)
            if rank == 0:
                os.replace(path, aside if not os.path.exists(aside) else f"{aside}-{int(time.time())}")
    if found:
        raise SetupError(f"every checkpoint in {ckpt_dir} is damaged (newest: {errors[0]}); they were moved to "
                         "damaged-step-*: rerun to start from scratch, or restore a checkpoint from a backup")
    return None, {}


def main(argv: list[str] | None = None) -> int:
    cfg, dry_run = parse_config(TrainConfig, argv, presets=PRESETS)
    if dry_run:
        return 0
    try:
        train(cfg)
    except (SetupError, NonFiniteError, CheckpointError, cache_lib.CacheError) as e:  # ShardReadError among them
        print(f"error: {explain(e, out_flag='--cache')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
