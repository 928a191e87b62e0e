"""Encode an ImageNet-style folder into a feature cache: SD-VAE moments + DINOv2 patch tokens.

    python -m pipeline.build SOURCE OUT [--preset imagenet256|imagenet512|demo] [--resolution 256]
        [--vae stabilityai/sd-vae-ft-ema] [--teacher vit_base_patch14_dinov2.lvd142m[,...]]
        [--pos-embed repa|dinov2] [--feature-dtype fp16|int8] [--flip none|both] [--precision tf32|fp32|bf16]
        [--teacher-precision same|fp16|bf16|tf32|fp32] [--compile] [--batch-size 128]
        [--workers 8] [--limit N] [--classes K] [--overwrite] [--repair] [--dry-run]

    # several GPUs or nodes: every rank writes its own shards, the result equals a 1-process build
    accelerate launch --num_processes 8 -m pipeline.build SOURCE OUT
    torchrun --nproc_per_node 8 -m pipeline.build SOURCE OUT

Interrupted builds resume when the same command runs again; a changed source, encoder or setting
is refused unless ``--overwrite``. On a finished cache, ``--teacher`` naming its teachers and new ones
encodes the new teachers alone and adds them (``python -m cache.edit OUT --drop-teacher NAME`` removes
one). A resumed build trusts its stored source list only if it hashes
to the fingerprint in the manifest and every path stays inside SOURCE. Files that cannot be read
(dangling symlinks, link loops, no permission, links out of SOURCE, folders named like images)
are skipped and recorded with their reason, like any undecodable image.
``--repair`` first checks every finished shard against the checksums recorded when it was
written and encodes the damaged ones again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache import CacheError, CacheWriter, Layout, zarr_layout
from cache.cli.advice import explain, explain_os_error
from cache.cli.config import ConfigError, StoreSettings, check_fields, config_to_dict, parse_config
from cache.cli.runtime import (
    SetupError,
    apply_precision,
    autocast_dtype,
    configure_device,
    join_world,
    setup_logging,
)
from cache.files import local_root
from cache.layout import stored_dtype
from cache.manifest import SCHEMA_VERSION, Manifest, SourceInfo
from cache.quant import (
    CALIBRATION_ROWS,
    COSINE_GOAL,
    channel_scales,
    quantize_tokens,
    token_cosine,
)

from .decode import DecodedImages
from .encoders import (
    DEFAULT_TEACHER,
    DEFAULT_VAE,
    POS_EMBED_MODES,
    WeightsUnavailable,
    load_teacher,
    load_vae,
    teacher_name,
)
from .sources import SourceListing, list_image_folder, unsafe_source_path

_logger = logging.getLogger("pipeline.build")


@dataclass(frozen=True)
class BuildConfig(StoreSettings):
    """Encode an ImageNet-style folder into a feature cache (zarr v3)."""

    source: str = field(default="", metadata={"help": "ImageNet-style folder SOURCE/<class_name>/<image>"})
    out: str = field(default="", metadata={
        "help": "cache location: a folder, or an object store URL (s3://bucket/prefix.zarr, gs://, az://; "
                "docs/remote.md) or any other store URL zarr accepts"})
    resolution: int = field(default=256, metadata={
        "min": 8, "max": 4096, "help": "ADM center crop size (256 or 512; any multiple of 8)"})
    vae: str = field(default=DEFAULT_VAE, metadata={
        "help": "AutoencoderKL: HF hub id or local folder; 'tiny' or 'random:<id>' for random weights"})
    teacher: str = field(default=DEFAULT_TEACHER, metadata={
        "help": "comma-separated timm ViT names (docs/teachers.md); 'tiny', 'tiny:<name>' or 'random:<name>' "
                "for random weights. On a finished cache, its teachers plus new ones encodes the new ones alone "
                "(docs/cache.md, adding and dropping teachers)"})
    teacher_weights: str = field(default="", metadata={
        "help": "comma-separated local weight files, one per teacher (empty: timm/HF hub)"})
    pos_embed: str = field(default="repa", metadata={
        "help": "teacher position table at the token grid: repa (resampled once as REPA's utils.py, timm "
                "resample_abs_pos_embed with antialias) or dinov2 (DINOv2's run-time bicubic, scale (grid+0.1)/M)",
        "choices": POS_EMBED_MODES})
    flip: Literal["none", "both"] = field(default="none", metadata={
        "help": "'both' also encodes the mirrored image (variant 1)"})
    precision: Literal["fp32", "tf32", "bf16"] = field(default="tf32", metadata={
        "help": "encoder precision: fp32 (strict), tf32 (TF32 matmuls and convolutions on GPU) or bf16 "
                "(autocast; TF32 outside it)"})
    teacher_precision: Literal["same", "fp32", "tf32", "bf16", "fp16"] = field(default="same", metadata={
        "help": "teacher precision: same (as --precision), or fp16 (float16 autocast, as REPA runs DINOv2 inside its "
                "fp16 training), bf16, tf32 or fp32; the VAE keeps --precision. Recorded per teacher in the "
                "manifest (teachers.<name>.encode.precision)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the encoders"})
    batch_size: int = field(default=128, metadata={
        "min": 1, "max": 1 << 16, "help": "images per encoder batch (batches never straddle a shard)"})
    workers: int = field(default=8, metadata={"min": 0, "max": 256, "help": "decoding processes"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    limit: int = field(default=0, metadata={
        "min": 0, "max": 1_000_000_000, "help": "keep only the first N images (0: all)"})
    classes: int = field(default=0, metadata={
        "min": 0, "max": 1_000_000, "help": "keep only the first K classes (0: all)"})
    shard_rows: int = field(default=256, metadata={
        "min": 1, "max": 1 << 20,
        "help": "rows per shard (one object per array; the unit of work and of resume)"})
    chunk_rows: int = field(default=16, metadata={
        "min": 1, "max": 1 << 20, "help": "rows per inner chunk of a shard"})
    feature_dtype: Literal["fp16", "int8"] = field(default="fp16", metadata={
        "help": "teacher tokens as float16, or int8 with one float32 scale per token after equalising outlier "
                "channels (about half the bytes; docs/cache.md); for the teachers this run encodes"})
    compressor: Literal["none", "zstd"] = field(default="none", metadata={
        "help": "none (rows readable by byte range) or zstd"})
    max_pixels: int = field(default=1 << 28, metadata={
        "min": 1, "max": 1 << 40,
        "help": "skip images with more pixels than this (0 would skip every image)"})
    seed: int = field(default=0, metadata={
        "min": 0, "max": 2**32 - 1, "help": "seed of random-weight encoders"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing cache built with other settings"})
    repair: bool = field(default=False, metadata={
        "help": "check every finished shard against its recorded checksums and encode the damaged ones again"})

    def __post_init__(self) -> None:
        if not self.source or not self.out:
            raise ConfigError("SOURCE and OUT are required")
        check_fields(self)
        self.check_store(self.out)
        if self.resolution % 8 or self.resolution < 16:
            raise ConfigError(f"--resolution must be a multiple of 8 and >= 16, got {self.resolution}")
        if self.shard_rows % self.chunk_rows:
            raise ConfigError(f"--shard-rows ({self.shard_rows}) must be a multiple of --chunk-rows ({self.chunk_rows})")
        teachers = self.teacher_specs
        if not teachers or len(set(map(teacher_name, teachers))) != len(teachers):
            raise ConfigError(f"--teacher needs one or more distinct names, got {self.teacher!r}")
        if self.teacher_weights and len(self.teacher_weights.split(",")) != len(teachers):
            raise ConfigError("--teacher-weights needs one file per teacher (comma-separated, same order)")

    @property
    def resolved_teacher_precision(self) -> str:
        """The teachers' precision: ``--teacher-precision``, or ``--precision`` for "same"."""
        return self.precision if self.teacher_precision == "same" else self.teacher_precision

    @property
    def teacher_specs(self) -> list[str]:
        return [t.strip() for t in self.teacher.split(",") if t.strip()]


