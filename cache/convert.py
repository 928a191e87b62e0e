"""Copy a finished cache into another format (zarr, HDF5 or FFCV): every row, variant, label and skipped
row, the source list and the whole manifest.

    python -m cache.convert SRC DST --format zarr|hdf5|ffcv [--teachers NAME,...]
        [--feature-dtype keep|fp16|int8] [--overwrite]

SRC is any cache :func:`cache.open_cache` reads. The result is written under a temporary name beside
DST (``DST.partial``) and renamed to DST at the end, so a killed conversion never leaves anything at
DST that opens as a cache. Rerunning the same command resumes: a zarr target keeps its finished shards,
an FFCV target its staged blocks (raw ``.npy`` arrays in ``DST.partial/stage``, from which FFCV's writer
makes the .beton); an HDF5 target starts again (it costs one read of the source). ``--teachers`` keeps
a subset of the teachers (the manifest then lists only those).

``--feature-dtype`` sets how the copy stores teacher tokens: ``keep`` (default) copies each teacher's
stored form bit for bit; ``int8`` quantises float16 teachers (:func:`cache.quant.quantize_tokens` of the
float16 tokens: one float32 absmax scale per token) and keeps int8 ones; ``fp16`` dequantises int8
teachers (:func:`cache.quant.dequantize_tokens` to float16) and keeps float16 ones. int8 made here comes
from the cache's float16 tokens, a build's from the encoder's float32 output: values may differ by that
rounding. A teacher whose dtype changes gets ``dtype`` (and ``converted_from``, the dtype it had) in its
manifest record, and the layout records the new dtypes.

Otherwise the manifest is copied verbatim (a zarr target gets its own ``generation`` and ``created``: it
is a new store); the HDF5 and FFCV formats record the crc32c of their data beside it, which ``python -m
cache.inspect DST --verify`` checks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from .config import ConfigError, check_fields, parse_config
from .manifest import Manifest, ManifestError
from .quant import (
    CALIBRATION_ROWS,
    FEATURE_DTYPES,
    SCALES_GROUP,
    STORED_DTYPES,
    channel_scales,
    dequantize_tokens,
    quantize_tokens,
)
from .runtime import setup_logging
from .store import (
    ADDING_KEY,
    FORMATS,
    CacheError,
    CacheReader,
    CacheWriter,
    Layout,
    manifest_channel_scales,
    open_cache,
)

__all__ = ["ConvertConfig", "convert", "main"]

_logger = logging.getLogger(__name__)
PARTIAL = ".partial"


@dataclass(frozen=True)
class ConvertConfig:
    """Copy a finished cache into another format (and its teacher tokens into another dtype)."""

    src: str = field(default="", metadata={"help": "the cache to copy (zarr folder, .h5 file or FFCV folder)"})
    dst: str = field(default="", metadata={"help": "where the copy goes (it must not exist, unless --overwrite)"})
    format: str = field(default="hdf5", metadata={"help": "the format of the copy", "choices": FORMATS})
    teachers: str = field(default="", metadata={"help": "comma-separated teachers to keep (default: all)"})
    feature_dtype: str = field(default="keep", metadata={
        "help": "teacher tokens in the copy: keep (as stored, bit for bit), fp16 (int8 teachers dequantised) or "
                "int8 (float16 teachers quantised from their float16 values, one float32 scale per token; may "
                "differ from a --feature-dtype int8 build by the rounding of that float16 intermediate)",
        "choices": ("keep", *FEATURE_DTYPES)})
    block_rows: int = field(default=0, metadata={
        "min": 0, "max": 1 << 20, "help": "rows read and written at a time (0: the source's shard rows)"})
    compression: Literal["none", "gzip"] = field(default="none", metadata={
        "help": "hdf5 only: none (contiguous, read by byte range) or gzip (chunked, read through h5py)"})
    workers: int = field(default=2, metadata={"min": 1, "max": 256, "help": "FFCV writer processes"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing cache at DST"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.compression != "none" and self.format != "hdf5":
            raise ConfigError("--compression applies to --format hdf5 only")


def target_dtypes(src: CacheReader, teachers: list[str], feature_dtype: str = "keep") -> dict[str, str]:
    """The stored dtype ('float16' or 'int8') of each kept teacher's tokens in the copy."""
    if feature_dtype == "keep":
        return {t: src.layout.feature_dtype(t) for t in teachers}
    return {t: STORED_DTYPES[feature_dtype] for t in teachers}


