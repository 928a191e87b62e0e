"""Copy a finished cache into another format (zarr, HDF5 or FFCV): every row, variant, label and skipped
row, the source list and the whole manifest.

    python -m cache.convert SRC DST --format zarr|hdf5|ffcv [--teachers NAME,...] [--overwrite]

SRC is any cache :func:`cache.open_cache` reads. The result is written under a temporary name beside
DST (``DST.partial``) and renamed to DST at the end, so a killed conversion never leaves anything at
DST that opens as a cache. Rerunning the same command resumes: a zarr target keeps its finished shards,
an FFCV target its staged blocks (raw ``.npy`` arrays in ``DST.partial/stage``, from which FFCV's writer
makes the .beton); an HDF5 target starts again (it costs one read of the source). ``--teachers`` keeps
a subset of the teachers (the manifest then lists only those).

The manifest is copied verbatim (a zarr target gets its own ``generation`` and ``created``: it is a new
store); the HDF5 and FFCV formats record the crc32c of their data beside it, which ``python -m
cache.inspect DST --verify`` checks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from .config import ConfigError, check_fields, parse_config
from .manifest import Manifest, ManifestError
from .runtime import setup_logging
from .store import FORMATS, LATENT_CHANNELS, CacheError, CacheReader, CacheWriter, Layout, open_cache

__all__ = ["ConvertConfig", "convert", "main"]

_logger = logging.getLogger(__name__)
PARTIAL = ".partial"


@dataclass(frozen=True)
class ConvertConfig:
    """Copy a finished cache into another format."""

    src: str = field(default="", metadata={"help": "the cache to copy (zarr folder, .h5 file or FFCV folder)"})
    dst: str = field(default="", metadata={"help": "where the copy goes (it must not exist, unless --overwrite)"})
    format: str = field(default="hdf5", metadata={"help": "the format of the copy", "choices": FORMATS})
    teachers: str = field(default="", metadata={"help": "comma-separated teachers to keep (default: all)"})
    block_rows: int = field(default=0, metadata={
        "help": "rows read and written at a time (0: the source's shard rows)", "min": 0})
    compression: Literal["none", "gzip"] = field(default="none", metadata={
        "help": "hdf5 only: none (contiguous, read by byte range) or gzip (chunked, read through h5py)"})
    workers: int = field(default=2, metadata={"help": "FFCV writer processes", "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing cache at DST"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.compression != "none" and self.format != "hdf5":
            raise ConfigError("--compression applies to --format hdf5 only")


def target_manifest(src: CacheReader, teachers: list[str]) -> tuple[Manifest, Layout]:
    """The source's manifest (a copy of its stored dict, ``to_dict()``) and layout, reduced to
    ``teachers``, typed again: the one place a conversion changes a manifest."""
    if teachers == list(src.layout.teachers):
        return src.manifest, src.layout
    manifest = src.manifest.to_dict()
    lay = src.layout
    layout = Layout(num_rows=lay.num_rows, resolution=lay.resolution, variants=lay.variants,
                    teachers={t: lay.teachers[t] for t in teachers}, shard_rows=lay.shard_rows,
                    chunk_rows=lay.chunk_rows, compressor=lay.compressor)
    manifest["layout"] = layout.to_dict()
    if manifest.get("teachers") is not None:
        manifest["teachers"] = {t: v for t, v in manifest["teachers"].items() if t in teachers}
    try:
        return Manifest.from_dict(manifest), layout
    except ManifestError as e:
        raise CacheError(f"{src.url}: the manifest reduced to teachers {teachers} is malformed: {e}") from None


def _blocks(src: CacheReader, names: Mapping[str, str], lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows lo..hi of the source: 'latents', 'features/<t>' (float16 (n, F, ...)) and 'labels'."""
    out = {"latents": np.asarray(src.latents[lo:hi], dtype=np.float16)}
    for key, teacher in names.items():
        out[key] = np.asarray(src.features[teacher][lo:hi], dtype=np.float16)
    out["labels"] = src.labels[lo:hi].astype(np.int32)
    return out