PRESETS: dict[str, dict[str, Any]] = {
    "imagenet256": dict(resolution=256),
    "imagenet512": dict(resolution=512, batch_size=32, shard_rows=64),
    "demo": dict(vae="tiny", teacher="tiny", batch_size=16, workers=2, shard_rows=64, device="cpu"),
}


# ------------------------------------------------------------------------------------------
# Decoding in worker processes


def _collate(items: list[tuple[int, np.ndarray | None, str, str]]) -> dict[str, Any]:
    rows = np.array([r for r, _, _, _ in items], dtype=np.int64)
    valid = np.array([a is not None for _, a, _, _ in items], dtype=bool)
    arrays = [a for _, a, _, _ in items if a is not None]
    images = torch.from_numpy(np.stack(arrays)) if arrays else None
    return {"rows": rows, "valid": valid, "images": images, "reasons": [r for _, _, r, _ in items],
            "digests": [d for _, _, _, d in items]}


# ------------------------------------------------------------------------------------------
# Encoding


@contextlib.contextmanager
def teacher_precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Run the teachers in ``precision`` (a :data:`cache.cli.runtime.PRECISIONS` name) whatever the build's: its
    autocast, and its TF32 switches for what runs outside autocast, restored on exit."""
    dtype = autocast_dtype(precision)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    try:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Encoders(torch.nn.Module):
    """uint8 (B, R, R, 3) -> latents (B, F, 8, R/8, R/8) float16 and {teacher: tokens (B, F, T, D)}: float16,
    or for the teachers in ``quantized`` (name -> its channel scales (D,), or None) int8 values (B, F, T, D)
    and float32 scales (B, F, T), quantised from the encoder's float32 output on the device."""

    def __init__(self, vae: torch.nn.Module, teachers: Mapping[str, torch.nn.Module], *, flip: bool,
                 autocast: torch.dtype | None, quantized: Mapping[str, np.ndarray | None] | None = None,
                 teacher_precision: str | None = None):
        super().__init__()
        self.vae = vae
        self.names = list(teachers)  # timm names contain dots, which module names may not
        self.teachers = torch.nn.ModuleList(teachers.values())
        self.flip = flip
        self.autocast = autocast  # the dtype of apply_precision, None: no autocast
        # the teachers' own precision (--teacher-precision), None: the same as the VAE's
        self.teacher_precision = teacher_precision
        self.quantized = dict(quantized or {})
        self._channels: dict[str, torch.Tensor | None] = {}  # on the device of the tokens, made on first use
        #: Per int8 teacher, on the device: [sum of per-token cosines to the float tokens, tokens, minimum].
        self.int8_check: dict[str, torch.Tensor] = {}

    def compile(self) -> None:
        """torch.compile each encoder (one graph per encoder and batch shape)."""
        self.vae = None if self.vae is None else torch.compile(self.vae)
        self.teachers = torch.nn.ModuleList(torch.compile(t) for t in self.teachers)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, Any]]:
        n = images.shape[0]
        x = torch.cat([images, images.flip(2)]) if self.flip else images
        with torch.autocast(images.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            lat = self.vae(x) if self.vae is not None else None
            if self.teacher_precision is None:
                feats = {name: t(x) for name, t in zip(self.names, self.teachers)}
        if self.teacher_precision is not None:
            with teacher_precision_context(self.teacher_precision, images.device):
                feats = {name: t(x) for name, t in zip(self.names, self.teachers)}

        def split(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:  # (F*n, ...) -> (n, F, ...)
            return t.reshape(-1, n, *t.shape[1:]).transpose(0, 1).to(dtype)

        out: dict[str, Any] = {}
        for k, v in feats.items():
            if k in self.quantized:
                if k not in self._channels:
                    c = self.quantized[k]
                    self._channels[k] = None if c is None else torch.from_numpy(np.asarray(c, np.float32)).to(v.device)
                q, scale = quantize_tokens(v.float(), self._channels[k])
                cos = token_cosine(v, q, scale, self._channels[k])
                acc = self.int8_check.setdefault(k, torch.tensor([0.0, 0.0, 1.0], device=v.device, dtype=torch.float64))
                acc[0] += cos.double().sum()
                acc[1] += cos.numel()
                acc[2] = torch.minimum(acc[2], cos.min().double())
                out[k] = (split(q, torch.int8), split(scale, torch.float32))
            else:
                out[k] = split(v.float())
        return (None if lat is None else split(lat.float())), out


def load_encoders(cfg: BuildConfig) -> tuple[dict[str, Any], torch.nn.Module, dict[str, torch.nn.Module], dict[str, Any]]:
    vae = load_vae(cfg.vae, seed=cfg.seed)
    weights = cfg.teacher_weights.split(",") if cfg.teacher_weights else [None] * len(cfg.teacher_specs)
    teachers, infos = {}, {}
    for spec, w in zip(cfg.teacher_specs, weights):
        t = load_teacher(spec, resolution=cfg.resolution, weights=w, seed=cfg.seed, pos_embed=cfg.pos_embed)
        teachers[teacher_name(spec)] = t.module
        infos[teacher_name(spec)] = t.info
    return vae.info, vae.module, teachers, infos


def make_layout(cfg: BuildConfig, num_rows: int, teacher_infos: Mapping[str, Mapping[str, Any]]) -> Layout:
    return zarr_layout(num_rows=num_rows, resolution=cfg.resolution, variants=2 if cfg.flip == "both" else 1,
                       teachers={k: (v["tokens"], v["dim"]) for k, v in teacher_infos.items()},
                       shard_rows=cfg.shard_rows, chunk_rows=cfg.chunk_rows, compressor=cfg.compressor,
                       feature_dtypes={k: v["dtype"] for k, v in teacher_infos.items()})


def teacher_records(cfg: BuildConfig, teacher_infos: Mapping[str, Mapping[str, Any]],
                    calibration: Mapping[str, list[float]] | None = None) -> dict[str, dict[str, Any]]:
    """Each teacher's manifest record: what its loader reports, plus the stored dtype of its tokens, the
    settings of the run that encoded it (a teacher added to a cache later records its own) and, for int8
    tokens, the channel scales measured by :func:`calibrate`."""
    return {k: {**v, "dtype": stored_dtype(cfg.feature_dtype),
                "encode": {"precision": cfg.resolved_teacher_precision, "batch_size": cfg.batch_size,
                           "compile": cfg.compile},
                **({"channel_scales": (calibration or {})[k]} if k in (calibration or {}) else {})}
            for k, v in teacher_infos.items()}


@torch.no_grad()
def calibrate(cfg: BuildConfig, listing: Any, teachers: Mapping[str, torch.nn.Module], device: torch.device
              ) -> dict[str, list[float]]:
    """For int8 tokens: each teacher's channel scales (:func:`cache.quant.channel_scales`) from its tokens of
    the first :data:`cache.quant.CALIBRATION_ROWS` images that decode, encoded as the build encodes them.
    A rerun or an addition keeps the scales the cache holds (the store sees to that)."""
    if cfg.feature_dtype != "int8":
        return {}
    data = DecodedImages([f["path"] for f in listing.files], cfg.resolution, max_pixels=cfg.max_pixels,
                         root=listing.root)
    images = []
    for i in range(len(data)):
        image = data[i][1]
        if image is not None:
            images.append(image)
        if len(images) == CALIBRATION_ROWS:
            break
    if not images:
        return {}
    x = torch.from_numpy(np.stack(images)).to(device)
    out = {}
    for name, module in teachers.items():
        module.to(device).eval()
        with teacher_precision_context(cfg.resolved_teacher_precision, device):
            tokens = module(x)
        try:
            out[name] = channel_scales(tokens.float()).tolist()
        except ValueError as e:
            raise CacheError(f"teacher {name!r} gives non-finite tokens on the first images ({e})") from None
    return out


def make_manifest(cfg: BuildConfig, listing: Any, vae_info: dict, teacher_infos: dict,
                  calibration: Mapping[str, list[float]] | None = None) -> Manifest:
    """The manifest of a new cache, before the store adds its creation time, generation and completion."""
    import diffusers
    import PIL
    import timm
    import zarr

    teacher_infos = teacher_records(cfg, teacher_infos, calibration)
    return Manifest.from_dict({
        "schema_version": SCHEMA_VERSION,
        "layout": make_layout(cfg, len(listing.files), teacher_infos).to_dict(),
        "source": {"num_files": len(listing.files), "fingerprint": listing.fingerprint,
                   "classes_limit": cfg.classes, "limit": cfg.limit},
        "source_root": listing.root,
        "classes": listing.classes,
        "preprocessing": {
            "crop": "adm_center_crop (BOX halving while short side >= 2R, BICUBIC to R, center cut)",
            "resolution": cfg.resolution,
            "teacher_pos_embed": cfg.pos_embed,
            "flip": cfg.flip,
            "variants": ["as_is", "mirrored"] if cfg.flip == "both" else ["as_is"],
            "max_pixels": cfg.max_pixels,
        },
        "vae": vae_info,
        "teachers": teacher_infos,
        "encode": {"precision": cfg.precision, "batch_size": cfg.batch_size, "compile": cfg.compile},
        "software": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                     "diffusers": diffusers.__version__, "zarr": zarr.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__},
    })


class _ShardBuffers:
    """One shard being filled: encoder outputs land in place (pinned on CUDA, so the device copies
    straight into it), then the whole shard goes to the writer thread."""

    def __init__(self, writer: CacheWriter, shard: int, pin: bool, teachers: list[str], latents: bool = True) -> None:
        layout = writer.layout
        self.shard = shard
        self.lo, hi = writer.shard_range(shard)
        self.n, self.filled, self.skipped = hi - self.lo, 0, []
        self.latents = (torch.empty((self.n, *layout.row_shapes()["latents"][0]), dtype=torch.float16, pin_memory=pin)
                        if latents else None)
        self.features = {k: torch.empty((self.n, layout.variants, *layout.teachers[k]),
                                        dtype=getattr(torch, layout.feature_dtype(k)), pin_memory=pin) for k in teachers}
        self.scales = {k: torch.empty((self.n, layout.variants, layout.teachers[k][0]), dtype=torch.float32,
                                      pin_memory=pin) for k in teachers if layout.quantized(k)}
        self.labels = np.full(self.n, -1, np.int32)
        self.digests = [""] * self.n  # checksum of each source file's bytes ("" for a file that did not decode)
        self.event: torch.cuda.Event | None = None


class _ShardWriter:
    """Writes finished shards on its own thread, so that encoding never waits for storage."""

    def __init__(self, writer: CacheWriter, depth: int = 3) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def put(self, buf: _ShardBuffers | None) -> None:
        while True:
            if self.error is not None:
                raise RuntimeError("the shard writer failed") from self.error
            try:
                self.queue.put(buf, timeout=1.0)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise RuntimeError("the shard writer failed") from self.error

    def _run(self) -> None:
        try:
            while (buf := self.queue.get()) is not None:
                if buf.event is not None:
                    buf.event.synchronize()
                features = {k: v.numpy() for k, v in buf.features.items()}
                scales = {k: v.numpy() for k, v in buf.scales.items()}
                if buf.latents is None:  # adding teachers: their tokens alone
                    self.writer.write_shard(buf.shard, features=features, scales=scales)
                else:
                    self.writer.write_shard(buf.shard, latents=buf.latents.numpy(), features=features, scales=scales,
                                            labels=buf.labels, skipped=buf.skipped, source_digests=buf.digests)
        except BaseException as e:
            self.error = e
            while self.queue.get() is not None:  # drain so that the producer never blocks
                pass


def _batches(writer: CacheWriter, shards: list[int], batch_size: int) -> list[list[int]]:
    """Row batches, each inside one shard, so that a shard's content never depends on others."""
    out = []
    for s in shards:
        lo, hi = writer.shard_range(s)
        out += [list(range(a, min(a + batch_size, hi))) for a in range(lo, hi, batch_size)]
    return out


# ------------------------------------------------------------------------------------------
# Orchestration


def _setup_logging(rank: int, out: str) -> None:
    folder = local_root(out)
    log_file = None
    if folder is not None:
        folder = os.path.abspath(folder)
        log_file = os.path.join(os.path.dirname(folder), os.path.basename(folder) + ".build.log")
        if rank == 0 and not _writable(log_file):
            log_file = None  # a read-only place: a finished cache is still reported; a write fails with one line
    setup_logging(rank, log_file)


def _writable(path: str) -> bool:
    try:
        with open(path, "a"):
            return True
    except OSError:
        return False


def _broadcast(obj: Any, state: Any) -> Any:
    if state.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def build(cfg: BuildConfig) -> Manifest:
    """Run (or resume) a build; returns the final manifest. Every rank calls this."""
    state = join_world(cfg.device)  # the launcher's processes as one group, or SetupError
    rank, world = state.process_index, state.num_processes
    device = state.device if cfg.device in ("auto", "cuda") else torch.device(cfg.device)
    device = configure_device(device)
    autocast = apply_precision(cfg.precision, device)
    _setup_logging(rank, cfg.out)
    t0 = time.time()

    result: tuple[str, str] = ("ok", "")
    if rank == 0:  # SOURCE first: a folder without classes or images is refused before the encoders load
        try:
            listing = list_image_folder(cfg.source, classes=cfg.classes, limit=cfg.limit, exclude=local_root(cfg.out))
        except (FileNotFoundError, ValueError) as e:
            result = ("error", str(e))
    result = _broadcast(result, state)
    if result[0] == "error":
        raise CacheError(result[1])
    vae_info, vae, teachers, teacher_infos = load_encoders(cfg)
    if rank == 0:
        try:
            calibration = calibrate(cfg, listing, teachers, device)
            manifest = make_manifest(cfg, listing, vae_info, teacher_infos, calibration)
            layout = manifest.layout
            writer, resumed = CacheWriter.create_or_resume(cfg.out, layout=layout, manifest=manifest,
                                                           sources=listing.files, overwrite=cfg.overwrite,
                                                           storage_options=cfg.storage_options())
            if cfg.repair and resumed:
                damage = writer.forget_damaged()
                for d in damage:
                    _logger.warning("damaged: %s", d)
                _logger.info("repair: %d damaged shard(s) to encode again", len({d.shard for d in damage}))
            if not (writer.manifest.is_complete and not writer.adding):  # a finished cache is only read
                writer.put_text("config.json", json.dumps(config_to_dict(cfg), indent=2))
            _logger.info("%s cache %s: %d rows, %d classes, %d shards", "resuming" if resumed else "created",
                         cfg.out, layout.num_rows, len(listing.classes), writer.num_shards)
            result = ("ok", listing.root)
        except (CacheError, FileNotFoundError, ValueError) as e:
            result = ("error", explain(e, source=cfg.source))
        except OSError as e:  # a full or read-only disk, a permission: one line, naming the path
            result = ("error", explain_os_error(e, what=f"the cache {cfg.out}"))
    result = _broadcast(result, state)
    if result[0] == "error":
        raise CacheError(result[1])
    if rank != 0:
        writer = CacheWriter.open(cfg.out, storage_options=cfg.storage_options())
    if writer.manifest.is_complete and not writer.adding:
        _logger.info("cache %s is already complete; nothing to do", cfg.out)
        return refuse_empty(writer.manifest, cfg.out)

    layout = writer.layout
    adding = writer.adding  # teachers added to a finished cache: the VAE is not run, the rows stay as they are
    names = writer.teachers_to_encode
    sources = writer.sources()
    check_sources(sources, writer.manifest.source, cfg.out)
    base_labels = writer.labels() if adding else None
    recorded_digests = functools.lru_cache(maxsize=4)(writer.source_digests)
    if adding and writer.source_digests(0) is None:
        _logger.warning("%s was built before source checksums were recorded: the files are compared by name and "
                        "size only; an image altered in place would go unnoticed", cfg.out)
    todo = sorted(set(range(writer.num_shards)) - writer.completed_shards())
    state.wait_for_everyone()  # every rank has read the same progress before anyone writes
    mine = todo[rank::world]
    rows_todo = sum(hi - lo for lo, hi in map(writer.shard_range, todo))
    my_rows = sum(hi - lo for lo, hi in map(writer.shard_range, mine))
    _logger.info("%d of %d shards to encode (%d rows%s) on %d process(es), device %s", len(todo),
                 writer.num_shards, rows_todo, f", teacher(s) {', '.join(adding)} only" if adding else "", world, device)

    encoders = Encoders(None if adding else vae, {k: teachers[k] for k in names}, flip=cfg.flip == "both",
                        autocast=autocast, quantized={k: writer.channel_scales(k) for k in names if layout.quantized(k)},
                        teacher_precision=None if cfg.teacher_precision == "same" else cfg.teacher_precision
                        ).to(device).eval()
    if cfg.compile:
        encoders.compile()
    root = result[1]  # this run's SOURCE, as rank 0 resolved it (the folder may have moved)
    loader = DataLoader(DecodedImages([s["path"] for s in sources], cfg.resolution, max_pixels=cfg.max_pixels,
                                      root=root),
                        batch_sampler=_batches(writer, mine, cfg.batch_size), num_workers=cfg.workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if cfg.workers else None)
    shard_writer = _ShardWriter(writer)
    from tqdm import tqdm

    bar = tqdm(total=int(my_rows), unit="img", disable=rank != 0, smoothing=0.05, dynamic_ncols=True,
               desc=f"encode (rank 0 of {world})")
    t_enc = time.time()
    buffers: dict[int, _ShardBuffers] = {}
    try:
        for batch in loader:
            rows, valid = batch["rows"], batch["valid"]
            shard = int(rows[0]) // writer.storage.shard_rows
            if shard not in buffers:
                buffers[shard] = _ShardBuffers(writer, shard, pin=device.type == "cuda", teachers=names,
                                               latents=not adding)
            buf = buffers[shard]
            a, b = int(rows[0]) - buf.lo, int(rows[-1]) + 1 - buf.lo  # a batch is a run of rows
            if adding:
                _same_sources(batch, recorded_digests(shard), buf.lo, sources, cfg.out)
                batch, valid = _as_in_cache(batch, base_labels[rows], cfg.out)
            _encode_into(encoders, batch["images"], valid, device, buf, a, b)
            buf.labels[a:b][valid] = [sources[r]["label"] for r in rows[valid]]
            buf.digests[a:b] = batch["digests"]
            buf.skipped += [{"row": int(r), "path": sources[r]["path"], "reason": why}
                            for r, ok, why in zip(rows, valid, batch["reasons"]) if not ok]
            buf.filled += len(rows)
            if buf.filled == buf.n:
                if device.type == "cuda":
                    buf.event = torch.cuda.Event()
                    buf.event.record()
                shard_writer.put(buffers.pop(shard))
            bar.update(len(rows))
    finally:
        bar.close()
    shard_writer.close()
    t_done = time.time()
    state.wait_for_everyone()
    int8_check = _int8_check(encoders, [k for k in names if layout.quantized(k)], device, world)
    manifest = writer.manifest
    if rank == 0:
        seconds = t_done - t_enc
        stats = {"seconds": round(time.time() - t0, 3), "encode_seconds": round(seconds, 3),
                 "rows_this_run": int(rows_todo), "img_per_s": round(float(rows_todo) / max(seconds, 1e-9), 2),
                 "world_size": world, "device": str(device), **({"int8_check": int8_check} if int8_check else {})}
        manifest = writer.finalize(stats)
        total = writer.stored_bytes()
        _logger.info("done: %d rows (%d skipped) in %d shards, %.3f GiB, %.1f s, %.1f img/s over %d process(es)",
                     layout.num_rows, len(manifest.skipped_files), writer.num_shards, total / 2**30,
                     stats["seconds"], stats["img_per_s"], world)
        for s in manifest.skipped_files[:20]:
            _logger.info("skipped row %d %s: %s", s.row, s.path, s.reason)
    state.wait_for_everyone()
    return refuse_empty(manifest, cfg.out) if rank == 0 else manifest


def refuse_empty(manifest: Manifest, out: str) -> Manifest:
    """``manifest``, or CacheError if every one of its rows was skipped: such a cache holds no data (zeros and
    label -1 throughout), and a build that made it has failed, whatever was written."""
    skipped = manifest.skipped_files
    if manifest.layout is not None and skipped and len(skipped) >= manifest.layout.num_rows:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:2])
        raise CacheError(f"every one of the {len(skipped)} images of SOURCE was skipped (e.g. {reasons}), so {out} "
                         "holds no data: fix the images (or point SOURCE at the right folder) and rerun with "
                         "--overwrite")
    return manifest


