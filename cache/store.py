"""The on-disk layout of a feature cache (zarr v3), its writer and its reader.

This module is the only code that knows the layout. One cache is one zarr v3 group::

    <root>/zarr.json                  group; attributes["urepa_cache"] holds the manifest
    <root>/latents                    (N, F, 8, R/8, R/8) float16: VAE posterior mean (4 ch), std (4 ch)
    <root>/features/<teacher>         (N, F, T, D) float16: teacher patch tokens after the final norm
    <root>/labels                     (N,) int32: class index; -1 marks a skipped source file
    <root>/build/                     group of build records (no sample data)
        sources.json                  relative path and size of every source file, in row order
        progress/shard-000123.json    one record per finished shard, written after the shard's data
        config.json, log.txt          resolved config and log of the builds (local stores)

Row i is source file i of the sorted listing; a file that could not be decoded keeps its row,
holds zeros and has label -1, and the reader never serves it. F indexes the variant: 0 as is,
1 mirrored left-right (present when built with ``--flip both``). All arrays share one row
sharding: one shard (one object per array) holds ``shard_rows`` rows, split into inner chunks of
``chunk_rows`` rows, uncompressed by default so that the loader can read single rows by byte
range (see :mod:`cache.loader`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .config import nested_diff
from .shardfile import ShardFormat, choose_io, log_io_choice, shard_key, write_shard_file

_logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_KEY",
    "CacheError",
    "CacheMismatchError",
    "Layout",
    "CacheWriter",
    "Cache",
    "open_cache",
    "manifest_diff",
]

SCHEMA_VERSION = 1
MANIFEST_KEY = "urepa_cache"
LATENT_CHANNELS = 8  # posterior mean (4) and std (4) of the SD-VAE
VOLATILE_KEYS = ("created", "complete", "skipped", "stats", "software", "source_root")
COMPRESSORS = ("none", "zstd")


class CacheError(RuntimeError):
    """The cache is missing, incomplete or malformed."""


class CacheMismatchError(CacheError):
    """An existing cache was built from another source, encoder or setting."""


@dataclass(frozen=True)
class Layout:
    """Shapes and storage settings of one cache."""

    num_rows: int
    resolution: int
    variants: int  # F: 1, or 2 with the mirrored image
    teachers: Mapping[str, tuple[int, int]]  # name -> (tokens T, dim D)
    shard_rows: int = 256
    chunk_rows: int = 16
    compressor: str = "none"

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise CacheError("a cache needs at least one row")
        if self.variants not in (1, 2):
            raise CacheError(f"variants must be 1 or 2, got {self.variants}")
        if self.resolution % 8:
            raise CacheError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.shard_rows < 1 or self.chunk_rows < 1 or self.shard_rows % self.chunk_rows:
            raise CacheError(f"shard_rows ({self.shard_rows}) must be a positive multiple of chunk_rows ({self.chunk_rows})")
        if self.compressor not in COMPRESSORS:
            raise CacheError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        for name in self.teachers:
            if not name or "/" in name or name.startswith("__") or name in (".", ".."):
                raise CacheError(f"invalid teacher name {name!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_rows_range(self, shard: int) -> tuple[int, int]:
        lo = shard * self.shard_rows
        return lo, min(lo + self.shard_rows, self.num_rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "resolution": self.resolution,
            "variants": self.variants,
            "teachers": {k: list(v) for k, v in self.teachers.items()},
            "shard_rows": self.shard_rows,
            "chunk_rows": self.chunk_rows,
            "compressor": self.compressor,
            "dtypes": {"latents": "float16", "features": "float16", "labels": "int32"},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        return cls(
            num_rows=d["num_rows"], resolution=d["resolution"], variants=d["variants"],
            teachers={k: tuple(v) for k, v in d["teachers"].items()},
            shard_rows=d["shard_rows"], chunk_rows=d["chunk_rows"], compressor=d["compressor"],
        )


def manifest_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted names of the manifest entries that differ, ignoring bookkeeping (time, versions, skips)."""
    return [f"{name}: cache has {_short(a)}, this run has {_short(b)}"
            for name, a, b in nested_diff(old, new, skip=frozenset(VOLATILE_KEYS))]


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) < 80 else s[:77] + "..."


# ---------------------------------------------------------------------------------------------
# Raw keys (build records) through the zarr store, so any store zarr supports works.


