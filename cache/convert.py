"""Copy a finished cache into another format (zarr, HDF5 or FFCV): every row, variant, label and skipped
row, the source list and the whole manifest.

    python -m cache.convert SRC DST --format zarr|hdf5|ffcv [--teachers NAME,...]
        [--feature-dtype keep|fp16|int8] [--overwrite]

SRC is any cache :func:`cache.open_cache` reads. The result is written under a temporary name beside
DST (``DST.partial``) and renamed to DST at the end, so a killed conversion never leaves anything at
DST that opens as a cache. Either may be in an object store (``s3://bucket/c.zarr``, with the store
settings of :class:`cache.cli.config.StoreSettings` or the environment): a copy into a store is a zarr
cache written in place (a store has no rename), which opens as a cache only once its manifest is marked
complete, its last write. Rerunning the same command resumes: a zarr target keeps its finished shards,
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

import errno
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from .cli.advice import explain, explain_os_error
from .cli.config import ConfigError, StoreSettings, check_fields, parse_config
from .cli.runtime import setup_logging
from .errors import CacheError
from .files import local_root
from .formats import FORMATS, format_named, open_cache
from .layout import DTYPE_OPTIONS, SCALES_GROUP, Layout, stored_dtype
from .manifest import Manifest, ManifestError, channel_scales_of
from .quant import CALIBRATION_ROWS, channel_scales, dequantize_tokens, quantize_tokens
from .reader import CacheReader
from .stores import StoreError
from .writer import Format

__all__ = ["ConvertConfig", "convert", "main"]

_logger = logging.getLogger(__name__)
PARTIAL = ".partial"


@dataclass(frozen=True)
class ConvertConfig(StoreSettings):
    """Copy a finished cache into another format (and its teacher tokens into another dtype)."""

    src: str = field(default="", metadata={
        "help": "the cache to copy (zarr folder or store URL, .h5 file or FFCV folder)"})
    dst: str = field(default="", metadata={
        "help": "where the copy goes (it must not exist, unless --overwrite); a store URL takes --format zarr. The "
                "--store-* settings apply to whichever of SRC and DST is in an object store"})
    format: str = field(default="hdf5", metadata={"help": "the format of the copy", "choices": tuple(FORMATS)})
    teachers: str = field(default="", metadata={"help": "comma-separated teachers to keep (none: all)"})
    feature_dtype: str = field(default="keep", metadata={
        "help": "teacher tokens in the copy: keep (as stored, bit for bit), fp16 (int8 teachers dequantised) or "
                "int8 (float16 teachers quantised from their float16 values, one float32 scale per token; may "
                "differ from a --feature-dtype int8 build by the rounding of that float16 intermediate)",
        "choices": ("keep", *DTYPE_OPTIONS)})
    block_rows: int = field(default=0, metadata={
        "min": 0, "max": 1 << 20, "help": "rows read and written at a time (0: what the source reads well, a zarr shard)"})
    compression: Literal["none", "gzip"] = field(default="none", metadata={
        "help": "hdf5 only: none (contiguous, read by byte range) or gzip (chunked, read through h5py)"})
    workers: int = field(default=2, metadata={"min": 1, "max": 256, "help": "FFCV writer processes"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing cache at DST"})

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_store(self.src, self.dst)
        if self.compression != "none" and self.format != "hdf5":
            raise ConfigError("--compression applies to --format hdf5 only")


def target_dtypes(src: CacheReader, teachers: list[str], feature_dtype: str = "keep") -> dict[str, str]:
    """The stored dtype ('float16' or 'int8') of each kept teacher's tokens in the copy."""
    if feature_dtype == "keep":
        return {t: src.layout.feature_dtype(t) for t in teachers}
    return {t: stored_dtype(feature_dtype) for t in teachers}


