"""Sample a trained run (SDE or ODE, guidance on a time interval) into PNGs and ADM's samples.npz.

    python -m tools.sample --run runs/urepa-xl --out samples/urepa-xl-cfg --preset paper-cfg
    python -m tools.sample --run RUN --num N --out OUT [--sampler sde|ode --solver euler|heun --steps K --cfg S
        --interval LO HI --seed S --quantize truncate|round]
    python -m tools.sample --run demo/run --out demo/samples --preset demo
    python -m tools.sample --run RUN --out OUT --preset paper-cfg --dry-run     # print the resolved config

    # several GPUs: batches are dealt to the ranks; every image is the same whatever their number
    accelerate launch --num_processes 8 -m tools.sample --run RUN --out OUT --preset paper-cfg
    torchrun --nproc_per_node 8 -m -- tools.sample --run RUN ...   # `--`: else torchrun reads --run as its --run-path

Image i is a pure function of (--seed, i, the settings): its label (``--labels``) and its noise
come from generators seeded by (seed, i), never by its batch or rank (``tools.sampling``). Batch k
(images k*B ... (k+1)*B - 1, B = --batch-size per rank) is sampled by rank k % world; each finished
batch is written atomically to OUT/parts/<first>-<last>.npz (uint8 images, labels, indices) after
its PNGs (OUT/images/<index>.png). Resume by running the same command again: images already in a
part are skipped (a changed --batch-size or --num only changes which images are left to do); a
changed setting that changes images (sampler, solver, steps, guidance, labels, seed, weights, checkpoint,
VAE, precision, quantisation) is refused with its name. At the end rank 0 streams the parts into
OUT/samples.npz (``arr_0`` uint8 (N, H, W, 3), ``labels`` (N,), as ADM's evaluator reads it),
writes OUT/grid.png, and prints the .npz path last. OUT/config.json holds the resolved config and
the identity of the model (run, checkpoint step, weights sha256) and of the VAE, and ``upstream``: whether
the cache's VAE, its teacher or the decoding VAE had random weights; OUT/log.txt the log.
OUT/urepa-samples.json, written first, marks the folder as ours: a non-empty OUT without it is
refused and left untouched; OUT/urepa.lock is held while a sampling writes there (a second one into the
same OUT stops at once naming it). A part that a rerun cannot read (cut short by a full disk, say) is
moved aside to ``<name>.bad`` with a warning and its images are sampled again.

Latents: the model samples x = (z - shift) * scale (the run's --latent-scale/--latent-shift), the
VAE recorded in the run's cache manifest (or --vae) decodes z = x / scale + shift, and its output x in
[-1, 1] becomes uint8 as REPA's generate.py does, floor(127.5 (x + 1)) (``--quantize round``: DiT's
rounding).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    broadcast_from_rank0,
    claim_folder,
    make_accelerator,
    setup_logging,
    write_json,
)
from pipeline.encoders import (
    QUANTIZE_MODES,
    LoadedEncoder,
    NonFiniteOutput,
    WeightsUnavailable,
    load_vae_decoder,
    weights_sha256,
)
from trainer.checkpoint import CheckpointError
from trainer.run import (
    LatentTransform,
    RandomWeights,
    RunRecord,
    find_checkpoint,
    load_run_model,
    refuse_changed_rerun,
)

from .sampling import (
    FiniteCheck,
    NonFiniteSample,
    PerSampleNoise,
    Velocity,
    class_labels,
    euler_maruyama,
    model_velocity,
    ode_euler,
    ode_heun,
    with_guidance,
)

_logger = logging.getLogger("tools.sample")

#: ``--steps 0`` means these (REPA's defaults).
DEFAULT_STEPS = {"sde": 250, "ode": 50}
_PART = re.compile(r"^(\d+)-(\d+)\.npz$")


@dataclass(frozen=True)
class SampleConfig(StoreSettings):
    """Sample images from a training run into PNGs and an ADM-style samples.npz."""

    run: str = field(default="", metadata={"help": "training run folder (trainer.train --out)"})
    out: str = field(default="", metadata={"help": "output folder (created; rerun the same command to resume)"})
    num: int = field(default=50_000, metadata={
        "min": 1, "max": 10_000_000, "help": "number of images (indices 0 .. num-1)"})
    batch_size: int = field(default=64, metadata={
        "min": 1, "max": 1 << 16,
        "help": "images per batch per rank (guided steps run 2x this through the model)"})
    sampler: Literal["sde", "ode"] = field(default="sde", metadata={"help": "sde (Euler-Maruyama, REPA) or ode"})
    solver: Literal["euler", "heun"] = field(default="euler", metadata={
        "help": "ode solver: euler (REPA generate.py's default, NFE = steps) or heun (2nd order, NFE 2 steps - 1)"})
    steps: int = field(default=0, metadata={
        "min": 0, "max": 10000,
        "help": "sampling steps = NFE for sde and ode euler (0: 250 for sde, 50 for ode)"})
    t_last: float = field(default=0.04, metadata={
        "min": 0, "max": 1,
        "help": "sde: last time of the stochastic steps before the final drift step to 0"})
    cfg: float = field(default=1.0, metadata={
        "min": 0, "max": 100, "help": "classifier-free guidance scale (1: no guidance)"})
    interval: tuple[float, float] = field(default=(0.0, 0.7), metadata={
        "min": 0, "max": 1, "help": "guidance only for LO <= t <= HI (t = 1 is noise)"})
    labels: str = field(default="uniform", metadata={
        "help": "uniform (random per index), balanced (index mod classes) or class ids 'A,B,...' cycled"})
    weights: Literal["ema", "raw"] = field(default="ema", metadata={"help": "EMA or raw weights of the checkpoint"})
    step: int = field(default=0, metadata={
        "min": 0, "max": 1_000_000_000, "help": "checkpoint step (0: the latest)"})
    vae: str = field(default="", metadata={
        "help": "VAE spec for decoding (default: the one recorded in the run's cache manifest)"})
    seed: int = field(default=0, metadata={
        "min": 0, "max": 2**32 - 1, "help": "labels and noise of image i come from (seed, i)"})
    precision: Literal["fp32", "tf32", "bf16"] = field(default="tf32", metadata={
        "help": "fp32, tf32 (TF32 matmuls on GPU) or bf16 (model under bf16 autocast; VAE in tf32)"})
    quantize: str = field(default="truncate", metadata={
        "help": "decoder output x in [-1, 1] to uint8: truncate (REPA generate.py, floor(127.5 (x + 1))) or "
                "round (DiT, 127.5 (x + 1) rounded half up)", "choices": QUANTIZE_MODES})
    png: bool = field(default=True, metadata={
        "help": "also write OUT/images/<index>.png (for the images this call samples)"})
    grid: int = field(default=64, metadata={
        "min": 0, "max": 1024, "help": "images in OUT/grid.png (0: none)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: accelerate decides"})

    def __post_init__(self) -> None:
        if not self.run or not self.out:
            raise ConfigError("--run and --out are required")
        check_fields(self)
        self.check_store()  # the endpoint; whether the run's cache is in a store is known once the run is read
        if not 0 < self.t_last < 1:
            raise ConfigError(f"--t-last must be in (0, 1), got {self.t_last}")
        lo, hi = self.interval  # each in [0, 1] (its range), and in order
        if not lo <= hi:
            raise ConfigError(f"--interval needs 0 <= LO <= HI <= 1, got {lo} {hi}")
        labels = self.labels.replace(" ", "")
        if labels not in ("uniform", "balanced") and not re.fullmatch(r"\d+(,\d+)*", labels):
            raise ConfigError(f"--labels must be uniform, balanced or class ids like 3,7; got {self.labels!r}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "interval", (float(lo), float(hi)))
        if self.steps == 0:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.sampler])

    @property
    def nfe(self) -> int:
        """Velocity evaluations per image (a guided one counts once): steps, or 2 steps - 1 for Heun."""
        return 2 * self.steps - 1 if self.sampler == "ode" and self.solver == "heun" else self.steps


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's main numbers: SDE, 250 steps, CFG 1.65 on t in [0, 0.7], 50K images, EMA weights.
    "paper-cfg": dict(sampler="sde", steps=250, cfg=1.65, interval=(0.0, 0.7), num=50_000),
    # The same without guidance.
    "paper-nocfg": dict(sampler="sde", steps=250, cfg=1.0, num=50_000),
    # The ablation: ODE, CFG 1.8 on the same interval; Euler with 50 steps (NFE 50), REPA generate.py's
    # defaults (--mode ode --num-steps 50, no --heun). Heun: --solver heun.
    "ode": dict(sampler="ode", solver="euler", steps=50, cfg=1.8, interval=(0.0, 0.7), num=50_000),
    # About 10 CPU seconds on the demo run (random-weight encoders: plumbing only).
    "demo": dict(sampler="sde", steps=25, cfg=1.65, num=16, batch_size=16, grid=16, precision="fp32",
                 device="cpu"),
}


# ------------------------------------------------------------------------------------------
# Parts: which images are done, which are left


def part_name(first: int, last: int) -> str:
    """File name of the part holding images first..last (inclusive)."""
    return f"{first:06d}-{last:06d}.npz"


def check_part(path: str, first: int, last: int) -> str:
    """Why the part at ``path`` (images first..last) cannot be used, or '' if it reads back whole: the zip
    directory, the indices it names and the byte size of its images (not every pixel: cheap on rerun)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if not {"images.npy", "labels.npy", "indices.npy"} <= names:
                return f"holds {sorted(names)}, not images, labels and indices"
            with z.open("indices.npy") as f:
                indices = np.lib.format.read_array(f)
            with z.open("images.npy") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    return f"unsupported .npy version {version}"
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                header = f.tell()
            size = z.getinfo("images.npy").file_size
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if indices.tolist() != list(range(first, last + 1)):
        return f"its indices are not {first}..{last}"
    if len(shape) != 4 or shape[0] != last - first + 1 or size != header + math.prod(shape) * np.dtype(dtype).itemsize:
        return f"its images array is cut short or misshapen ({shape}, {size} bytes)"
    return ""