def target_manifest(src: CacheReader, teachers: list[str], feature_dtype: str = "keep") -> tuple[Manifest, Layout]:
    """The source's manifest (a copy of its stored dict, ``to_dict()``) and layout, reduced to
    ``teachers`` and with their tokens in ``feature_dtype``, typed again: the one place a conversion
    changes a manifest. A teacher whose dtype changes gets ``dtype`` and ``converted_from`` in its record."""
    dtypes = target_dtypes(src, teachers, feature_dtype)
    changed = {t: src.layout.feature_dtype(t) for t in teachers if dtypes[t] != src.layout.feature_dtype(t)}
    pending = ADDING_KEY in src.manifest.extra  # a teacher being added to the source: not part of the copy
    if teachers == list(src.layout.teachers) and not changed and not pending:
        return src.manifest, src.layout
    manifest = src.manifest.to_dict()
    manifest.pop(ADDING_KEY, None)
    lay = src.layout
    layout = Layout(num_rows=lay.num_rows, resolution=lay.resolution, variants=lay.variants,
                    teachers={t: lay.teachers[t] for t in teachers}, shard_rows=lay.shard_rows,
                    chunk_rows=lay.chunk_rows, compressor=lay.compressor, feature_dtypes=dtypes)
    manifest["layout"] = layout.to_dict()
    if manifest.get("teachers") is not None:
        manifest["teachers"] = {t: v for t, v in manifest["teachers"].items() if t in teachers}
        for t, old in changed.items():
            if isinstance(manifest["teachers"].get(t), dict):
                record = {**manifest["teachers"][t], "dtype": dtypes[t], "converted_from": old}
                record.pop("channel_scales", None)
                if dtypes[t] == "int8":
                    record["channel_scales"] = _calibrate(src, t)
                manifest["teachers"][t] = record
    try:
        return Manifest.from_dict(manifest), layout
    except ManifestError as e:
        raise CacheError(f"{src.url}: the manifest reduced to teachers {teachers} is malformed: {e}") from None


def _calibrate(src: CacheReader, teacher: str) -> list[float]:
    """The channel scales of a float16 teacher quantised here: from its tokens (variant 0) of the first
    :data:`cache.quant.CALIBRATION_ROWS` data rows, as a build measures them from its first images."""
    import torch

    rows = src.rows[:CALIBRATION_ROWS]
    tokens = np.stack([np.asarray(src.features[teacher][int(r)], dtype=np.float32)[0] for r in rows]) if len(rows) else None
    if tokens is None:
        raise CacheError(f"{src.url} has no data rows to measure teacher {teacher!r}'s channel scales from")
    try:
        return channel_scales(torch.from_numpy(tokens)).tolist()
    except ValueError as e:
        raise CacheError(f"{src.url}: teacher {teacher!r} cannot be stored as int8 ({e})") from None