def convert(src_path: str | os.PathLike, dst_path: str | os.PathLike, *, format: str,
            teachers: list[str] | None = None, block_rows: int = 0, compression: str = "none", workers: int = 2,
            overwrite: bool = False, progress: bool = True) -> CacheReader:
    """Copy the cache at ``src_path`` to ``dst_path`` in ``format``; returns the copy, opened. See the
    module docstring for atomicity and resuming."""
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path).rstrip("/")
    if format not in FORMATS:
        raise CacheError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
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
    manifest, layout = target_manifest(src, names)
    block = block_rows or layout.shard_rows
    tmp = dst_path + PARTIAL
    sources = src.sources()
    keys = {f"features/{t}": t for t in names}
    bar = tqdm(total=layout.num_rows, unit="row", desc=f"convert to {format}", disable=not progress, file=sys.stderr)
    try:
        if format == "zarr":
            _to_zarr(src, tmp, manifest, layout, sources, keys, bar)
        elif format == "hdf5":
            _to_hdf5(src, tmp, manifest, layout, sources, keys, bar, block, compression)
        else:
            _to_ffcv(src, tmp, manifest, layout, sources, keys, bar, block, workers)
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
             keys: Mapping[str, str], bar: tqdm) -> None:
    writer, resumed = CacheWriter.create_or_resume(tmp, layout=layout, manifest=manifest, sources=sources,
                                                   overwrite=True)
    done = writer.completed_shards() if resumed else set()
    skipped = [s.to_dict() for s in manifest.skipped_files]
    for shard in range(layout.num_shards):
        lo, hi = layout.shard_rows_range(shard)
        if shard not in done:
            data = _blocks(src, keys, lo, hi)
            writer.write_shard(shard, latents=data["latents"], features={t: data[k] for k, t in keys.items()},
                               labels=data["labels"], skipped=[s for s in skipped if lo <= s["row"] < hi])
        bar.update(hi - lo)
    writer.finalize(manifest.stats.to_dict() if manifest.stats is not None else {})


def _to_hdf5(src: CacheReader, tmp: str, manifest: Manifest, layout: Layout, sources: list[dict[str, Any]],
             keys: Mapping[str, str], bar: tqdm, block: int, compression: str) -> None:
    from .h5cache import H5Writer

    if os.path.lexists(tmp):  # an HDF5 file is not safely resumable: start again
        _remove(tmp)
    writer = H5Writer(tmp, layout=layout, manifest=manifest, sources=sources, block_rows=block,
                      compression=None if compression == "none" else compression)
    try:
        for lo in range(0, layout.num_rows, block):
            hi = min(lo + block, layout.num_rows)
            data = _blocks(src, keys, lo, hi)
            writer.write_block(lo, {"latents": data["latents"], "labels": data["labels"],
                                    **{k: data[k] for k in keys}})
            bar.update(hi - lo)
        writer.finish()
    finally:
        writer.close()


def _to_ffcv(src: CacheReader, tmp: str, manifest: Manifest, layout: Layout, sources: list[dict[str, Any]],
             keys: Mapping[str, str], bar: tqdm, block: int, workers: int) -> None:
    """Stage the rows as raw .npy arrays block by block (resumable: one record per finished block), then
    let FFCV's writer make the .beton from them, then drop the stage."""
    from .ffcvcache import write_ffcv

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
    names = ["latents", *keys, "labels"]
    files = {name: os.path.join(stage, name.replace("/", "__") + ".npy") for name in names}
    h = layout.resolution // 8
    shapes = {"latents": (layout.variants, LATENT_CHANNELS, h, h), "labels": (),
              **{k: (layout.variants, *layout.teachers[t]) for k, t in keys.items()}}
    arrays = {}
    for name, path in files.items():
        mode = "r+" if os.path.exists(path) else "w+"
        arrays[name] = np.lib.format.open_memmap(path, mode=mode, dtype=np.int32 if name == "labels" else np.float16,
                                                 shape=(layout.num_rows, *shapes[name]))
    for lo in range(0, layout.num_rows, block):
        hi = min(lo + block, layout.num_rows)
        marker = os.path.join(stage, f"block-{lo:012d}.done")
        if not os.path.exists(marker):
            data = _blocks(src, keys, lo, hi)
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
    write_ffcv(tmp, stage={k: files[k] for k in ["latents", *keys]}, layout=layout, manifest=manifest,
               sources=sources, labels=labels, num_workers=workers)
    shutil.rmtree(stage)


def main(argv: list[str] | None = None) -> int:
    cfg, dry = parse_config(ConvertConfig, argv, positional=("src", "dst"))
    if dry:
        return 0
    setup_logging(0, None)
    try:
        convert(cfg.src, cfg.dst, format=cfg.format, teachers=[t for t in cfg.teachers.split(",") if t] or None,
                block_rows=cfg.block_rows, compression=cfg.compression, workers=cfg.workers,
                overwrite=cfg.overwrite)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