def _int8_check(encoders: Encoders, names: list[str], device: torch.device, world: int) -> dict[str, dict[str, Any]]:
    """Per int8 teacher, over every token this run encoded on all ranks: the mean and minimum cosine between
    its int8 form and the encoder's float32 output. Logged; a warning below :data:`cache.quant.COSINE_GOAL`."""
    out = {}
    for k in names:
        acc = encoders.int8_check.get(k, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).to(device)
        if world > 1:
            total, least = acc[:2].clone(), acc[2:].clone()
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
            acc = torch.cat([total, least])
        total, count, least = acc.tolist()
        if not count:
            continue
        out[k] = {"tokens": int(count), "cos_mean": total / count, "cos_min": least}
        goal_mean, goal_min = COSINE_GOAL
        ok = out[k]["cos_mean"] >= goal_mean and least >= goal_min
        (_logger.info if ok else _logger.warning)(
            "int8 teacher %s: per-token cosine to the float tokens mean %.6f, min %.6f over %d tokens%s", k,
            out[k]["cos_mean"], least, int(count),
            "" if ok else f" (below the goal mean {goal_mean}, min {goal_min}: even with the channel scales, "
                          "one scale per token represents these tokens poorly; consider --feature-dtype fp16, docs/cache.md)")
    return out