def target_manifest(src: CacheReader, teachers: list[str], feature_dtype: str = "keep") -> tuple[Manifest, Layout]:
    """The source's manifest (a copy of its stored dict, ``to_dict()``) and layout, reduced to
    ``teachers`` and with their tokens in ``feature_dtype``, typed again: the one place a conversion
    changes a manifest. A teacher whose dtype changes gets ``dtype`` and ``converted_from`` in its record."""
    dtypes = target_dtypes(src, teachers, feature_dtype)
    changed = {t: src.layout.feature_dtype(t) for t in teachers if dtypes[t] != src.layout.feature_dtype(t)}
    pending = bool(src.manifest.pending)  # a teacher being added to the source: not part of the copy
    if teachers == list(src.layout.teachers) and not changed and not pending:
        return src.manifest, src.layout
    manifest = src.manifest.to_dict()
    manifest.pop("adding", None)
    layout = src.layout.with_teachers({t: src.layout.teachers[t] for t in teachers}, dtypes)
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
        raise CacheError(f"{src.url}: the manifest reduced to teachers {teachers} is malformed: {e}", url=src.url) from None


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

    block = src.read_checked(lo, hi)  # damage, a missing object or impossible values: refused, never copied
    out = {"latents": block["latents"].astype(np.float16)}
    for t in layout.teachers:
        tokens = block[f"features/{t}"]
        scales = block[f"{SCALES_GROUP}/{t}"].astype(np.float32) if src.layout.quantized(t) else None
        if layout.quantized(t) and scales is None:  # float16 -> int8
            try:
                channels = channel_scales_of(target, t, url=src.url)
                q, s = quantize_tokens(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float16)),
                                       None if channels is None else torch.from_numpy(channels))
            except ValueError as e:
                raise CacheError(f"{src.url}: teacher {t!r} rows {lo}..{hi} cannot be stored as int8 ({e})",
                                 url=src.url) from None
            tokens, scales = q.numpy(), s.numpy()
        elif not layout.quantized(t) and scales is not None:  # int8 -> float16
            channels = src.channel_scales(t)
            tokens = dequantize_tokens(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int8)),
                                       torch.from_numpy(scales), None if channels is None else torch.from_numpy(channels),
                                       dtype=torch.float16).numpy()
            scales = None
            if not np.isfinite(tokens).all():
                raise CacheError(f"{src.url}: teacher {t!r} rows {lo}..{hi} dequantise to non-finite float16 tokens",
                                 url=src.url, remedy="repair")
        out[f"features/{t}"] = np.asarray(tokens, dtype=np.int8 if layout.quantized(t) else np.float16)
        if scales is not None:
            out[f"{SCALES_GROUP}/{t}"] = scales
    out["labels"] = block["labels"]
    return out