def set_aside_bad_parts(folder: str) -> list[str]:
    """Rename every part that :func:`check_part` rejects to ``<name>.bad`` (its images are sampled again);
    returns one line per part moved."""
    moved = []
    for first, last, path in list_parts(folder):
        why = check_part(path, first, last)
        if why:
            os.replace(path, path + ".bad")
            moved.append(f"{path}: {why}; moved to {os.path.basename(path)}.bad, its images are sampled again")
    return moved


def list_parts(folder: str) -> list[tuple[int, int, str]]:
    """(first, last, path) of every finished part in ``folder``, by first index."""
    if not os.path.isdir(folder):
        return []
    parts = [(int(m.group(1)), int(m.group(2)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := _PART.match(name))]
    return sorted(parts)


def pending_chunks(done: Iterable[tuple[int, int]], num: int, batch_size: int) -> list[list[int]]:
    """The images of [0, num) not in ``done`` (inclusive index ranges), as runs of consecutive
    indices inside the batches [k B, (k + 1) B): whole batches on a fresh start, the gaps otherwise."""
    have = np.zeros(num, dtype=bool)
    for first, last in done:
        have[first:last + 1] = True
    chunks = []
    for start in range(0, num, batch_size):
        todo = np.flatnonzero(~have[start:start + batch_size]) + start
        for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1):
            if run.size:
                chunks.append(run.tolist())
    return chunks