def check_sources(sources: list[dict[str, Any]], source: SourceInfo | None, out: str) -> None:
    """Refuse a stored source list that does not hash to the manifest's fingerprint or names a path that
    could leave SOURCE (absolute, ``..``): a damaged or edited cache must not decide which files are read.
    ``source`` is the manifest's record of the source."""
    try:
        fingerprint = SourceListing(root="", classes=[], files=sources).fingerprint
    except (KeyError, TypeError) as e:
        raise CacheError(f"{out}: the stored source list (build/sources.json) is malformed ({type(e).__name__}: {e}); "
                         "rebuild with --overwrite") from None
    recorded = source.fingerprint if source is not None else None
    num_files = source.num_files if source is not None and source.num_files is not None else len(sources)
    if fingerprint != recorded or len(sources) != num_files:
        raise CacheError(f"{out}: the stored source list (build/sources.json) has fingerprint {fingerprint[:12]}..., "
                         f"not the {str(recorded)[:12]}... its manifest records: it was damaged or edited; rebuild "
                         "with --overwrite")
    for row, entry in enumerate(sources):
        why = unsafe_source_path(entry["path"])
        if why:
            raise CacheError(f"{out}: the stored source list names {entry['path']!r} for row {row}, which {why}; "
                             "a build reads only files inside SOURCE: rebuild with --overwrite")