def convert(src_path: str | os.PathLike, dst_path: str | os.PathLike, *, format: str,
            teachers: list[str] | None = None, feature_dtype: str = "keep", block_rows: int = 0,
            compression: str = "none", workers: int = 2, overwrite: bool = False, progress: bool = True,
            src_options: Mapping[str, Any] | None = None, dst_options: Mapping[str, Any] | None = None) -> CacheReader:
    """Copy the cache at ``src_path`` to ``dst_path`` in ``format``, teacher tokens as ``feature_dtype``
    says ('keep', 'fp16', 'int8'); returns the copy, opened. ``src_options``, ``dst_options``: the settings of
    an object store each is in (:func:`cache.stores.open_store`). See the module docstring for the dtypes,
    atomicity and resuming."""
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path).rstrip("/")
    target = format_named(format)
    if feature_dtype != "keep" and feature_dtype not in DTYPE_OPTIONS:
        raise CacheError(f"unknown feature dtype {feature_dtype!r}: use one of keep, {', '.join(DTYPE_OPTIONS)}")
    in_store = local_root(dst_path) is None
    if in_store and not target.remote:
        raise CacheError(f"{dst_path} is in an object store, where a copy is a zarr cache: use --format zarr, or give "
                         f"a local DST for a {format} copy", url=dst_path)
    src = open_cache(src_path, storage_options=src_options)
    names = list(src.layout.teachers) if not teachers else list(teachers)
    unknown = sorted(set(names) - set(src.layout.teachers))
    if unknown:
        raise CacheError(f"{src_path} has no teachers {unknown}; it has {sorted(src.layout.teachers)}", url=src_path)
    if os.path.abspath(src_path) == os.path.abspath(dst_path):
        raise CacheError(f"{dst_path} is the source itself; choose another DST", url=dst_path)
    if in_store:  # written in place; the writer refuses a prefix that holds no cache of ours
        if not overwrite and _finished_cache(dst_path, dst_options):
            raise CacheError(f"{dst_path} exists", url=dst_path, remedy="replace")
    elif os.path.lexists(dst_path):
        if not overwrite:
            raise CacheError(f"{dst_path} exists", url=dst_path, remedy="replace")
        open_cache(dst_path, allow_incomplete=True)  # only ever replace a cache, never a folder we merely find
    manifest, layout = target_manifest(src, names, feature_dtype)
    tmp = dst_path if in_store else dst_path + PARTIAL
    if not in_store:
        _check_space(tmp, layout, target)
    writer = target.writer(tmp, layout=layout, manifest=manifest, sources=src.sources(),
                           block_rows=block_rows or src.block_rows, compression=compression, workers=workers,
                           overwrite=overwrite or not in_store, storage_options=dst_options)
    bar = tqdm(total=layout.num_rows, unit="row", desc=f"convert to {format}", disable=not progress, file=sys.stderr)
    try:
        done = writer.done_blocks()
        for lo in range(0, layout.num_rows, writer.block_rows):
            hi = min(lo + writer.block_rows, layout.num_rows)
            if lo not in done:
                writer.write_block(lo, _blocks(src, manifest, layout, lo, hi))
            bar.update(hi - lo)
        writer.finish()
    finally:
        writer.close()
        bar.close()
    if not in_store:
        if os.path.lexists(dst_path):
            _remove(dst_path)
        os.replace(tmp, dst_path)
    _logger.info("%s: %s copy of %s written", dst_path, format, src_path)
    return open_cache(dst_path, storage_options=dst_options)


def _finished_cache(url: str, options: Mapping[str, Any] | None) -> bool:
    """Whether a finished cache is at the store URL ``url`` (an unfinished copy of the same cache resumes)."""
    try:
        open_cache(url, storage_options=options)
    except StoreError:
        raise
    except CacheError:
        return False
    return True


def _check_space(tmp: str, layout: Layout, target: Format) -> None:
    """Refuse a copy the disk cannot hold before writing a byte (ENOSPC, naming both sizes): a library that
    meets a full disk halfway (h5py's delayed writes, FFCV's worker processes) may not say so, or crash."""
    row = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
              for shape, dtype in layout.row_shapes().values())
    needed = int(row * layout.num_rows * getattr(target.copy_writer, "space_factor", 1.0)) + (1 << 20)
    folder = os.path.dirname(os.path.abspath(tmp))
    have = _partial_bytes(tmp) + shutil.disk_usage(folder).free
    if have < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: the copy needs about {needed / 2**20:.1f} MiB, "
                                    f"{have / 2**20:.1f} MiB are free there", tmp)


def _partial_bytes(path: str) -> int:
    """Bytes a killed run of this copy left at ``path`` (ours: they are replaced or resumed)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def main(argv: list[str] | None = None) -> int:
    cfg, dry = parse_config(ConvertConfig, argv, positional=("src", "dst"))
    if dry:
        return 0
    setup_logging(0, None)
    try:
        convert(cfg.src, cfg.dst, format=cfg.format, teachers=[t for t in cfg.teachers.split(",") if t] or None,
                feature_dtype=cfg.feature_dtype, block_rows=cfg.block_rows, compression=cfg.compression, workers=cfg.workers,
                overwrite=cfg.overwrite, src_options=cfg.options_for(cfg.src), dst_options=cfg.options_for(cfg.dst))
    except CacheError as e:
        print(f"error: {explain(e, out_flag='DST')}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, a permission: one line, naming the path
        print(f"error: {explain_os_error(e, what=cfg.dst)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