def write_npz(path: str, arrays: Mapping[str, tuple[Sequence[int], np.dtype, Iterable[np.ndarray]]]) -> None:
    """An uncompressed .npz whose arrays arrive as pieces along axis 0 (``name: (shape, dtype,
    pieces)``), so no array is ever whole in memory; fixed zip timestamps make the bytes a function
    of the data alone. ``np.load`` and ADM's evaluator read it."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (shape, dtype, pieces) in arrays.items():
            dtype = np.dtype(dtype)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": tuple(int(s) for s in shape)}
                np.lib.format.write_array_header_1_0(f, header)
                written = 0
                for piece in pieces:
                    piece = np.ascontiguousarray(piece, dtype=dtype)
                    f.write(piece.data)
                    written += piece.nbytes
            if written != math.prod(header["shape"]) * dtype.itemsize:
                raise ValueError(f"{path}: {name} got {written} bytes for shape {header['shape']} {dtype}")


def write_part(folder: str, indices: Sequence[int], images: np.ndarray, labels: np.ndarray) -> str:
    """Write one finished batch atomically (temporary file, then rename); returns its path."""
    path = os.path.join(folder, part_name(indices[0], indices[-1]))
    tmp = path + ".tmp"
    idx = np.asarray(indices, dtype=np.int64)
    write_npz(tmp, {"images": (images.shape, images.dtype, [images]), "labels": (labels.shape, np.int64, [labels]),
                    "indices": (idx.shape, np.int64, [idx])})
    os.replace(tmp, path)
    return path


def _part_slices(parts: list[tuple[int, int, str]], num: int, key: str) -> Iterator[np.ndarray]:
    """``key`` of images 0..num-1 from the parts, in order; raises if one is missing."""
    expected = 0
    for first, last, path in parts:
        if first >= num:
            break
        if first != expected:
            raise SetupError(f"images {expected}..{first - 1} are missing from {os.path.dirname(path)}")
        try:
            with np.load(path) as data:
                piece = data[key][: num - first]
        except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as e:
            raise SetupError(f"part {path} is unreadable ({type(e).__name__}: {e}): delete it and rerun the same "
                             "command to sample its images again") from None
        yield piece
        expected = last + 1
    if expected < num:
        raise SetupError(f"images {expected}..{num - 1} are missing")


def assemble_npz(out: str, num: int) -> str:
    """OUT/samples.npz from the parts: ``arr_0`` uint8 (num, H, W, 3) and ``labels`` (num,)."""
    parts = list_parts(os.path.join(out, "parts"))
    if not parts:
        raise SetupError(f"no parts in {out}/parts")
    with np.load(parts[0][2]) as first:
        height, width, channels = first["images"].shape[1:]
    path = os.path.join(out, "samples.npz")
    tmp = path + ".tmp"
    write_npz(tmp, {"arr_0": ((num, height, width, channels), np.uint8, _part_slices(parts, num, "images")),
                    "labels": ((num,), np.int64, _part_slices(parts, num, "labels"))})
    os.replace(tmp, path)
    return path


def image_grid(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) -> one (rows H, cols W, 3) image, cols = ceil(sqrt(n)), row-major, black padding."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w, c), dtype=images.dtype)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def write_grid(out: str, count: int) -> str:
    """OUT/grid.png of the first ``count`` images."""
    from PIL import Image

    images = np.concatenate(list(_part_slices(list_parts(os.path.join(out, "parts")), count, "images")))
    path = os.path.join(out, "grid.png")
    Image.fromarray(image_grid(images)).save(path)
    return path


# ------------------------------------------------------------------------------------------
# Setup: model, VAE, identity


def resolve_vae(cfg: SampleConfig, run: RunRecord) -> tuple[str, int, str | None]:
    """(spec, seed, sha256 the latents were encoded with or None) of the VAE to decode with:
    ``--vae``, else the one in the run's cache manifest; SetupError if neither can be had."""
    cache_path = run.train["cache"]
    try:
        cfg.check_store(cache_path)  # --store-* given for a run whose cache is local
    except ConfigError as e:
        raise SetupError(f"{e} (the run's cache)") from None
    options = cfg.options_for(cache_path)
    try:
        recorded = cache_lib.open_cache(cache_path, storage_options=options).manifest.vae
        reason = "" if recorded is not None and recorded.spec else "its manifest records no VAE"
    except cache_lib.CacheError as e:
        recorded, reason = None, str(e)
    expected = recorded.weights_sha256 if recorded is not None else run.cache.vae_sha256
    seed = int((recorded.seed if recorded is not None else None) or 0)
    if cfg.vae:
        return cfg.vae, seed, expected
    if reason:
        raise SetupError(f"the run's cache {cache_path!r} cannot be read ({reason}), so its VAE is unknown: "
                         "pass the one its latents were encoded with, --vae SPEC (HF id or local folder)")
    return recorded.spec, seed, expected