def _same_sources(batch: dict[str, Any], recorded: list[str] | None, lo: int, sources: list[dict[str, Any]],
                  out: str) -> None:
    """Before a teacher being added encodes a batch: each source file's bytes must be the ones the cache was
    built from (the checksums its shards recorded), or the new tokens would describe other images than the
    latents do. A cache built before checksums were recorded (``recorded`` None) is compared by size alone
    (the source fingerprint), as it was built."""
    if recorded is None:
        return
    changed = [int(r) for r, d in zip(batch["rows"], batch["digests"]) if d and recorded[int(r) - lo]
               and d != recorded[int(r) - lo]]
    if changed:
        shown = ", ".join(f"{r} ({sources[r]['path']})" for r in changed[:5]) + (", ..." if len(changed) > 5 else "")
        raise CacheError(f"{out}: the source files of rows {shown} have other bytes than when the cache was built "
                         "(same name and size, other content): a teacher added now would not describe the images the "
                         "latents hold; restore the files, or rebuild the cache with --overwrite")


def _as_in_cache(batch: dict[str, Any], labels: np.ndarray, out: str) -> tuple[dict[str, Any], np.ndarray]:
    """A decoded batch for a teacher being added, made to match the cache's rows: rows the first build
    skipped (label -1) stay zeros even if they decode now; a row that has data but does not decode now
    means the source changed, which is refused (its tokens would not match its latents)."""
    rows, valid = batch["rows"], batch["valid"]
    lost = valid < (labels >= 0)
    if lost.any():
        i = int(np.flatnonzero(lost)[0])
        raise CacheError(f"{out}: row {int(rows[i])} was encoded by the first build but does not decode now "
                         f"({batch['reasons'][i]}): the source changed since; rebuild with --overwrite")
    keep = labels >= 0
    if (keep == valid).all():
        return batch, valid
    images = batch["images"][torch.from_numpy(keep[valid])] if keep.any() else None
    return {**batch, "images": images, "valid": keep}, keep


