"""Measure int8 teacher tokens against float16: accuracy, bytes on disk, loader speed, storage at full size.

    python -m tools.bench.int8 [--preset cpu|gpu] [--images 64] [--synthetic-images 128]
        [--outlier-scales 0 10 20 50] [--rows 2048] [--skip-teacher] [--skip-synthetic] [--skip-loader]

Two token sets, each compared with its float16 tokens:

(a) teacher    the DINOv2-B architecture with seeded random weights (``random:vit_base_patch14_dinov2.lvd142m``)
               on the demo photos (``tools.demo_images``) at 256 px (256 tokens x 768): ``pipeline.build``
               builds the same images twice, ``--feature-dtype fp16`` and ``int8`` (quantised on the device
               from the encoder's float32 output), and the stored tokens are compared.
(b) synthetic  tokens that mimic a real ViT's final-norm output (:class:`SyntheticTeacher`: low-rank
               power-law spectrum, a few high-magnitude outlier channels, a noise floor, per-token
               standardisation, per-channel gain and bias), one set per ``--outlier-scales`` value.

For each set and quantisation rule: per-token cosine of the dequantised tokens (as the trainer sees them:
int8 x scale in float32) to the float16 tokens, in float64 (mean, min; goal mean >= 0.9995, min >= 0.999);
the relative error |L(int8) - L(fp16)| / |L(fp16)| of the U-REPA alignment and manifold losses
(``trainer.losses.urepa_alignment``, goal <= 1e-3) for two students: ``aligned`` (a fixed random rotation of
the float16 tokens mixed with them, cosine ``--student-cos``, plus noise; losses of the size training
sees) and ``random`` (Gaussian, unrelated: its alignment loss is about 0, so its relative error says
nothing); bytes per token against float16 (goal <= 0.52). The cache stores ``cache`` (cache.quant: channels
louder than the median divided down to it by per-teacher channel scales, then one float32 absmax scale
per token); the other rules are measured here only, for comparison (:data:`RULES`). Bytes on disk come from the built caches (a) and from the loader's caches.

Loader: two caches of the same shapes (``--rows`` rows of 256 x 768, random values), float16 and int8,
read by ``CacheLoader`` in the same run, in interleaved rounds: float16, int8 as stored (values and
scales), int8 with ``dequantize=True`` (float16 tokens made by the reader threads). Medians of the rounds.

Storage: the bytes of an ImageNet-1k cache (1,281,167 images) at 256 and 512 px, from ``ZarrStorage.nbytes``
(the layout the build writes, shard indexes included): SD-VAE moments, DINOv2-B and DINOv2-L tokens in
float16 and int8, with and without the mirrored variant.

Prints the tables and writes ``OUT/bench_int8.json``. Random weights and synthetic tokens: nothing here
measures a real DINOv2's tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cache import ZarrStorage, open_cache, zarr_layout
from cache.cli.config import ConfigError, check_fields, config_to_dict, parse_config
from cache.cli.runtime import resolve_device
from cache.layout import SCALES_GROUP, stored_dtype
from cache.quant import QMAX, channel_scales, dequantize_tokens, quantize_tokens
from pipeline.build import BuildConfig, build
from pipeline.encoders import teacher_grid, teacher_name
from tools.bench.cache import machine_info, raw_sequential, synthetic_cache, synthetic_folder
from tools.bench.cachefiles import shard_paths
from tools.demo_images import load_sources, make_demo_imagefolder
from trainer.losses import urepa_alignment

GOALS = {"cos_mean": 0.9995, "cos_min": 0.999, "loss_rel_err": 1e-3, "bytes_ratio": 0.52}
IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class BenchInt8Config:
    """Measure int8 teacher tokens against float16."""

    out: str = field(default="bench-out", metadata={"help": "folder for the images, caches and bench_int8.json"})
    device: str = field(default="auto", metadata={"help": "build device: auto, cpu, cuda or cuda:N"})
    # (a) the teacher on the demo photos
    teacher: str = field(default="random:vit_base_patch14_dinov2.lvd142m", metadata={
        "help": "teacher spec of (a) (pipeline.build --teacher)"})
    images: int = field(default=64, metadata={
        "min": 1, "max": 1_000_000, "help": "demo photos encoded in (a)"})
    resolution: int = field(default=256, metadata={
        "min": 8, "max": 4096, "help": "image side of (a); 256 px: 16 x 16 tokens"})
    precision: Literal["fp32", "tf32", "bf16"] = field(default="fp32", metadata={
        "help": "encoder precision of both builds of (a)"})
    build_batch: int = field(default=16, metadata={"min": 1, "max": 1 << 16, "help": "encoder batch of (a)"})
    build_workers: int = field(default=0, metadata={
        "min": 0, "max": 256, "help": "decoding processes of (a)"})
    # (b) the synthetic token sets
    synthetic_images: int = field(default=128, metadata={
        "min": 1, "max": 1_000_000, "help": "images per synthetic set"})
    tokens: int = field(default=256, metadata={
        "min": 1, "max": 1 << 16, "help": "tokens per image (synthetic sets and loader caches)"})
    dim: int = field(default=768, metadata={
        "min": 2, "max": 1 << 16, "help": "token width (synthetic sets and loader caches)"})
    rank: int = field(default=96, metadata={
        "min": 1, "max": 1 << 16, "help": "synthetic: rank of the low-rank signal"})
    exponent: float = field(default=1.0, metadata={
        "min": 0.0, "max": 10.0, "help": "synthetic: singular value k of the signal is k ** -exponent"})
    image_share: float = field(default=0.3, metadata={
        "min": 0.0, "max": 1.0,
        "help": "synthetic: share of the signal's variance common to all tokens of an image"})
    noise: float = field(default=0.1, metadata={
        "min": 0.0, "max": 100.0, "help": "synthetic: isotropic noise std per channel (the signal's is 1)"})
    outliers: int = field(default=4, metadata={
        "min": 0, "max": 1 << 16, "help": "synthetic: number of outlier channels"})
    outlier_scales: tuple[float, ...] = field(default=(0.0, 5.0, 10.0, 20.0, 50.0), metadata={
        "min": 0.0, "max": 10000.0,
        "help": "synthetic: magnitude of the outlier channels in signal stds, one set each"})
    outlier_jitter: float = field(default=0.25, metadata={
        "min": 0.0, "max": 10.0,
        "help": "synthetic: relative spread of an outlier channel around its fixed sign and magnitude"})
    gain_std: float = field(default=0.3, metadata={
        "min": 0.0, "max": 10.0,
        "help": "synthetic: per-channel gain after standardisation is exp(gain_std * N(0, 1))"})
    bias_std: float = field(default=0.1, metadata={
        "min": 0.0, "max": 100.0, "help": "synthetic: per-channel bias std"})
    seed: int = field(default=0, metadata={
        "min": 0, "max": 2**32 - 1, "help": "seed of the synthetic teacher and the students"})
    # the rules and the losses
    calibration_images: int = field(default=16, metadata={
        "min": 1, "max": 1_000_000,
        "help": "images whose channel statistics the prescale and outlier rules use (a: the first ones of the "
                "set; b: a separate draw)"})
    group: int = field(default=128, metadata={
        "min": 1, "max": 1 << 16, "help": "channels per scale of the group rule"})
    clip: float = field(default=8.0, metadata={
        "min": 1.0, "max": 1e9, "help": "clip rule: the scale is min(absmax, clip x token RMS) / 127"})
    student_cos: float = field(default=0.6, metadata={
        "min": -1.0, "max": 1.0, "help": "cosine of the aligned student to the teacher tokens"})
    student_noise: float = field(default=0.5, metadata={
        "min": 0.0, "max": 100.0, "help": "noise std of the aligned student, relative to the tokens' RMS"})
    loss_batch: int = field(default=16, metadata={
        "min": 1, "max": 1 << 16, "help": "images per loss evaluation"})
    # the loader
    rows: int = field(default=2048, metadata={
        "min": 1, "max": 10_000_000, "help": "rows of each loader cache"})
    loader_batch: int = field(default=256, metadata={"min": 1, "max": 1 << 16, "help": "loader batch"})
    loader_workers: int = field(default=4, metadata={"min": 1, "max": 256, "help": "loader reader threads"})
    rounds: int = field(default=5, metadata={
        "min": 1, "max": 1000, "help": "timed epochs per loader variant, interleaved"})
    skip_teacher: bool = field(default=False, metadata={"help": "skip (a)"})
    skip_synthetic: bool = field(default=False, metadata={"help": "skip (b)"})
    skip_loader: bool = field(default=False, metadata={"help": "skip the loader measurement"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not -1.0 <= self.student_cos <= 1.0:
            raise ConfigError(f"--student-cos must lie in [-1, 1], got {self.student_cos}")
        if self.image_share > 1:
            raise ConfigError(f"--image-share is a share of variance: at most 1, got {self.image_share}")
        if any(not math.isfinite(v) or v < 0 for v in self.outlier_scales):
            raise ConfigError(f"--outlier-scales must be finite and >= 0, got {self.outlier_scales}")
        if self.outliers > self.dim or self.rank > self.dim:
            raise ConfigError(f"--outliers and --rank must be <= --dim ({self.dim})")

    def synthetic_teacher(self, outlier_scale: float) -> SyntheticTeacher:
        return SyntheticTeacher(tokens=self.tokens, dim=self.dim, rank=self.rank, exponent=self.exponent,
                                image_share=self.image_share, noise=self.noise, outliers=self.outliers,
                                outlier_scale=outlier_scale, outlier_jitter=self.outlier_jitter,
                                gain_std=self.gain_std, bias_std=self.bias_std, seed=self.seed)


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": dict(images=512, build_batch=128, build_workers=8, rows=8192, loader_workers=8, synthetic_images=256),
}


# ------------------------------------------------------------------------------------------
# The synthetic teacher


@dataclass(frozen=True)
class SyntheticTeacher:
    """Tokens (n, T, D) that mimic a ViT's patch tokens after its final LayerNorm.

    One image's tokens, in order:

    1. signal ``z @ diag(sv) @ V^T``: V (D x rank) fixed orthonormal, ``sv_k = k ** -exponent`` scaled so
       that each channel has variance 1 on average, z (T x rank) Gaussian with a share ``image_share`` of
       its variance common to the image's tokens (tokens of one image are alike, as real ones are);
    2. plus isotropic Gaussian noise of std ``noise`` (the noise floor of the spectrum);
    3. plus, on ``outliers`` fixed channels, ``outlier_scale * (sign_c + outlier_jitter * N(0, 1))``: the
       few high-magnitude channels of real ViT features, of fixed sign (0 leaves them out);
    4. standardised per token (mean 0, std 1 over the D channels), as LayerNorm does;
    5. times a per-channel gain ``exp(gain_std * N(0, 1))`` plus a per-channel bias ``bias_std * N(0, 1)``
       (LayerNorm's affine weights).

    Everything fixed (V, sv, outlier channels and signs, gain, bias) comes from ``seed``: one teacher; each
    :meth:`sample` call draws images from its own ``seed``.
    """

    tokens: int = 256
    dim: int = 768
    rank: int = 96
    exponent: float = 1.0
    image_share: float = 0.3
    noise: float = 0.1
    outliers: int = 4
    outlier_scale: float = 20.0
    outlier_jitter: float = 0.25
    gain_std: float = 0.3
    bias_std: float = 0.1
    seed: int = 0

    def _fixed(self) -> dict[str, np.ndarray]:
        g = np.random.default_rng([self.seed, 0])
        v = np.linalg.qr(g.standard_normal((self.dim, self.rank)))[0]
        sv = np.arange(1, self.rank + 1, dtype=np.float64) ** -self.exponent
        sv *= math.sqrt(self.dim / float(np.sum(sv ** 2)))
        return {"basis": (sv[:, None] * v.T).astype(np.float32),  # (rank, D)
                "channels": g.choice(self.dim, self.outliers, replace=False),
                "signs": g.choice(np.array([-1.0, 1.0]), self.outliers),
                "gain": np.exp(self.gain_std * g.standard_normal(self.dim)).astype(np.float32),
                "bias": (self.bias_std * g.standard_normal(self.dim)).astype(np.float32)}

    @property
    def outlier_channels(self) -> np.ndarray:
        return self._fixed()["channels"]

    def sample(self, n: int, *, seed: int) -> np.ndarray:
        """float32 (n, tokens, dim): ``n`` images of this teacher, drawn with ``seed``."""
        f = self._fixed()
        g = np.random.default_rng([self.seed, 1, seed])
        z = (math.sqrt(self.image_share) * g.standard_normal((n, 1, self.rank), dtype=np.float32)
             + math.sqrt(1 - self.image_share) * g.standard_normal((n, self.tokens, self.rank), dtype=np.float32))
        x = z @ f["basis"]
        x += self.noise * g.standard_normal(x.shape, dtype=np.float32)
        if self.outliers and self.outlier_scale:
            jitter = self.outlier_jitter * g.standard_normal((n, self.tokens, self.outliers), dtype=np.float32)
            x[..., f["channels"]] += self.outlier_scale * (f["signs"].astype(np.float32) + jitter)
        x -= x.mean(-1, keepdims=True)
        x /= np.maximum(x.std(-1, keepdims=True), 1e-12)
        return x * f["gain"] + f["bias"]


# ------------------------------------------------------------------------------------------
# Quantisation rules: float32 tokens (n, T, D) -> the dequantised float32 tokens the trainer would see


def channel_rms(calibration: torch.Tensor) -> torch.Tensor:
    """float32 (D,) root mean square of each channel over the calibration tokens (..., D)."""
    return calibration.double().square().reshape(-1, calibration.shape[-1]).mean(0).sqrt().float()


def absmax(x: torch.Tensor, calibration: torch.Tensor, bc: BenchInt8Config) -> torch.Tensor:
    """One absmax scale per token, nothing else (cache.quant without channel scales)."""
    q, s = quantize_tokens(x)
    return dequantize_tokens(q, s)


def cache_rule(x: torch.Tensor, calibration: torch.Tensor, bc: BenchInt8Config) -> torch.Tensor:
    """What the cache stores (cache.quant): channels louder than the median divided down to it (channel
    scales from the calibration tokens, D float32 per teacher), then one absmax scale per token."""
    c = channel_scales(calibration)
    q, s = quantize_tokens(x, c)
    return dequantize_tokens(q, s, c)


def prescale(x: torch.Tensor, calibration: torch.Tensor, bc: BenchInt8Config) -> torch.Tensor:
    """Per-channel pre-scaling (SmoothQuant-like): divide each channel by its RMS over the calibration
    tokens (D float32 stored once per teacher), absmax per token, multiply back."""
    c = channel_rms(calibration).clamp_min(1e-12)
    q, s = quantize_tokens(x / c)
    return dequantize_tokens(q, s) * c


def grouped(x: torch.Tensor, calibration: torch.Tensor, bc: BenchInt8Config) -> torch.Tensor:
    """One absmax scale per ``--group`` channels of a token (ceil(D / group) float32 scales per token)."""
    d, g = x.shape[-1], bc.group
    pad = -d % g
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, g)
    q, s = quantize_tokens(xp)
    return dequantize_tokens(q, s).reshape(*x.shape[:-1], d + pad)[..., :d]


def clipped(x: torch.Tensor, calibration: torch.Tensor, bc: BenchInt8Config) -> torch.Tensor:
    """Clipping: scale = min(absmax, clip x the token's RMS) / 127; larger values saturate at +-127."""
    x = x.float()
    amax = x.abs().amax(-1)
    scale = torch.minimum(amax, bc.clip * x.square().mean(-1).sqrt()) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.round(x / safe).clamp_(-QMAX, QMAX)
    return q * scale.unsqueeze(-1)


def outlier_fp16(x: torch.Tensor, calibration: torch.Tensor, bc: BenchInt8Config) -> torch.Tensor:
    """The ``--outliers`` channels of largest calibration RMS kept in float16 (their indices stored once
    per teacher), absmax over the others (LLM.int8-like)."""
    k = min(bc.outliers, x.shape[-1] - 1)
    keep = torch.zeros(x.shape[-1], dtype=torch.bool)
    keep[torch.topk(channel_rms(calibration), k).indices] = True
    out = torch.empty_like(x, dtype=torch.float32)
    out[..., keep] = x[..., keep].half().float()
    out[..., ~keep] = absmax(x[..., ~keep], calibration, bc)
    return out


Rule = Callable[[torch.Tensor, torch.Tensor, BenchInt8Config], torch.Tensor]
#: name -> (the rule, stored bytes per token for D channels, what it stores per teacher besides)
RULES: dict[str, tuple[Rule, Callable[[int, BenchInt8Config], int], str]] = {
    "cache": (cache_rule, lambda d, bc: d + 4, "D float32 channel scales (cache.quant: what the cache stores)"),
    "absmax": (absmax, lambda d, bc: d + 4, "nothing"),
    "prescale": (prescale, lambda d, bc: d + 4, "D float32 channel scales"),
    "group": (grouped, lambda d, bc: d + 4 * -(-d // bc.group), "nothing"),
    "clip": (clipped, lambda d, bc: d + 4, "nothing"),
    "outlier-fp16": (outlier_fp16, lambda d, bc: (d - min(bc.outliers, d - 1)) + 2 * min(bc.outliers, d - 1) + 4,
                     "the outlier channels' indices"),
}


def bytes_ratio(rule: str, dim: int, bc: BenchInt8Config) -> float:
    """Stored bytes per token of ``rule`` over float16's (2 D)."""
    return RULES[rule][1](dim, bc) / (2 * dim)


# ------------------------------------------------------------------------------------------
# Accuracy


def token_cosines(a: torch.Tensor, b: torch.Tensor, *, chunk: int = 32) -> torch.Tensor:
    """float64 cosine of each token (..., D) of ``a`` to the same token of ``b``, flattened; 1 where both
    tokens are zero."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    out = torch.empty(a.shape[0], dtype=torch.float64)
    step = chunk * 256
    for lo in range(0, a.shape[0], step):
        x, y = a[lo:lo + step].double(), b[lo:lo + step].double()
        nx, ny = x.norm(dim=-1), y.norm(dim=-1)
        cos = (x * y).sum(-1) / (nx * ny)
        out[lo:lo + step] = torch.where((nx == 0) & (ny == 0), torch.ones_like(cos), cos)
    return out


def cosine_stats(test: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean and min per-token cosine of ``test`` to ``ref`` (float64), and the mean relative L2 error."""
    cos = token_cosines(test, ref)
    diff = (test.double() - ref.double()).reshape(-1, ref.shape[-1]).norm(dim=-1)
    rel = diff / ref.double().reshape(-1, ref.shape[-1]).norm(dim=-1).clamp_min(1e-300)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "rel_l2_mean": float(rel.mean()),
            "tokens": int(cos.numel())}


def make_students(ref: torch.Tensor, *, cos: float, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """Fixed float64 students (n, T, D) for ``ref``'s tokens: ``aligned`` = cos x ref + sin x ref R + noise
    (R a random rotation, so the projection is a fixed random one and the cosine to ref is about ``cos``
    before the noise), ``random`` = Gaussian, unrelated to ref; both at ref's RMS."""
    g = torch.Generator().manual_seed(seed)
    d = ref.shape[-1]
    ref = ref.double()
    rms = ref.square().mean().sqrt()
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    sin = math.sqrt(max(0.0, 1.0 - cos * cos))
    aligned = cos * ref + sin * (ref @ rotation) + noise * rms * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    return {"aligned": aligned, "random": rms * torch.randn(ref.shape, generator=g, dtype=torch.float64)}


@torch.no_grad()
def urepa_losses(student: torch.Tensor, teacher: torch.Tensor, *, batch: int) -> tuple[float, float]:
    """(alignment, manifold) losses of ``trainer.losses.urepa_alignment`` in float64 over all images, in
    batches of ``batch`` images (both are means per image, so the batch size does not change them)."""
    align = manifold = 0.0
    n = student.shape[0]
    for lo in range(0, n, batch):
        s, t = student[lo:lo + batch].double(), teacher[lo:lo + batch].double()
        a, m = urepa_alignment(s, t)
        align += float(a) * s.shape[0] / n
        manifold += float(m) * s.shape[0] / n
    return align, manifold


def loss_errors(students: Mapping[str, torch.Tensor], test: torch.Tensor, ref: torch.Tensor, *, batch: int,
                ref_losses: Mapping[str, tuple[float, float]] | None = None) -> dict[str, dict[str, float]]:
    """Per student: both losses with the reference tokens and with ``test``, and their relative errors."""
    out = {}
    for name, student in students.items():
        la, lm = ref_losses[name] if ref_losses else urepa_losses(student, ref, batch=batch)
        ta, tm = urepa_losses(student, test, batch=batch)
        out[name] = {"align": la, "manifold": lm, "align_abs_err": abs(ta - la), "manifold_abs_err": abs(tm - lm),
                     "align_rel_err": abs(ta - la) / abs(la) if la else float("inf"),
                     "manifold_rel_err": abs(tm - lm) / abs(lm) if lm else float("inf")}
    return out


def measure_set(ref: torch.Tensor, tokens: torch.Tensor, calibration: torch.Tensor, bc: BenchInt8Config, *,
                stored: torch.Tensor | None = None, exact: bool = True) -> dict[str, Any]:
    """Every rule on one token set: ``ref`` the float16 tokens (n, T, D), ``tokens`` the float32 tokens the
    rules quantise, ``stored`` (optional) the dequantised tokens of a built int8 cache, measured as
    ``cache (built)``. ``exact``: ``tokens`` are the exact values (not float16 ones made float32), so
    float16's own error against them is measured too."""
    students = make_students(ref, cos=bc.student_cos, noise=bc.student_noise, seed=bc.seed)
    ref_losses = {k: urepa_losses(s, ref, batch=bc.loss_batch) for k, s in students.items()}
    d = ref.shape[-1]
    rules: dict[str, Any] = {}
    todo: dict[str, Callable[[], torch.Tensor]] = {}
    if stored is not None:
        todo["cache (built)"] = lambda: stored
    for name, (rule, _, _) in RULES.items():
        todo[name] = lambda rule=rule: rule(tokens, calibration, bc)
    for name, make in todo.items():
        deq = make()
        rule = name.split(" ")[0]
        rules[name] = {**cosine_stats(deq, ref), "bytes_ratio": bytes_ratio(rule, d, bc),
                       "per_teacher": RULES[rule][2],
                       "losses": loss_errors(students, deq, ref, batch=bc.loss_batch, ref_losses=ref_losses)}
        del deq
    fp16 = cosine_stats(ref, tokens) if exact else None
    return {"images": int(ref.shape[0]), "tokens": int(ref.shape[1]), "dim": d,
            "absmax_over_rms": float((tokens.abs().amax(-1) / tokens.square().mean(-1).sqrt()).mean()),
            "fp16_vs_fp32": fp16, "rules": rules}


def meets_goals(r: Mapping[str, Any]) -> bool:
    """Whether one rule's figures meet the issue's goals (aligned student for the alignment loss, both
    students for the manifold loss; the random student's alignment loss is about 0)."""
    losses = r["losses"]
    errs = [losses["aligned"]["align_rel_err"], *(v["manifold_rel_err"] for v in losses.values())]
    return (r["cos_mean"] >= GOALS["cos_mean"] and r["cos_min"] >= GOALS["cos_min"]
            and max(errs) <= GOALS["loss_rel_err"] and r["bytes_ratio"] <= GOALS["bytes_ratio"])


# ------------------------------------------------------------------------------------------
# (a) the teacher on the demo photos, built twice


def _array_bytes(c: Any, name: str) -> dict[str, int]:
    stored = c.stored_bytes()
    return {k: v for k, v in stored.items() if k in (f"features/{name}", f"{SCALES_GROUP}/{name}")}


def bench_teacher(bc: BenchInt8Config, out: Path) -> dict[str, Any]:
    photos = len(load_sources())  # the sample photos available offline
    if photos:
        images = out / "int8-photos"
        make_demo_imagefolder(images, per_class=-(-bc.images // photos), seed=0)
    else:  # no scikit-image: the cache bench's synthetic JPEGs
        images = synthetic_folder(out / "int8-jpegs", bc.images)
    caches, walls = {}, {}
    for dtype in ("fp16", "int8"):
        cfg = BuildConfig(source=str(images), out=str(out / f"int8-teacher-{dtype}.zarr"), resolution=bc.resolution,
                          vae="tiny", teacher=bc.teacher, precision=bc.precision, batch_size=bc.build_batch,
                          workers=bc.build_workers, device=bc.device, limit=bc.images,
                          shard_rows=16 * -(-max(64, bc.build_batch) // 16), chunk_rows=16, feature_dtype=dtype,
                          overwrite=True)
        t = time.perf_counter()
        build(cfg)
        walls[dtype] = time.perf_counter() - t
        caches[dtype] = open_cache(cfg.out)
    name = teacher_name(bc.teacher)
    c16, c8 = caches["fp16"], caches["int8"]
    rows = c16.rows
    ref = torch.from_numpy(c16.features[name][:][rows]).flatten(0, 1)  # (rows x variants, T, D) float16
    q = torch.from_numpy(c8.features[name][:][rows]).flatten(0, 1)
    scales = torch.from_numpy(c8.feature_scales[name][:][rows]).flatten(0, 1)
    tokens = ref.float()
    channels = c8.channel_scales(name)
    channels = None if channels is None else torch.from_numpy(channels)
    requantised, _ = quantize_tokens(tokens, channels)
    res = measure_set(ref, tokens, tokens[:bc.calibration_images], bc, stored=dequantize_tokens(q, scales, channels),
                      exact=False)
    b16, b8 = _array_bytes(c16, name), _array_bytes(c8, name)
    res.update({
        "teacher": bc.teacher, "resolution": bc.resolution, "precision": bc.precision, "build_wall_s": walls,
        "images_from": "demo photos (tools.demo_images)" if photos else "synthetic JPEGs (tools.bench.cache)",
        # the int8 build quantised the encoder's float32 output; quantising its float16 tokens again lands
        # within one step of it: both builds encoded the same tokens
        "built_int8_vs_requantised_fp16_max_steps": int((q.int() - requantised.int()).abs().max()),
        "bytes_on_disk": {"fp16": b16, "int8": b8, "ratio": sum(b8.values()) / sum(b16.values()),
                          "whole_cache_fp16": sum(c16.stored_bytes().values()),
                          "whole_cache_int8": sum(c8.stored_bytes().values()),
                          "layout_nbytes_fp16": c16.storage.nbytes(c16.layout), "layout_nbytes_int8": c8.storage.nbytes(c8.layout)},
    })
    return res


# ------------------------------------------------------------------------------------------
# (b) synthetic sets


def bench_synthetic(bc: BenchInt8Config) -> list[dict[str, Any]]:
    results = []
    for scale in bc.outlier_scales:
        teacher = bc.synthetic_teacher(scale)
        tokens = torch.from_numpy(teacher.sample(bc.synthetic_images, seed=1))
        calibration = torch.from_numpy(teacher.sample(bc.calibration_images, seed=2))
        ref = tokens.half()
        res = measure_set(ref, tokens, calibration, bc)
        results.append({"teacher": asdict(teacher), **res})
        print(f"synthetic outlier scale {scale:g}: cache rule cos mean {res['rules']['cache']['cos_mean']:.6f} "
              f"min {res['rules']['cache']['cos_min']:.6f}", flush=True)
    return results


# ------------------------------------------------------------------------------------------
# Loader: float16 against int8 in the same run


def loader_epoch(c: Any, bc: BenchInt8Config, epoch: int, *, dequantize: bool) -> tuple[float, int, int]:
    """Seconds, samples and batch bytes of one shuffled epoch."""
    t = time.perf_counter()
    n = nbytes = 0
    for batch in c.loader(bc.loader_batch, seed=0, epoch=epoch, num_workers=bc.loader_workers, prefetch=4,
                          dequantize=dequantize):
        n += len(batch["index"])
        nbytes += batch["latents"].nbytes + sum(f.nbytes for f in batch["features"].values())
        nbytes += sum(s.nbytes for s in batch["feature_scales"].values())
    return time.perf_counter() - t, n, nbytes


def bench_loader(bc: BenchInt8Config, out: Path) -> dict[str, Any]:
    caches = {}
    for dtype in ("fp16", "int8"):
        path = out / f"int8-loader-{dtype}.zarr"
        synthetic_cache(path, bc.rows, bc.tokens, bc.dim, feature_dtype=stored_dtype(dtype))
        caches[dtype] = open_cache(path)
    variants = {"fp16": (caches["fp16"], False), "int8": (caches["int8"], False),
                "int8 dequantize": (caches["int8"], True)}
    for c in caches.values():  # the page cache holds both
        files = [Path(p) for paths in shard_paths(c).values() for p in paths]
        raw_sequential(files, 1 << 24)
    for c, deq in variants.values():  # warm-up: buffers, threads
        loader_epoch(c, bc, 99, dequantize=deq)
    times: dict[str, list[float]] = {k: [] for k in variants}
    moved = {}
    for r in range(bc.rounds):
        for name, (c, deq) in variants.items():
            s, n, nbytes = loader_epoch(c, bc, r, dequantize=deq)
            times[name].append(s)
            moved[name] = (n, nbytes)
    res: dict[str, Any] = {"rows": bc.rows, "tokens": bc.tokens, "dim": bc.dim, "batch": bc.loader_batch,
                           "workers": bc.loader_workers, "rounds": bc.rounds, "variants": {}}
    for name in variants:
        med = statistics.median(times[name])
        n, nbytes = moved[name]
        res["variants"][name] = {"samples_s": n / med, "best_samples_s": n / min(times[name]),
                                 "batch_MBps": nbytes / med / 1e6, "epoch_s": times[name]}
    base = res["variants"]["fp16"]["samples_s"]
    for v in res["variants"].values():
        v["vs_fp16"] = v["samples_s"] / base
    b16 = caches["fp16"].stored_bytes()
    b8 = caches["int8"].stored_bytes()
    feats16 = b16["features/dinov2_b"]
    feats8 = b8["features/dinov2_b"] + b8[f"{SCALES_GROUP}/dinov2_b"]
    res["bytes_on_disk"] = {"fp16": b16, "int8": b8, "features_ratio": feats8 / feats16,
                            "whole_cache_ratio": sum(b8.values()) / sum(b16.values())}
    for c in caches.values():
        shutil.rmtree(c.url, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------------
# Storage of an ImageNet-1k cache, from the layout

STORAGE_TEACHERS = {"DINOv2-B": ("vit_base_patch14_dinov2.lvd142m", 768),
                    "DINOv2-L": ("vit_large_patch14_dinov2.lvd142m", 1024)}


def storage_table(rows: int = IMAGENET_TRAIN_IMAGES, resolutions: tuple[int, ...] = (256, 512)) -> list[dict[str, Any]]:
    """Bytes of each part of a cache of ``rows`` images (:meth:`cache.ZarrStorage.nbytes`: the build's layout, shard
    indexes included, zarr's small metadata documents aside), per resolution, variants (1, or 2 with the
    mirrored image) and token dtype. Shards as the build presets write them (256 rows at 256 px, 64 at
    512 px), chunks of 16 rows."""
    out = []
    for res in resolutions:
        tokens = teacher_grid(res) ** 2
        for variants in (1, 2):
            for dtype in ("fp16", "int8"):
                teachers = {timm: (tokens, dim) for timm, dim in STORAGE_TEACHERS.values()}
                layout = zarr_layout(num_rows=rows, resolution=res, variants=variants, teachers=teachers,
                                     shard_rows=256 if res <= 256 else 64, chunk_rows=16,
                                     feature_dtypes={k: stored_dtype(dtype) for k in teachers})
                nb = ZarrStorage.of(layout).nbytes(layout)
                parts = {"SD-VAE moments": nb["latents"], "labels": nb["labels"]}
                for label, (timm, _) in STORAGE_TEACHERS.items():
                    parts[label] = nb[f"features/{timm}"] + nb.get(f"{SCALES_GROUP}/{timm}", 0)
                out.append({"resolution": res, "images": rows, "variants": variants, "dtype": dtype,
                            "tokens": tokens, "bytes": parts,
                            "latents_labels_dinov2_b": parts["SD-VAE moments"] + parts["labels"] + parts["DINOv2-B"]})
    return out


def storage_markdown(table: list[dict[str, Any]]) -> str:
    """The storage table as markdown, GB = 1e9 bytes."""
    lines = []
    for res in sorted({r["resolution"] for r in table}):
        cell = {(r["variants"], r["dtype"]): r for r in table if r["resolution"] == res}
        any_row = next(iter(cell.values()))
        lines += [f"{any_row['images']:,} images at {res} px ({any_row['tokens']} tokens), GB:", "",
                  "| | fp16 | int8 | fp16, mirrored too | int8, mirrored too |", "|---|---|---|---|---|"]
        for part in ("SD-VAE moments", *STORAGE_TEACHERS, "latents_labels_dinov2_b"):
            label = "moments + labels + DINOv2-B" if part == "latents_labels_dinov2_b" else part
            vals = []
            for key in ((1, "fp16"), (1, "int8"), (2, "fp16"), (2, "int8")):
                r = cell[key]
                vals.append(r[part] if part == "latents_labels_dinov2_b" else r["bytes"][part])
            lines.append(f"| {label} | " + " | ".join(f"{v / 1e9:,.1f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------


def _rules_markdown(title: str, res: Mapping[str, Any]) -> list[str]:
    lines = [f"{title} ({res['images']} images x {res['tokens']} tokens x {res['dim']}; absmax / token RMS "
             f"{res['absmax_over_rms']:.1f}):", "",
             "| rule | cos mean | cos min | align rel. err (aligned) | manifold rel. err (aligned / random) | "
             "bytes / fp16 | goals |", "|---|---|---|---|---|---|---|"]
    for name, r in res["rules"].items():
        a, rnd = r["losses"]["aligned"], r["losses"]["random"]
        lines.append(f"| {name} | {r['cos_mean']:.6f} | {r['cos_min']:.6f} | {a['align_rel_err']:.1e} | "
                     f"{a['manifold_rel_err']:.1e} / {rnd['manifold_rel_err']:.1e} | {r['bytes_ratio']:.3f} | "
                     f"{'met' if meets_goals(r) else 'missed'} |")
    return [*lines, ""]


def report_markdown(report: Mapping[str, Any]) -> str:
    m = report["machine"]
    lines = [f"machine: {m['device']}, {m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}; load average "
             f"{report['loadavg_start'][0]:.1f} at the start, {report['loadavg_end'][0]:.1f} at the end", "",
             f"goals: cos mean >= {GOALS['cos_mean']}, min >= {GOALS['cos_min']}; loss rel. err <= "
             f"{GOALS['loss_rel_err']:g}; bytes <= {GOALS['bytes_ratio']} of fp16", ""]
    if "teacher" in report:
        t = report["teacher"]
        lines += _rules_markdown(f"(a) {t['teacher']} on the demo photos at {t['resolution']} px", t)
        d = t["bytes_on_disk"]
        lines += [f"bytes on disk of the built caches: tokens fp16 {sum(d['fp16'].values()):,}, int8 values + scales "
                  f"{sum(d['int8'].values()):,} = {d['ratio']:.4f}; whole cache {d['whole_cache_int8'] / d['whole_cache_fp16']:.3f}", ""]
    for r in report.get("synthetic", []):
        lines += _rules_markdown(f"(b) synthetic, {r['teacher']['outliers']} outlier channels at "
                                 f"{r['teacher']['outlier_scale']:g}x", r)
    if "loader" in report:
        lo = report["loader"]
        lines += [f"loader: {lo['rows']} rows of {lo['tokens']} x {lo['dim']}, batch {lo['batch']}, {lo['workers']} "
                  f"threads, median of {lo['rounds']} interleaved epochs", "",
                  "| tokens | samples/s | batch MB/s | vs fp16 |", "|---|---|---|---|"]
        for name, v in lo["variants"].items():
            lines.append(f"| {name} | {v['samples_s']:,.0f} | {v['batch_MBps']:,.0f} | {v['vs_fp16']:.2f} |")
        b = lo["bytes_on_disk"]
        lines += ["", f"bytes on disk: token arrays int8 / fp16 {b['features_ratio']:.4f}, whole cache "
                  f"{b['whole_cache_ratio']:.3f}", ""]
    lines.append(storage_markdown(report["storage"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchInt8Config, argv, presets=PRESETS, default_preset="cpu")
    if dry:
        return 0
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(bc.device)
    # the load average before and after: other work on the machine slows the timed parts (the loader)
    report: dict[str, Any] = {"config": config_to_dict(bc), "machine": machine_info(device), "goals": GOALS,
                              "loadavg_start": os.getloadavg()}
    if not bc.skip_teacher:
        report["teacher"] = bench_teacher(bc, out)
    if not bc.skip_synthetic:
        report["synthetic"] = bench_synthetic(bc)
    if not bc.skip_loader:
        report["loader"] = bench_loader(bc, out)
    report["storage"] = storage_table()
    report["loadavg_end"] = os.getloadavg()
    (out / "bench_int8.json").write_text(json.dumps(report, indent=2))
    print()
    print(report_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