def load_decoder(cfg: SampleConfig, run_config: RunRecord) -> LoadedEncoder:
    """The VAE decoder of :func:`resolve_vae`, checked against the weights the latents came from:
    a mismatch is an error for the recorded spec, a warning for an explicit ``--vae``."""
    spec, seed, expected = resolve_vae(cfg, run_config)
    try:
        loaded = load_vae_decoder(spec, seed=seed, quantize=cfg.quantize)
    except ValueError as e:  # a malformed spec
        raise SetupError(str(e)) from None
    sha = loaded.info["weights_sha256"]
    if expected and sha != expected:
        if not cfg.vae:
            raise SetupError(f"the VAE {spec!r} now has weights {sha[:12]}..., not the {expected[:12]}... the cache "
                             "was encoded with; pass --vae SPEC to decode with it anyway")
        _logger.warning("--vae %s (weights %s...) is not the VAE the cache was encoded with (%s...)", spec, sha[:12],
                        expected[:12])
    return loaded


def sample_identity(cfg: SampleConfig) -> dict[str, Any]:
    """The settings that decide the images (what a rerun must not change)."""
    return {
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "solver": cfg.solver if cfg.sampler == "ode" else None,
        "nfe": cfg.nfe,
        "t_last": cfg.t_last if cfg.sampler == "sde" else None,
        "cfg": cfg.cfg,
        "interval": list(cfg.interval) if cfg.cfg != 1.0 else None,
        "labels": cfg.labels,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "quantize": cfg.quantize,
    }