def _encode_into(encoders: Encoders, images: torch.Tensor | None, valid: np.ndarray, device: torch.device,
                 buf: _ShardBuffers, a: int, b: int) -> None:
    """Encode a batch and copy it into rows a..b of the shard buffers (zeros for skipped files)."""
    lat_target = [] if buf.latents is None else [buf.latents]
    targets = [*lat_target, *buf.features.values(), *buf.scales.values()]
    if images is None:
        for t in targets:
            t[a:b].zero_()
        return
    lat, feats = encoders(images.to(device, non_blocking=True))
    outputs = [*([lat] if lat_target else []), *(feats[k][0] if k in buf.scales else feats[k] for k in buf.features),
               *(feats[k][1] for k in buf.scales)]
    all_valid = bool(valid.all())
    if not all_valid:
        idx = torch.from_numpy(np.flatnonzero(valid)).to(device)
    for t, out in zip(targets, outputs):
        if not all_valid:
            full = out.new_zeros((b - a, *out.shape[1:]))
            full[idx] = out
            out = full
        t[a:b].copy_(out, non_blocking=True)


def main(argv: list[str] | None = None) -> int:
    cfg, dry = parse_config(BuildConfig, argv, presets=PRESETS, positional=("source", "out"),
                            description=__doc__.splitlines()[0])
    if dry:
        return 0
    try:
        build(cfg)
    except (CacheError, WeightsUnavailable, SetupError) as e:
        print(f"error: {explain(e, source=cfg.source)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {explain_os_error(e, what=f'the cache {cfg.out}')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