def _blocks(src: CacheReader, target: Manifest, layout: Layout, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows lo..hi of every array of the target ``layout`` (:meth:`Layout.array_names`) from the source:
    'latents' float16, 'features/<t>' float16 or int8 and 'feature_scales/<t>' float32 (n, F, ...) as the
    target stores them, 'labels' int32. A teacher stored as the target stores it is copied as it is; one
    quantised here uses the channel scales of the ``target`` manifest, one dequantised the source's."""
    import torch

    out = {"latents": np.asarray(src.latents[lo:hi], dtype=np.float16)}
    for t in layout.teachers:
        tokens = np.asarray(src.features[t][lo:hi])
        scales = np.asarray(src.feature_scales[t][lo:hi], dtype=np.float32) if src.layout.quantized(t) else None
        if layout.quantized(t) and scales is None:  # float16 -> int8
            try:
                channels = manifest_channel_scales(target, t, layout)
                q, s = quantize_tokens(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float16)),
                                       None if channels is None else torch.from_numpy(channels))
            except ValueError as e:
                raise CacheError(f"{src.url}: teacher {t!r} rows {lo}..{hi} cannot be stored as int8 ({e}); convert "
                                 "with --feature-dtype keep or fp16") from None
            tokens, scales = q.numpy(), s.numpy()
        elif not layout.quantized(t) and scales is not None:  # int8 -> float16
            channels = src.channel_scales(t)
            tokens = dequantize_tokens(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int8)),
                                       torch.from_numpy(scales), None if channels is None else torch.from_numpy(channels),
                                       dtype=torch.float16).numpy()
            scales = None
        out[f"features/{t}"] = np.asarray(tokens, dtype=np.int8 if layout.quantized(t) else np.float16)
        if scales is not None:
            out[f"{SCALES_GROUP}/{t}"] = scales
    out["labels"] = src.labels[lo:hi].astype(np.int32)
    return out