#: Entries of OUT/config.json a rerun may change: they do not change any image (the run's path, the
#: VAE's spec when its weights are the same, the raw config: what matters of it is in "samples", and the
#: upstream random-weights flags, which the weights' sha256 already decide).
FREE_ENTRIES = frozenset({"config", "model.run", "vae.spec", "upstream"})
#: The file that marks a folder as samples of ours; written before anything else.
OUT_MARKER = "urepa-samples.json"


def claim_out_dir(out: str) -> FolderLock:
    """Claim ``out`` for samples (see :func:`cache.cli.runtime.claim_folder`) and hold its lock (FolderBusy naming
    the holder if another sampling writes there); an older samples folder's config.json (samples, model, vae,
    config) counts as ours."""
    lock = claim_folder(out, marker=OUT_MARKER, kind="samples folder",
                        legacy_keys=frozenset({"samples", "model", "vae", "config"}), lock=True)
    assert lock is not None
    return lock


def upstream_random_weights(record: Mapping[str, Any]) -> RandomWeights | None:
    """The random-weights flags of a samples record (OUT/config.json), None if it has none: a record
    written before they were kept, whose ``vae.random_weights`` alone says something."""
    upstream = record.get("upstream")
    return RandomWeights.from_dict(upstream) if isinstance(upstream, Mapping) else None