def _store_and_prefix(group: zarr.Group) -> tuple[Any, str]:
    prefix = group.path + "/" if group.path else ""
    return group.store, prefix


def _put(group: zarr.Group, key: str, data: bytes) -> None:
    store, prefix = _store_and_prefix(group)
    sync(store.set(prefix + key, default_buffer_prototype().buffer.from_bytes(data)))


def _get(group: zarr.Group, key: str) -> bytes | None:
    store, prefix = _store_and_prefix(group)
    buf = sync(store.get(prefix + key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _list(group: zarr.Group, prefix_key: str) -> list[str]:
    store, prefix = _store_and_prefix(group)
    full = prefix + prefix_key

    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(full)]

    return [k[len(prefix):] for k in sync(collect())]


def local_root(url: str | os.PathLike) -> str | None:
    """The folder of a cache on the local file system, or None for another kind of store."""
    s = os.fspath(url)
    if s.startswith("file://"):
        return s[len("file://"):]
    return None if "://" in s else s


def _array_kwargs(layout: Layout, row_shape: tuple[int, ...]) -> dict[str, Any]:
    compressors = None if layout.compressor == "none" else zarr.codecs.ZstdCodec(level=3)
    return dict(
        shape=(layout.num_rows, *row_shape),
        chunks=(layout.chunk_rows, *row_shape),
        shards=(layout.shard_rows, *row_shape),
        compressors=compressors,
        fill_value=0,
    )


def _progress_key(shard: int) -> str:
    return f"build/progress/shard-{shard:06d}.json"


# ---------------------------------------------------------------------------------------------
# Writer


class CacheWriter:
    """Writes whole shards of a cache; one per process in a distributed build.

    Every write unit is a shard (one object per array), so ranks never share an object. A shard's
    progress record is written after all of its data, which makes "record present" mean "data
    complete" for any interruption; a shard without a record is simply written again.
    """

    def __init__(self, url: str | os.PathLike, group: zarr.Group, manifest: dict[str, Any]) -> None:
        self.url = os.fspath(url)
        self.group = group
        self.manifest = manifest
        self.layout = Layout.from_dict(manifest["layout"])
        self._direct: dict[str, ShardFormat | None] = {}  # array path -> its direct format, None: zarr's path

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create_or_resume(
        cls,
        url: str | os.PathLike,
        *,
        layout: Layout,
        manifest: Mapping[str, Any],
        sources: Sequence[Mapping[str, Any]],
        overwrite: bool = False,
    ) -> tuple[CacheWriter, bool]:
        """Create a cache at ``url``, or reopen one built with the same manifest (resume).

        Returns ``(writer, resumed)``. A cache whose manifest differs in anything but bookkeeping
        raises :class:`CacheMismatchError` naming each difference, unless ``overwrite`` is set,
        in which case the old cache is deleted first. Call on one process only (rank 0).
        """
        manifest = dict(manifest)
        manifest["layout"] = layout.to_dict()
        manifest.setdefault("schema_version", SCHEMA_VERSION)
        existing = _try_open_group(url)
        if existing is not None:
            old = existing.attrs.get(MANIFEST_KEY)
            if old is None and _interrupted_creation(existing):
                _logger.info("%s: finishing an interrupted creation", url)
            elif old is None:
                if not overwrite:
                    raise CacheMismatchError(
                        f"{url} exists and is not a feature cache; choose another OUT or pass --overwrite")
            else:
                diffs = manifest_diff(old, manifest)
                if not diffs:
                    return cls(url, zarr.open_group(url, mode="r+"), dict(old)), True
                if not overwrite:
                    raise CacheMismatchError(
                        f"{url} holds a cache built with other settings; rerun with the same settings to "
                        "resume, choose another OUT, or pass --overwrite to rebuild it:\n  " + "\n  ".join(diffs))
            _delete(url, existing)
        else:
            root = local_root(url)
            if root is not None and os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
                raise CacheError(f"{url} exists and is not a feature cache; refusing to write into it")
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest["complete"] = False
        group = zarr.open_group(url, mode="w-")
        group.create_array("latents", dtype="float16",
                           **_array_kwargs(layout, (layout.variants, LATENT_CHANNELS, layout.resolution // 8, layout.resolution // 8)))
        feats = group.create_group("features")
        for name, (tokens, dim) in layout.teachers.items():
            feats.create_array(name, dtype="float16", **_array_kwargs(layout, (layout.variants, tokens, dim)))
        group.create_array("labels", dtype="int32", shape=(layout.num_rows,), chunks=(layout.shard_rows,),
                           compressors=None, fill_value=-1)
        group.create_group("build")
        _put(group, "build/sources.json", json.dumps(list(sources), separators=(",", ":")).encode())
        group.attrs[MANIFEST_KEY] = manifest
        return cls(url, group, manifest), False

    @classmethod
    def open(cls, url: str | os.PathLike) -> CacheWriter:
        """Open a cache created by :meth:`create_or_resume` (the other ranks of a build)."""
        group = zarr.open_group(url, mode="r+")
        return cls(url, group, dict(group.attrs[MANIFEST_KEY]))

    # -- progress -------------------------------------------------------------------------
    def completed_shards(self) -> set[int]:
        done = set()
        for key in _list(self.group, "build/progress/"):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("shard-") and name.endswith(".json"):
                done.add(int(name[6:-5]))
        return done

    def sources(self) -> list[dict[str, Any]]:
        return json.loads(_get(self.group, "build/sources.json") or b"[]")

    def write_shard(
        self,
        shard: int,
        *,
        latents: np.ndarray,
        features: Mapping[str, np.ndarray],
        labels: np.ndarray,
        skipped: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Write every array of one shard, then its progress record (the commit point)."""
        lo, hi = self.layout.shard_rows_range(shard)
        n = hi - lo
        if latents.shape[0] != n or labels.shape[0] != n or any(f.shape[0] != n for f in features.values()):
            raise CacheError(f"shard {shard} holds rows {lo}..{hi}: expected {n} rows per array")
        if set(features) != set(self.layout.teachers):
            raise CacheError(f"shard {shard}: features for {sorted(features)}, cache has {sorted(self.layout.teachers)}")
        self._write_rows(self.group["latents"], shard, latents)
        for name, arr in features.items():
            self._write_rows(self.group["features"][name], shard, arr)
        self.group["labels"][lo:hi] = labels.astype(np.int32)
        record = {"shard": shard, "rows": [lo, hi], "skipped": list(skipped), "time": time.time()}
        _put(self.group, _progress_key(shard), json.dumps(record).encode())

    def _write_rows(self, array: Any, shard: int, data: np.ndarray) -> None:
        data = np.asarray(data, dtype=array.dtype)
        lo, hi = self.layout.shard_rows_range(shard)
        fmt = self._direct.get(array.path)
        if array.path not in self._direct:
            fmt, reason = choose_io(local_root(self.url), array)
            self._direct[array.path] = fmt
            log_io_choice("writes", self.url, array.path, fmt, reason)
        if fmt is not None:
            try:
                write_shard_file(os.path.join(local_root(self.url), array.path, fmt.shard_key(shard)), data, fmt)
                return
            except Exception as e:  # a layout this code does not know after all: zarr's own path is correct
                self._direct[array.path] = None
                log_io_choice("writes", self.url, array.path, None, f"a direct write failed ({type(e).__name__}: {e})",
                              fell_back=True)
        # zarr's own write; empty chunks stored too, so its shard bytes equal the direct writer's
        array.with_config({"write_empty_chunks": True})[lo:hi] = data

    def finalize(self, stats: Mapping[str, Any]) -> dict[str, Any]:
        """Check that every shard is present, gather the skip list, mark the manifest complete."""
        missing = sorted(set(range(self.layout.num_shards)) - self.completed_shards())
        if missing:
            raise CacheError(f"cannot finalize: {len(missing)} shards missing (first {missing[:5]})")
        skipped = []
        for shard in range(self.layout.num_shards):
            record = json.loads(_get(self.group, _progress_key(shard)))
            skipped += record["skipped"]
        manifest = dict(self.group.attrs[MANIFEST_KEY])
        manifest.update(complete=True, skipped=skipped, stats=dict(stats))
        self.group.attrs[MANIFEST_KEY] = manifest
        self.manifest = manifest
        return manifest

    def put_text(self, key: str, text: str) -> None:
        """Store a text record (resolved config) under ``build/``."""
        _put(self.group, f"build/{key}", text.encode())


def _interrupted_creation(group: zarr.Group) -> bool:
    """A group that a killed :meth:`CacheWriter.create_or_resume` left: our nodes only, no shard written."""
    names = {k.split("/")[0] for k in _list(group, "")}
    ours = {"zarr.json", "latents", "features", "labels", "build"}
    return names <= ours and not _list(group, "build/progress/")


def _try_open_group(url: str | os.PathLike) -> zarr.Group | None:
    try:
        return zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def _delete(url: str | os.PathLike, group: zarr.Group) -> None:
    root = local_root(url)
    if root is not None:
        shutil.rmtree(root)
    else:
        writable = zarr.open_group(url, mode="r+")
        sync(writable.store.delete_dir(writable.path))


# ---------------------------------------------------------------------------------------------
# Reader


class Cache:
    """A finished cache, opened for reading. Use :func:`open_cache`.

    Attributes:
        manifest: the build manifest (dict), see README "Cache layout".
        latents: zarr array (N, F, 8, R/8, R/8) float16 of posterior moments, all rows.
        features: dict teacher name -> zarr array (N, F, T, D) float16, all rows.
        labels: numpy int32 (N,); -1 on skipped rows.
        rows: numpy int64 ids of the rows that hold data, ascending; ``len(cache)`` counts them.
    """

    def __init__(self, url: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.url = os.fspath(url)
        group = _try_open_group(url)
        if group is None:
            raise CacheError(f"no cache at {self.url}")
        manifest = group.attrs.get(MANIFEST_KEY)
        if manifest is None:
            raise CacheError(f"{self.url} is a zarr group but not a feature cache (no '{MANIFEST_KEY}' attribute)")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{self.url} has cache schema {manifest.get('schema_version')}, this code reads {SCHEMA_VERSION}")
        if not manifest.get("complete") and not allow_incomplete:
            raise CacheError(f"{self.url} is incomplete: rerun the build command to finish it")
        self.group = group
        self.root = local_root(self.url)  # the local folder, None for other stores
        self.manifest: dict[str, Any] = dict(manifest)
        self.layout = Layout.from_dict(manifest["layout"])
        self.latents = group["latents"]
        self.features = {name: group["features"][name] for name in self.layout.teachers}
        self.labels = np.asarray(group["labels"][:])
        self.rows = np.flatnonzero(self.labels >= 0).astype(np.int64)
        self._sources: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"Cache({self.url!r}, rows={len(self)}/{self.layout.num_rows}, variants={self.num_variants}, "
                f"teachers={ {k: tuple(v) for k, v in self.layout.teachers.items()} })")

    @property
    def num_variants(self) -> int:
        return self.layout.variants

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["classes"])

    def source_path(self, row: int) -> str:
        """Path of the source image of ``row``, relative to the build's SOURCE folder."""
        if self._sources is None:
            self._sources = json.loads(_get(self.group, "build/sources.json") or b"[]")
        return self._sources[row]["path"]

    def progress_records(self) -> list[dict[str, Any]]:
        out = []
        for key in sorted(_list(self.group, "build/progress/")):
            out.append(json.loads(_get(self.group, key)))
        return out

    def nbytes_stored(self) -> dict[str, int]:
        return stored_bytes(self.group)

    def shard_paths(self) -> dict[str, list[str]]:
        """Local file of every stored shard, per array ('latents', 'features/<name>'); local caches only."""
        root = local_root(self.url)
        if root is None:
            raise CacheError(f"{self.url} is not a local folder")
        out = {}
        for name, arr in {"latents": self.latents, **{f"features/{k}": v for k, v in self.features.items()}}.items():
            paths = [os.path.join(root, arr.path, shard_key(arr, s)) for s in range(self.layout.num_shards)]
            out[name] = [p for p in paths if os.path.exists(p)]
        return out

    def loader(self, batch_size: int, **kwargs: Any):
        """A :class:`cache.loader.CacheLoader` over this cache; see its docstring for the options."""
        from .loader import CacheLoader

        return CacheLoader(self, batch_size, **kwargs)


def stored_bytes(group: zarr.Group) -> dict[str, int]:
    """Bytes stored per array of a cache group ('latents', 'labels', 'features/<name>')."""
    out = {"latents": int(group["latents"].nbytes_stored()), "labels": int(group["labels"].nbytes_stored())}
    for name, arr in group["features"].arrays():
        out[f"features/{name}"] = int(arr.nbytes_stored())
    return out


def open_cache(url: str | os.PathLike, *, allow_incomplete: bool = False) -> Cache:
    """Open a finished cache for reading (a local folder or any store URL zarr accepts)."""
    return Cache(url, allow_incomplete=allow_incomplete)