def convert(src_path: str | os.PathLike, dst_path: str | os.PathLike, *, format: str,
            teachers: list[str] | None = None, feature_dtype: str = "keep", block_rows: int = 0,
            compression: str = "none", workers: int = 2, overwrite: bool = False, progress: bool = True) -> CacheReader:
    """Copy the cache at ``src_path`` to ``dst_path`` in ``format``, teacher tokens as ``feature_dtype``
    says ('keep', 'fp16', 'int8'); returns the copy, opened. See the module docstring for the dtypes,
    atomicity and resuming."""
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path).rstrip("/")
    if format not in FORMATS:
        raise CacheError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    if feature_dtype not in ("keep", *FEATURE_DTYPES):
        raise CacheError(f"unknown feature dtype {feature_dtype!r}: use one of keep, {', '.join(FEATURE_DTYPES)}")
    src = open_cache(src_path)
    names = list(src.layout.teachers) if not teachers else list(teachers)
    unknown = sorted(set(names) - set(src.layout.teachers))
    if unknown:
        raise CacheError(f"{src_path} has no teachers {unknown}; it has {sorted(src.layout.teachers)}")
    if os.path.abspath(src_path) == os.path.abspath(dst_path):
        raise CacheError(f"{dst_path} is the source itself; choose another DST")
    if os.path.lexists(dst_path):
        if not overwrite:
            raise CacheError(f"{dst_path} exists; choose another DST, or pass --overwrite to replace it")
        open_cache(dst_path, allow_incomplete=True)  # only ever replace a cache, never a folder we merely find
    manifest, layout = target_manifest(src, names, feature_dtype)
    block = block_rows or layout.shard_rows
    tmp = dst_path + PARTIAL
    sources = src.sources()
    bar = tqdm(total=layout.num_rows, unit="row", desc=f"convert to {format}", disable=not progress, file=sys.stderr)
    try:
        if format == "zarr":
            _to_zarr(src, tmp, manifest, layout, sources, bar)
        elif format == "hdf5":
            _to_hdf5(src, tmp, manifest, layout, sources, bar, block, compression)
        else:
            _to_ffcv(src, tmp, manifest, layout, sources, bar, block, workers)
    finally:
        bar.close()
    if os.path.lexists(dst_path):
        _remove(dst_path)
    os.replace(tmp, dst_path)
    _logger.info("%s: %s copy of %s written", dst_path, format, src_path)
    return open_cache(dst_path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _to_zarr(src: CacheReader, tmp: str, manifest: Manifest, layout: Layout, sources: list[dict[str, Any]],
             bar: tqdm) -> None:
    writer, resumed = CacheWriter.create_or_resume(tmp, layout=layout, manifest=manifest, sources=sources,
                                                   overwrite=True)
    done = writer.completed_shards() if resumed else set()
    skipped = [s.to_dict() for s in manifest.skipped_files]
    for shard in range(layout.num_shards):
        lo, hi = layout.shard_rows_range(shard)
        if shard not in done:
            data = _blocks(src, manifest, layout, lo, hi)
            writer.write_shard(shard, latents=data["latents"], features={t: data[f"features/{t}"] for t in layout.teachers},
                               scales={t: data[f"{SCALES_GROUP}/{t}"] for t in layout.quantized_teachers},
                               labels=data["labels"], skipped=[s for s in skipped if lo <= s["row"] < hi])
        bar.update(hi - lo)
    writer.finalize(manifest.stats.to_dict() if manifest.stats is not None else {})


def _to_hdf5(src: CacheReader, tmp: str, manifest: Manifest, layout: Layout, sources: list[dict[str, Any]],
             bar: tqdm, block: int, compression: str) -> None:
    from .h5cache import H5Writer

    if os.path.lexists(tmp):  # an HDF5 file is not safely resumable: start again
        _remove(tmp)
    writer = H5Writer(tmp, layout=layout, manifest=manifest, sources=sources, block_rows=block,
                      compression=None if compression == "none" else compression)
    try:
        for lo in range(0, layout.num_rows, block):
            hi = min(lo + block, layout.num_rows)
            writer.write_block(lo, _blocks(src, manifest, layout, lo, hi))
            bar.update(hi - lo)
        writer.finish()
    finally:
        writer.close()


def _to_ffcv(src: CacheReader, tmp: str, manifest: Manifest, layout: Layout, sources: list[dict[str, Any]],
             bar: tqdm, block: int, workers: int) -> None:
    """Stage the rows as raw .npy arrays block by block (resumable: one record per finished block), then
    let FFCV's writer make the .beton from them, then drop the stage."""
    from .ffcvcache import array_dtypes, variant_shapes, write_ffcv

    stage = os.path.join(tmp, "stage")
    os.makedirs(stage, exist_ok=True)
    plan = {"rows": layout.num_rows, "block": block, "layout": layout.to_dict(), "source": src.url}
    plan_path = os.path.join(stage, "plan.json")
    old = None
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
    if old != plan:  # another conversion's leftovers: start again
        shutil.rmtree(tmp)
        os.makedirs(stage)
        with open(plan_path, "w") as f:
            json.dump(plan, f)
    names = layout.array_names()
    files = {name: os.path.join(stage, name.replace("/", "__") + ".npy") for name in names}
    shapes = {**{k: (layout.variants, *s) for k, s in variant_shapes(layout).items()}, "labels": ()}
    dtypes = {**array_dtypes(layout), "labels": np.dtype("<i4")}
    arrays = {}
    for name, path in files.items():
        mode = "r+" if os.path.exists(path) else "w+"
        arrays[name] = np.lib.format.open_memmap(path, mode=mode, dtype=dtypes[name],
                                                 shape=(layout.num_rows, *shapes[name]))
    for lo in range(0, layout.num_rows, block):
        hi = min(lo + block, layout.num_rows)
        marker = os.path.join(stage, f"block-{lo:012d}.done")
        if not os.path.exists(marker):
            data = _blocks(src, manifest, layout, lo, hi)
            for name in names:
                arrays[name][lo:hi] = data[name]
                arrays[name].flush()
            open(marker, "w").close()  # after the block's data: a killed run writes this block again
        bar.update(hi - lo)
    labels = np.array(arrays.pop("labels"))
    del arrays
    beton = os.path.join(tmp, "data.beton")
    if os.path.exists(beton):
        os.remove(beton)
    write_ffcv(tmp, stage={k: files[k] for k in names if k != "labels"}, layout=layout, manifest=manifest,
               sources=sources, labels=labels, num_workers=workers)
    shutil.rmtree(stage)


def main(argv: list[str] | None = None) -> int:
    cfg, dry = parse_config(ConvertConfig, argv, positional=("src", "dst"))
    if dry:
        return 0
    setup_logging(0, None)
    try:
        convert(cfg.src, cfg.dst, format=cfg.format, teachers=[t for t in cfg.teachers.split(",") if t] or None,
                feature_dtype=cfg.feature_dtype, block_rows=cfg.block_rows, compression=cfg.compression, workers=cfg.workers,
                overwrite=cfg.overwrite)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