# ------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Sampler:
    """Everything one batch needs: the guided velocity, the decoder and the latent bookkeeping."""

    cfg: SampleConfig
    velocity: Velocity
    decoder: torch.nn.Module
    latent_shape: tuple[int, int, int]
    num_classes: int
    latent: LatentTransform
    device: torch.device

    def __call__(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, H, W, 3) and labels (B,) of images ``indices``; NonFiniteSample naming the step
        (or the decoder) where a NaN or an infinity appears."""
        cfg = self.cfg
        y = class_labels(indices, mode=cfg.labels, num_classes=self.num_classes, seed=cfg.seed)
        noise = PerSampleNoise(cfg.seed, indices, self.latent_shape, device=self.device)
        x1, yd = noise(), y.to(self.device)
        velocity = FiniteCheck(self.velocity)
        if cfg.sampler == "sde":
            x0 = euler_maruyama(velocity, x1, yd, noise=noise, steps=cfg.steps, t_last=cfg.t_last)
        else:
            x0 = (ode_heun if cfg.solver == "heun" else ode_euler)(velocity, x1, yd, steps=cfg.steps)
        what = f"images {indices[0]}..{indices[-1]}: "
        velocity.raise_first(x0, what=what)
        try:
            images = self.decoder(self.latent.decode(x0))
        except NonFiniteOutput as e:
            raise NonFiniteSample(f"{what}{e}, from finite latents; no images were written for them") from None
        return images.cpu().numpy(), y.numpy()


def save_pngs(folder: str, indices: Sequence[int], images: np.ndarray) -> None:
    from PIL import Image

    for i, image in zip(indices, images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"))


def sample(cfg: SampleConfig) -> dict[str, Any]:
    """Sample (or finish sampling) ``cfg.num`` images into ``cfg.out``; every rank calls this.
    Returns the npz path, the number of images sampled by this call and the throughput."""
    ckpt_path, ckpt_step = find_checkpoint(cfg.run, cfg.step)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda, but no CUDA device is available")
    accelerator, device, autocast = make_accelerator(cfg.device, cfg.precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    problem, lock = "", None
    if rank == 0:
        try:
            lock = claim_out_dir(cfg.out)  # before the log file goes there
        except SetupError as e:
            problem = str(e)
    problem = broadcast_from_rank0(problem, world)  # every rank stops, none waits forever
    if problem:
        raise SetupError(problem)
    try:
        return _sample(cfg, accelerator, device, autocast, ckpt_path, ckpt_step)
    finally:
        if lock is not None:
            lock.release()


def _sample(cfg: SampleConfig, accelerator: Any, device: torch.device, autocast: torch.dtype | None,
            ckpt_path: str, ckpt_step: int) -> dict[str, Any]:
    """:func:`sample` once OUT is claimed and locked."""
    rank, world = accelerator.process_index, accelerator.num_processes
    setup_logging(rank, os.path.join(cfg.out, "log.txt"))

    model, run_config = load_run_model(cfg.run, weights=cfg.weights, step=ckpt_step, device=device)
    num_classes = model.config.num_classes
    if cfg.labels not in ("uniform", "balanced"):
        bad = [c for c in cfg.labels.split(",") if not 0 <= int(c) < num_classes]
        if bad:
            raise SetupError(f"--labels {cfg.labels}: class ids {', '.join(bad)} are not in [0, {num_classes})")
    loaded = load_decoder(cfg, run_config)
    latent = run_config.latent
    upstream = run_config.random_weights(decoder_vae=bool(loaded.info["random_weights"]))
    record = json.loads(json.dumps({
        "samples": sample_identity(cfg),
        "model": {"run": os.path.abspath(cfg.run), "step": ckpt_step, "weights": cfg.weights,
                  "weights_sha256": weights_sha256(model), "model": run_config.model_name, "num_classes": num_classes,
                  "latent_scale": latent.scale, "latent_shift": latent.shift},
        "vae": {key: loaded.info[key] for key in ("spec", "seed", "weights_sha256", "random_weights", "output")},
        "upstream": upstream.to_dict(),
        "config": config_to_dict(cfg),
    }))
    refuse_changed_rerun(cfg.out, record, free=FREE_ENTRIES, what="samples made")

    parts_dir, images_dir = os.path.join(cfg.out, "parts"), os.path.join(cfg.out, "images")
    if rank == 0:
        os.makedirs(parts_dir, exist_ok=True)
        if cfg.png:
            os.makedirs(images_dir, exist_ok=True)
        for name in os.listdir(parts_dir):
            if name.endswith(".tmp") and _PART.match(name[:-4]):
                os.remove(os.path.join(parts_dir, name))
        for line in set_aside_bad_parts(parts_dir):
            _logger.warning("part %s", line)
        write_json(os.path.join(cfg.out, "config.json"), record)
    accelerator.wait_for_everyone()
    chunks = pending_chunks([(a, b) for a, b, _ in list_parts(parts_dir)], cfg.num, cfg.batch_size)
    accelerator.wait_for_everyone()  # every rank has the same plan before any part is written
    todo = sum(len(c) for c in chunks)

    guidance = f"cfg {cfg.cfg} on t in [{cfg.interval[0]}, {cfg.interval[1]}]" if cfg.cfg != 1.0 else "no guidance"
    _logger.info("run %s, checkpoint %s (%s weights); %s %s, %d steps (NFE %d), %s; labels %s, seed %d; VAE %s; "
                 "%d of %d images left, %d rank(s) x batch %d, %s on %s", cfg.run, ckpt_path, cfg.weights,
                 cfg.sampler, cfg.solver if cfg.sampler == "ode" else f"t_last {cfg.t_last}", cfg.steps, cfg.nfe,
                 guidance, cfg.labels, cfg.seed, loaded.info["spec"], todo, cfg.num, world, cfg.batch_size, cfg.precision, device)
    _logger.info("uint8 conversion: %s", loaded.info["output"])
    if upstream.any:
        _logger.warning("the run's cache (or this VAE) has random-weight encoders: the samples show the plumbing, "
                        "they mean nothing about quality")

    in_ch, size = model.config.in_channels, model.config.input_size
    velocity = model_velocity(model, autocast=autocast)
    sampler = Sampler(cfg, with_guidance(velocity, null=num_classes, scale=cfg.cfg, interval=cfg.interval),
                      loaded.module.to(device), (in_ch, size, size), num_classes, latent, device)
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    start = time.perf_counter()
    with logging_redirect_tqdm(), torch.inference_mode():
        with tqdm(total=todo, unit="img", disable=rank != 0, dynamic_ncols=True, desc="sampling") as bar:
            for chunk in chunks[rank::world]:
                images, labels = sampler(chunk)  # NonFiniteSample before anything of the batch is written
                if cfg.png:
                    save_pngs(images_dir, chunk, images)
                write_part(parts_dir, chunk, images, labels)
                bar.update(min(len(chunk) * world, todo - bar.n))  # rank 0's progress stands for all ranks
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - start
    npz = os.path.join(cfg.out, "samples.npz")
    if rank == 0:
        npz = assemble_npz(cfg.out, cfg.num)
        grid = write_grid(cfg.out, min(cfg.grid, cfg.num)) if cfg.grid else None
        _logger.info("%d images sampled in %.1f s (%.2f img/s); %s%s", todo, elapsed, todo / max(elapsed, 1e-9),
                     npz, f", grid {grid}" if grid else "")
    accelerator.wait_for_everyone()
    return {"npz": npz, "rank": rank, "sampled": todo, "seconds": elapsed, "img_per_s": todo / max(elapsed, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    cfg, dry_run = parse_config(SampleConfig, argv, presets=PRESETS)
    if dry_run:
        return 0
    try:
        result = sample(cfg)
    except (SetupError, CheckpointError, cache_lib.CacheError, WeightsUnavailable, NonFiniteSample) as e:
        print(f"error: {explain(e, out_flag='--out')}", file=sys.stderr)
        return 2
    if result["rank"] == 0:
        print(result["npz"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
