"""The on-disk layout of a feature cache (zarr v3), its writer and its reader.

This module is the only code that knows the layout. One cache is one zarr v3 group::

    <root>/zarr.json                  group; attributes["urepa_cache"] holds the manifest
    <root>/latents                    (N, F, 8, R/8, R/8) float16: VAE posterior mean (4 ch), std (4 ch)
    <root>/features/<teacher>         (N, F, T, D) float16 or int8: teacher patch tokens after the final norm
    <root>/feature_scales/<teacher>   (N, F, T) float32: one scale per token, for int8 teachers only
                                      (tokens = int8 values x scale, see cache.quant)
    <root>/labels                     (N,) int32: class index; -1 marks a skipped source file
    <root>/build/                     group of build records (no sample data)
        urepa-cache.json              identity: written first at creation, removed first on deletion
        sources.json                  relative path and size of every source file, in row order
        progress/shard-000123.json    one record per finished shard, written after the shard's data,
                                      with the checksum of every object of the shard
        config.json, log.txt          resolved config and log of the builds (local stores)

Row i is source file i of the sorted listing; a file that could not be decoded keeps its row,
holds zeros and has label -1, and the reader never serves it. F indexes the variant: 0 as is,
1 mirrored left-right (present when built with ``--flip both``). All arrays share one row
sharding: one shard (one object per array) holds ``shard_rows`` rows, split into inner chunks of
``chunk_rows`` rows, uncompressed by default so that the loader can read single rows by byte
range (see :mod:`cache.loader`).

Identity. Creation writes ``build/urepa-cache.json`` (who created it and a random id) before anything
else, and deletion removes it first: a build deletes only what this marker proves its own (or, with
``--overwrite``, a readable zarr group), never a folder it merely finds. The id is also the manifest's
``generation``; a reader remembers it at open and :meth:`Cache.check_unchanged` notices a rebuild.

Checksums. Each progress record holds the :func:`cache.shardfile.checksum` of the bytes of every
object of its shard (one per array), taken from the bytes written (direct writes) or read back through
the store (zarr's writes). :func:`verify_shards` compares them, checks each shard index's crc32c and
that every object exists; ``pipeline.build --repair`` re-encodes the shards it names.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .config import nested_diff
from .manifest import SCHEMA_VERSION, Manifest, ManifestError
from .quant import SCALES_GROUP, quantize_tokens
from .shardfile import (
    ShardFormat,
    ShardIndexError,
    checksum,
    choose_io,
    decode_index,
    direct_format,
    log_io_choice,
    shard_index_nbytes,
    shard_key,
    write_shard_file,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_KEY",
    "Manifest",
    "CacheError",
    "CacheMismatchError",
    "CacheChangedError",
    "ShardDamage",
    "Layout",
    "CacheWriter",
    "Cache",
    "CacheReader",
    "FORMATS",
    "detect_format",
    "reader_manifest",
    "open_cache",
    "manifest_diff",
    "verify_shards",
]

MANIFEST_KEY = "urepa_cache"
LATENT_CHANNELS = 8  # posterior mean (4) and std (4) of the SD-VAE
ADDING_KEY = "adding"  # manifest entry: teachers being added to a finished cache, with their records
IDENTITY_KEY = "build/urepa-cache.json"  # the marker that proves a store is a cache this code created
CREATED_BY = "pipeline.build"
READER_KEYS = ("schema_version", "layout", "classes")  # manifest entries every reader needs
COMPRESSORS = ("none", "zstd")
TOKEN_DTYPES = ("float16", "int8")  # stored dtype of a teacher's tokens (int8: with float32 per-token scales)


class CacheError(RuntimeError):
    """The cache is missing, incomplete or malformed."""


class CacheMismatchError(CacheError):
    """An existing cache was built from another source, encoder or setting."""


class CacheChangedError(CacheError):
    """The cache was rebuilt or removed while it was being read."""


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
    feature_dtypes: Mapping[str, str] = field(default_factory=dict)  # name -> 'float16' | 'int8'; absent: float16

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
        for name, dtype in self.feature_dtypes.items():
            if name not in self.teachers:
                raise CacheError(f"a token dtype for {name!r}, which is not a teacher of the layout")
            if dtype not in TOKEN_DTYPES:
                raise CacheError(f"teacher {name!r}: token dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
        object.__setattr__(self, "feature_dtypes", {k: v for k, v in self.feature_dtypes.items() if v != "float16"})

    def feature_dtype(self, name: str) -> str:
        """The stored dtype of teacher ``name``'s tokens: 'float16' or 'int8' (with per-token scales)."""
        if name not in self.teachers:
            raise KeyError(name)
        return self.feature_dtypes.get(name, "float16")

    def quantized(self, name: str) -> bool:
        """Whether teacher ``name``'s tokens are int8 with a float32 scale per token."""
        return self.feature_dtype(name) == "int8"

    @property
    def quantized_teachers(self) -> list[str]:
        return [name for name in self.teachers if self.quantized(name)]

    def array_names(self) -> list[str]:
        """Every array with one object per shard: 'latents', 'features/<name>', 'feature_scales/<name>'
        (int8 teachers), 'labels'."""
        return ["latents", *(f"features/{k}" for k in self.teachers),
                *(f"{SCALES_GROUP}/{k}" for k in self.quantized_teachers), "labels"]

    def row_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape of one row, dtype) of every array of :meth:`array_names`."""
        h = self.resolution // 8
        return {"latents": ((self.variants, LATENT_CHANNELS, h, h), "float16"),
                **{f"features/{k}": ((self.variants, *self.teachers[k]), self.feature_dtype(k)) for k in self.teachers},
                **{f"{SCALES_GROUP}/{k}": ((self.variants, self.teachers[k][0]), "float32")
                   for k in self.quantized_teachers},
                "labels": ((), "int32")}

    def nbytes(self) -> dict[str, int]:
        """Bytes of each array's objects in an uncompressed cache of this layout (zarr's ``zarr.json``
        documents aside): per sharded array the inner chunks that hold rows (the last one padded to
        ``chunk_rows``) plus every shard's index; for ``labels`` one chunk of ``shard_rows`` per shard.
        Measured against a written cache in tests/test_store.py."""
        if self.compressor != "none":
            raise CacheError(f"nbytes: the size of a {self.compressor}-compressed cache depends on its data")
        out = {}
        chunks = -(-self.num_rows // self.chunk_rows)
        for name, (shape, dtype) in self.row_shapes().items():
            row = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if name == "labels":
                out[name] = self.num_shards * self.shard_rows * row
            else:
                out[name] = (chunks * self.chunk_rows * row
                             + self.num_shards * shard_index_nbytes(self.shard_rows // self.chunk_rows))
        return out

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
            "dtypes": {"latents": "float16", "features": {k: self.feature_dtype(k) for k in self.teachers},
                       **({"feature_scales": "float32"} if self.quantized_teachers else {}), "labels": "int32"},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        teachers = {k: tuple(v) for k, v in d["teachers"].items()}
        stored = (d.get("dtypes") or {}).get("features", "float16")  # one name for all (older caches) or per teacher
        dtypes = {k: stored for k in teachers} if isinstance(stored, str) else dict(stored)
        return cls(
            num_rows=d["num_rows"], resolution=d["resolution"], variants=d["variants"], teachers=teachers,
            shard_rows=d["shard_rows"], chunk_rows=d["chunk_rows"], compressor=d["compressor"],
            feature_dtypes={k: v for k, v in dtypes.items() if v != "float16"},  # before the check of the names
        )


def manifest_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Each manifest entry that differs, ignoring bookkeeping (time, versions, skips, generation): its
    dotted name and both values in full, or for two lists the items that differ."""
    return [f"{name}: {_describe(a, b)}" for name, a, b in nested_diff(old, new, skip=frozenset(Manifest.VOLATILE))]


def _describe(old: Any, new: Any, *, most: int = 3) -> str:
    if not (isinstance(old, list) and isinstance(new, list)):
        return f"cache has {json.dumps(old)}, this run has {json.dumps(new)}"
    import difflib

    a, b = [json.dumps(x) for x in old], [json.dumps(x) for x in new]
    changes = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "insert":
            changes += [f"added {b[j]} at position {j}" for j in range(j1, j2)]
        elif op == "delete":
            changes += [f"removed {a[i]} from position {i}" for i in range(i1, i2)]
        elif op == "replace":
            changes += [f"{a[i]} became {b[j]} at position {j}" for i, j in zip(range(i1, i2), range(j1, j2))]
            changes += [f"added {b[j]} at position {j}" for j in range(j1 + i2 - i1, j2)]
            changes += [f"removed {a[i]} from position {i}" for i in range(i1 + j2 - j1, i2)]
    more = f" and {len(changes) - most} more" if len(changes) > most else ""
    return f"{len(old)} items in the cache, {len(new)} in this run: " + "; ".join(changes[:most]) + more


# ---------------------------------------------------------------------------------------------
# Raw keys (build records) through the zarr store, so any store zarr supports works.


def _store_and_prefix(group: zarr.Group) -> tuple[Any, str]:
    prefix = group.path + "/" if group.path else ""
    return group.store, prefix


def _store_set(store: Any, key: str, data: bytes) -> None:
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def _store_get(store: Any, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _store_list(store: Any, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(collect())


def _store_delete(store: Any, key: str) -> None:
    if sync(store.exists(key)):
        sync(store.delete(key))


def _put(group: zarr.Group, key: str, data: bytes) -> None:
    store, prefix = _store_and_prefix(group)
    _store_set(store, prefix + key, data)


def _get(group: zarr.Group, key: str) -> bytes | None:
    store, prefix = _store_and_prefix(group)
    return _store_get(store, prefix + key)


def _list(group: zarr.Group, prefix_key: str) -> list[str]:
    store, prefix = _store_and_prefix(group)
    return [k[len(prefix):] for k in _store_list(store, prefix + prefix_key)]


def _store_for(url: str | os.PathLike) -> Any:
    """A writable zarr store at ``url`` (which need not exist yet), for the keys written before the group."""
    root = local_root(url)
    if root is not None:
        return zarr.storage.LocalStore(root)
    return zarr.storage.FsspecStore.from_url(os.fspath(url))


def _where(url: str | os.PathLike, key: str) -> str:
    """The file (local caches) or URL of the object ``key`` of the cache at ``url``, for messages."""
    root = local_root(url)
    return os.path.join(root, *key.split("/")) if root is not None else f"{os.fspath(url).rstrip('/')}/{key}"


def _identity(store: Any) -> dict[str, Any] | None:
    """The creation marker of a cache this code created, or None (absent, unreadable or someone else's)."""
    try:
        raw = _store_get(store, IDENTITY_KEY)
        marker = json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("created_by") == CREATED_BY and isinstance(marker.get("id"), str):
        return marker
    return None


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


def manifest_channel_scales(manifest: Manifest, name: str, layout: Layout,
                            pending: Mapping[str, Any] | None = None) -> np.ndarray | None:
    """Teacher ``name``'s channel scales as float32 (D,) from its manifest record (or, for a teacher being
    added, its pending record); None for a float16 teacher or a record without them."""
    if name not in layout.teachers or not layout.quantized(name):
        return None
    if pending and name in pending:
        values = (pending[name].get("record") or {}).get("channel_scales")
    else:
        info = manifest.teacher(name)
        values = None if info is None else info.channel_scales
    if values is None:
        return None
    out = np.asarray(values, dtype=np.float32)
    if out.shape != (layout.teachers[name][1],) or not np.isfinite(out).all() or (out <= 0).any():
        raise CacheError(f"teacher {name!r}: the channel scales in the manifest are not {layout.teachers[name][1]} "
                         "positive finite numbers: the manifest is damaged; rebuild the cache")
    return out


def _keep_calibration(old: Mapping[str, Any], new: dict[str, Any]) -> None:
    """Give the run's manifest ``new`` the channel scales the cache ``old`` already holds for the same teachers
    (finished or being added): they were measured once, when the teacher was first encoded, and a rerun must
    quantise as the first run did (a GPU may measure the last bits differently)."""
    stored = {k: v.get("channel_scales") for k, v in (old.get("teachers") or {}).items() if isinstance(v, Mapping)}
    stored.update({k: (v.get("record") or {}).get("channel_scales")
                   for k, v in (old.get(ADDING_KEY) or {}).items() if isinstance(v, Mapping)})
    for name, record in (new.get("teachers") or {}).items():
        if isinstance(record, dict) and stored.get(name) is not None and "channel_scales" in record:
            record["channel_scales"] = stored[name]


def _create_array(group: zarr.Group, layout: Layout, name: str) -> None:
    """The sharded array ``name`` of :meth:`Layout.row_shapes` ('latents', 'features/<t>', ...) in a cache group."""
    shape, dtype = layout.row_shapes()[name]
    parent, _, leaf = name.rpartition("/")
    (group.require_group(parent) if parent else group).create_array(leaf, dtype=dtype, **_array_kwargs(layout, shape))


def _create_teacher_arrays(group: zarr.Group, layout: Layout, name: str) -> None:
    """The token array of teacher ``name`` (and for int8 tokens its scales) in a cache group."""
    _create_array(group, layout, f"features/{name}")
    if layout.quantized(name):
        _create_array(group, layout, f"{SCALES_GROUP}/{name}")


def _progress_key(shard: int) -> str:
    return f"build/progress/shard-{shard:06d}.json"


def _addition_key(shard: int) -> str:
    """The record of a shard whose tokens of the teachers being added are written."""
    return f"build/adding/shard-{shard:06d}.json"


def _put_delete(group: zarr.Group, key: str) -> None:
    store, prefix = _store_and_prefix(group)
    _store_delete(store, prefix + key)


def _has_array(group: zarr.Group, name: str) -> bool:
    try:
        group[name]
    except KeyError:
        return False
    return True


def _delete_teacher_arrays(group: zarr.Group, name: str) -> None:
    """Delete the token (and scale) arrays of teacher ``name`` from a cache group, where they exist."""
    store, prefix = _store_and_prefix(group)
    for sub in ("features", SCALES_GROUP):
        sync(store.delete_dir(f"{prefix}{sub}/{name}"))


def _with_teachers(layout: Layout, pending: Mapping[str, Mapping[str, Any]]) -> Layout:
    """``layout`` with the teachers of an addition (name -> {tokens, dim, dtype, record}) appended."""
    if not pending:
        return layout
    return dataclasses.replace(
        layout, teachers={**layout.teachers, **{k: (v["tokens"], v["dim"]) for k, v in pending.items()}},
        feature_dtypes={**layout.feature_dtypes, **{k: v["dtype"] for k, v in pending.items()}})


_PER_RUN = ("encode", "dtype", "channel_scales")  # a teacher record's entries that belong to the run that encoded it


def _addition(url: str | os.PathLike, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """When the run whose manifest is ``new`` names every teacher of the cache ``old`` and more, and agrees
    with it on everything else: the teachers to add (name -> {tokens, dim, dtype, record}); None when the
    run adds no teacher. A run that adds teachers but differs in anything else, a cache that is not
    finished, or an unfinished addition of other teachers or settings is refused (CacheMismatchError).

    The teachers already in the cache are compared by what they are (spec, weights, position table, ...),
    not by the settings of the run that encoded them (``encode``, ``dtype``): those are theirs, and this
    run's apply to the added teachers alone; so is the cache's ``encode`` record (the first build's)."""
    old_teachers, new_teachers = old["layout"]["teachers"], new["layout"]["teachers"]
    if not set(old_teachers) < set(new_teachers):
        return None
    added = [k for k in new_teachers if k not in old_teachers]
    projected = json.loads(json.dumps(new))
    lay = projected["layout"]
    lay["teachers"] = {k: lay["teachers"][k] for k in old_teachers}
    lay["dtypes"] = old["layout"].get("dtypes")
    records = projected.get("teachers") or {}
    projected["teachers"] = {}
    for k in old_teachers:
        if k not in records and k not in (old.get("teachers") or {}):
            continue
        rec = {e: v for e, v in records.get(k, {}).items() if e not in _PER_RUN}
        rec.update({e: v for e, v in (old.get("teachers") or {}).get(k, {}).items() if e in _PER_RUN})
        projected["teachers"][k] = rec
    for key in ("encode", ADDING_KEY):
        projected.pop(key, None)
        if key in old:
            projected[key] = old[key]
    diffs = manifest_diff(old, projected)
    where = os.fspath(url)
    if diffs:
        raise CacheMismatchError(
            f"{where}: this run adds teacher(s) {', '.join(added)}, but differs from the cache in more than its "
            "teachers; run it with the cache's settings, choose another OUT, or pass --overwrite to rebuild:\n  "
            + "\n  ".join(diffs))
    if not old.get("complete"):
        raise CacheMismatchError(
            f"{where} is not finished: rerun its build with its own teachers "
            f"({', '.join(old_teachers)}) to finish it, then add {', '.join(added)}")
    layout = Layout.from_dict(new["layout"])
    adding = {k: {"tokens": new_teachers[k][0], "dim": new_teachers[k][1], "dtype": layout.feature_dtype(k),
                  "record": (new.get("teachers") or {}).get(k, {})} for k in added}
    pending = old.get(ADDING_KEY)
    if pending is not None and pending != adding:
        drop = " ".join(f"--drop-teacher {k}" for k in pending)
        raise CacheMismatchError(
            f"{where} has an unfinished addition of teacher(s) {', '.join(pending)} with other teachers or settings "
            f"than this run's ({', '.join(added)}): rerun that addition's command to finish it, or drop it with "
            f"`python -m cache.edit {where} {drop}`:\n  "
            + "\n  ".join(f"{name}: {_describe(a, b)}" for name, a, b in nested_diff(pending, adding)))
    return adding


def _data_arrays(group: zarr.Group, layout: Layout) -> dict[str, Any]:
    """Every array with one object per shard (:meth:`Layout.array_names`), by name."""
    return {name: group[name] for name in layout.array_names()}


@dataclass(frozen=True)
class ShardDamage:
    """One damaged object of a finished shard, as :func:`verify_shards` finds it."""

    shard: int
    array: str  # 'latents', 'features/<name>', 'labels', or 'progress' (the shard's record)
    where: str  # the object's file (local caches) or URL
    problem: str

    def __str__(self) -> str:
        return f"{self.array} shard {self.shard} ({self.where}): {self.problem}"


def verify_shards(group: zarr.Group, url: str | os.PathLike, layout: Layout) -> list[ShardDamage]:
    """Check every shard that has a progress record: each array's object exists, its bytes match the
    checksum recorded when it was written (records from before checksums: not checked), its shard index
    passes its crc32c. Reads every object once, whole, through the store."""
    store = group.store
    arrays = _data_arrays(group, layout)
    out = []
    for key in sorted(_list(group, "build/progress/")):
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith("shard-") and name.endswith(".json")):
            continue
        shard = int(name[6:-5])
        try:
            record = json.loads(_get(group, key) or b"")
            sums = record.get("checksums") or {}
        except (ValueError, AttributeError) as e:
            out.append(ShardDamage(shard, "progress", _where(url, key), f"the record is not readable JSON ({e})"))
            continue
        for array_name, arr in arrays.items():
            obj = f"{arr.path}/{shard_key(arr, shard)}"
            problem = _object_problem(arr, _store_get(store, obj), sums.get(array_name))
            if problem:
                out.append(ShardDamage(shard, array_name, _where(url, obj), problem))
    return out


def _object_problem(array: Any, data: bytes | None, recorded: str | None) -> str | None:
    if data is None:
        return "the file is missing"
    if recorded is not None:
        got = checksum(data)
        if got != recorded:
            return f"its {len(data)} bytes fail the checksum recorded when it was written ({got}, recorded {recorded})"
    fmt, _ = direct_format(array)
    if fmt is not None:
        try:
            decode_index(fmt, data[-fmt.index_nbytes:], file_size=len(data), what="the file")
        except ShardIndexError as e:
            return str(e).removeprefix("the file: ")
    return None


# ---------------------------------------------------------------------------------------------
# Writer


class CacheWriter:
    """Writes whole shards of a cache; one per process in a distributed build.

    Every write unit is a shard (one object per array), so ranks never share an object. A shard's
    progress record is written after all of its data, which makes "record present" mean "data
    complete" for any interruption; a shard without a record is simply written again.
    """

    def __init__(self, url: str | os.PathLike, group: zarr.Group, manifest: Manifest) -> None:
        self.url = os.fspath(url)
        self.group = group
        self.manifest = manifest
        pending = manifest.extra.get(ADDING_KEY) or {}
        #: Teachers being added to this finished cache (their tokens alone are written); () for a build.
        self.adding: tuple[str, ...] = tuple(pending)
        #: The layout the writes fill: the manifest's, plus the teachers being added.
        self.layout = _with_teachers(manifest.layout, pending)
        self._direct: dict[str, ShardFormat | None] = {}  # array path -> its direct format, None: zarr's path

    def channel_scales(self, name: str) -> np.ndarray | None:
        """The channel scales teacher ``name``'s int8 tokens are written with (None: ones, or float16)."""
        return manifest_channel_scales(self.manifest, name, self.layout, self.manifest.extra.get(ADDING_KEY))

    @property
    def teachers_to_encode(self) -> list[str]:
        """The teachers whose tokens this run writes: those being added, or all of them."""
        return list(self.adding) if self.adding else list(self.layout.teachers)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create_or_resume(
        cls,
        url: str | os.PathLike,
        *,
        layout: Layout,
        manifest: Manifest | Mapping[str, Any],
        sources: Sequence[Mapping[str, Any]],
        overwrite: bool = False,
    ) -> tuple[CacheWriter, bool]:
        """Create a cache at ``url``, or reopen one built with the same manifest (resume).

        Returns ``(writer, resumed)``. A cache whose manifest differs in anything but bookkeeping
        raises :class:`CacheMismatchError` naming each difference, unless ``overwrite`` is set,
        in which case the old cache is deleted first. A run that names every teacher of a finished
        cache and more, and agrees with it on everything else, adds the new teachers: the writer's
        :attr:`adding` lists them, and only their tokens are written (``resumed``: an earlier run began
        this addition). Call on one process only (rank 0). ``manifest``
        is a :class:`Manifest` or its JSON form (its layout is replaced by ``layout``).
        """
        manifest = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
        manifest["layout"] = layout.to_dict()
        manifest.setdefault("schema_version", SCHEMA_VERSION)
        try:
            manifest = Manifest.from_dict(manifest).to_dict()  # as every reader will see it
        except ManifestError as e:
            raise CacheError(f"{url}: the manifest to write is malformed: {e}") from None
        store = _store_for(url)
        ours = _identity(store) is not None
        existing, unreadable = _probe_group(url)
        if existing is not None:
            old = existing.attrs.get(MANIFEST_KEY)
            if old is None and ours:
                _logger.info("%s: finishing an interrupted creation", url)
            elif old is None:
                if not overwrite:
                    raise CacheMismatchError(
                        f"{url} holds a zarr group that is not a feature cache this program created; choose another "
                        "OUT, or pass --overwrite to delete it")
            elif not isinstance(old, Mapping):
                if not overwrite:
                    raise CacheMismatchError(f"{url} holds a damaged cache (its manifest is not a JSON object); "
                                             "pass --overwrite to rebuild it, or choose another OUT")
            else:
                try:
                    old = Manifest.from_dict(old).to_dict()  # compared as every reader sees it
                except ManifestError:
                    pass
                _keep_calibration(old, manifest)
                if (ADDING_KEY in old and not overwrite
                        and set(old["layout"]["teachers"]) == set(manifest["layout"]["teachers"])):
                    pending = ", ".join(old[ADDING_KEY])
                    raise CacheMismatchError(
                        f"{url} is finished but has an unfinished addition of teacher(s) {pending}: rerun that "
                        f"addition's command (its --teacher lists them) to finish it, or drop it with "
                        f"`python -m cache.edit {url} --drop-teacher NAME`")
                diffs = manifest_diff(old, manifest)
                if not diffs:
                    return cls(url, zarr.open_group(url, mode="r+"), _typed(url, old)), True
                try:
                    addition = _addition(url, old, manifest)
                except CacheMismatchError:
                    if not overwrite:
                        raise
                    addition = None
                if addition is not None:
                    return cls._begin_addition(url, old, addition), ADDING_KEY in old
                if not overwrite:
                    have, want = list(old["layout"]["teachers"]), list(manifest["layout"]["teachers"])
                    hint = ""
                    if set(have) != set(want):
                        hint = (f" (the cache holds teachers {', '.join(have)}: to add teachers, list those too, e.g. "
                                f"--teacher {','.join(have + [t for t in want if t not in have])}; to remove one, "
                                f"`python -m cache.edit {url} --drop-teacher NAME`)")
                    raise CacheMismatchError(
                        f"{url} holds a cache built with other settings{hint}; rerun with the same settings to "
                        "resume, choose another OUT, or pass --overwrite to rebuild it:\n  " + "\n  ".join(diffs))
            _delete(url, store)
        elif unreadable is not None:
            if not ours:
                raise CacheError(
                    f"{url} is not a readable zarr group ({unreadable}) and carries no mark of a cache this "
                    "program created; refusing to write into it, even with --overwrite: choose another OUT or "
                    "remove it yourself")
            if not overwrite:
                raise CacheMismatchError(f"{url} holds a damaged cache ({unreadable}); pass --overwrite to rebuild "
                                         "it, or choose another OUT")
            _delete(url, store)
        elif ours:
            _logger.info("%s: finishing an interrupted creation", url)
            _delete(url, store)
        elif not _is_empty(url, store):
            raise CacheError(f"{url} exists and is not a feature cache; refusing to write into it")
        # The marker goes first: from here on, whatever a killed creation leaves is provably ours.
        generation = uuid.uuid4().hex
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest["complete"] = False
        manifest["generation"] = generation
        marker = {"created_by": CREATED_BY, "id": generation, "created": manifest["created"]}
        _store_set(store, IDENTITY_KEY, json.dumps(marker).encode())
        group = zarr.open_group(store, mode="a")
        _create_array(group, layout, "latents")
        group.create_group("features")
        for name in layout.teachers:
            _create_teacher_arrays(group, layout, name)
        group.create_array("labels", dtype="int32", shape=(layout.num_rows,), chunks=(layout.shard_rows,),
                           compressors=None, fill_value=-1)
        group.create_group("build")
        _put(group, "build/sources.json", json.dumps(list(sources), separators=(",", ":")).encode())
        group.attrs[MANIFEST_KEY] = manifest
        return cls(url, group, _typed(url, manifest)), False

    @classmethod
    def _begin_addition(cls, url: str | os.PathLike, old: dict[str, Any], adding: dict[str, Any]) -> CacheWriter:
        """Record the teachers to add in the manifest (first: from then on their arrays are provably ours),
        then create their arrays. A resumed addition keeps its arrays and progress records."""
        group = zarr.open_group(url, mode="r+")
        fresh = ADDING_KEY not in old
        if fresh:
            _logger.info("%s: adding teacher(s) %s to the finished cache", url, ", ".join(adding))
            for key in _list(group, "build/adding/"):  # left by an addition that was dropped: not this one's
                _put_delete(group, key)
            group.attrs[MANIFEST_KEY] = {**old, ADDING_KEY: adding}
            old = group.attrs[MANIFEST_KEY]
        else:
            _logger.info("%s: resuming the addition of teacher(s) %s", url, ", ".join(adding))
        writer = cls(url, group, _typed(url, old))
        for name in adding:
            wanted = [f"features/{name}", *([f"{SCALES_GROUP}/{name}"] if writer.layout.quantized(name) else [])]
            if not fresh and all(_has_array(group, a) for a in wanted):
                continue
            _delete_teacher_arrays(group, name)  # a dropped teacher's arrays left by a killed drop
            _create_teacher_arrays(group, writer.layout, name)
        return writer

    @classmethod
    def drop_teacher(cls, url: str | os.PathLike, name: str) -> Manifest:
        """Remove teacher ``name`` from a finished cache (or a teacher being added) without touching the
        other arrays: the manifest first (readers opened from then on do not see it), then its arrays,
        then its checksums in the progress records. Returns the new manifest."""
        store = _store_for(url)
        group, unreadable = _probe_group(url)
        if group is None or _identity(store) is None:
            raise CacheError(f"{os.fspath(url)} is not a cache this program created"
                             + (f" ({unreadable})" if unreadable else ""))
        group = zarr.open_group(url, mode="r+")
        stored = group.attrs.get(MANIFEST_KEY)
        manifest = _typed(url, stored)
        pending = dict(manifest.extra.get(ADDING_KEY) or {})
        teachers = list(manifest.layout.teachers)
        if name in pending:
            del pending[name]
            new = {k: v for k, v in stored.items() if k != ADDING_KEY}
            if pending:
                new[ADDING_KEY] = pending
        elif name in teachers:
            if not manifest.is_complete:
                raise CacheError(f"{os.fspath(url)} is not finished: rerun its build command first, then drop "
                                 f"teacher {name!r}")
            lay = manifest.layout
            layout = dataclasses.replace(lay, teachers={k: v for k, v in lay.teachers.items() if k != name},
                                         feature_dtypes={k: v for k, v in lay.feature_dtypes.items() if k != name})
            new = {**stored, "layout": layout.to_dict(),
                   "teachers": {k: v for k, v in (stored.get("teachers") or {}).items() if k != name}}
        else:
            raise CacheError(f"{os.fspath(url)} has no teacher {name!r}; it holds {teachers}"
                             + (f" and is adding {sorted(pending)}" if pending else ""))
        new = _typed(url, new).to_dict()
        group.attrs[MANIFEST_KEY] = new
        _delete_teacher_arrays(group, name)
        if not pending:
            for key in _list(group, "build/adding/"):
                _put_delete(group, key)
        gone = {f"features/{name}", f"{SCALES_GROUP}/{name}"}
        for key in _list(group, "build/progress/"):
            record = json.loads(_get(group, key) or b"{}")
            sums = record.get("checksums") or {}
            if gone & set(sums):
                record["checksums"] = {k: v for k, v in sums.items() if k not in gone}
                _put(group, key, json.dumps(record).encode())
        return _typed(url, new)

    @classmethod
    def open(cls, url: str | os.PathLike) -> CacheWriter:
        """Open a cache created by :meth:`create_or_resume` (the other ranks of a build)."""
        group = zarr.open_group(url, mode="r+")
        return cls(url, group, _typed(url, group.attrs[MANIFEST_KEY]))

    # -- progress -------------------------------------------------------------------------
    def completed_shards(self) -> set[int]:
        """Shards whose data this writer's job has written: all of a build's arrays, or while adding
        teachers, the tokens of every teacher being added."""
        done = set()
        for key in _list(self.group, "build/adding/" if self.adding else "build/progress/"):
            name = key.rsplit("/", 1)[-1]
            if not (name.startswith("shard-") and name.endswith(".json")):
                continue
            if self.adding:
                record = json.loads(_get(self.group, key) or b"{}")
                if not set(self.adding) <= set(record.get("teachers") or ()):
                    continue
            done.add(int(name[6:-5]))
        return done

    def sources(self) -> list[dict[str, Any]]:
        return json.loads(_get(self.group, "build/sources.json") or b"[]")

    def write_shard(
        self,
        shard: int,
        *,
        latents: np.ndarray | None = None,
        features: Mapping[str, np.ndarray],
        labels: np.ndarray | None = None,
        skipped: Iterable[Mapping[str, Any]] = (),
        scales: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write every array of one shard, then its progress record (the commit point).

        ``features`` maps each teacher to its tokens (n, F, T, D): float16 for a float16 teacher; for an
        int8 teacher either int8 values with their float32 ``scales[name]`` (n, F, T), or float tokens,
        which are quantised here (:func:`cache.quant.quantize_tokens`).

        While adding teachers (:attr:`adding`), ``features`` holds the added teachers alone and
        ``latents``, ``labels`` and ``skipped`` are not given: the shard's record of the addition is written
        after its tokens."""
        lo, hi = self.layout.shard_rows_range(shard)
        n = hi - lo
        if self.adding:
            if latents is not None or labels is not None or set(features) != set(self.adding):
                raise CacheError(f"shard {shard}: adding {sorted(self.adding)} writes their tokens alone, got "
                                 f"{sorted(features)}{' and latents/labels' if latents is not None or labels is not None else ''}")
            if any(f.shape[0] != n for f in features.values()):
                raise CacheError(f"shard {shard} holds rows {lo}..{hi}: expected {n} rows per array")
            sums = {}
            for name, arr in features.items():
                sums.update(self._write_tokens(name, shard, arr, (scales or {}).get(name)))
            record = {"shard": shard, "teachers": sorted(self.adding), "time": time.time(), "checksums": sums}
            _put(self.group, _addition_key(shard), json.dumps(record).encode())
            return
        if latents is None or labels is None:
            raise CacheError(f"shard {shard}: a build writes latents, labels and every teacher's tokens")
        if latents.shape[0] != n or labels.shape[0] != n or any(f.shape[0] != n for f in features.values()):
            raise CacheError(f"shard {shard} holds rows {lo}..{hi}: expected {n} rows per array")
        if set(features) != set(self.layout.teachers):
            raise CacheError(f"shard {shard}: features for {sorted(features)}, cache has {sorted(self.layout.teachers)}")
        sums = {"latents": self._write_rows(self.group["latents"], shard, latents)}
        for name, arr in features.items():
            sums.update(self._write_tokens(name, shard, arr, (scales or {}).get(name)))
        labels_array = self.group["labels"]
        labels_array.with_config({"write_empty_chunks": True})[lo:hi] = labels.astype(np.int32)
        sums["labels"] = self._stored_checksum(labels_array, shard)
        record = {"shard": shard, "rows": [lo, hi], "skipped": list(skipped), "time": time.time(), "checksums": sums}
        _put(self.group, _progress_key(shard), json.dumps(record).encode())

    def _write_tokens(self, name: str, shard: int, tokens: np.ndarray, scales: np.ndarray | None) -> dict[str, str]:
        """Write one teacher's tokens of a shard (and its scales); returns the checksum of each object."""
        tokens = np.asarray(tokens)
        if not self.layout.quantized(name):
            if scales is not None or not np.issubdtype(tokens.dtype, np.floating):
                raise CacheError(f"shard {shard}: {tokens.dtype} tokens{' with scales' if scales is not None else ''} "
                                 f"for {name!r}, whose tokens are stored in float16: give float tokens")
            return {f"features/{name}": self._write_rows(self.group["features"][name], shard, tokens)}
        if tokens.dtype != np.int8:
            if scales is not None:
                raise CacheError(f"shard {shard}: scales given with {tokens.dtype} tokens for {name!r}; give int8 "
                                 "values with their scales, or float tokens alone (quantised here)")
            channels = self.channel_scales(name)
            q, s = quantize_tokens(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32)),
                                   None if channels is None else torch.from_numpy(channels))
            tokens, scales = q.numpy(), s.numpy()
        elif scales is None:
            raise CacheError(f"shard {shard}: int8 tokens for {name!r} without their scales")
        if tuple(np.shape(scales)) != tokens.shape[:-1]:
            raise CacheError(f"shard {shard}: scales of {name!r} have shape {tuple(np.shape(scales))}, tokens "
                             f"{tokens.shape}: one scale per token expected")
        key = f"{SCALES_GROUP}/{name}"
        return {f"features/{name}": self._write_rows(self.group["features"][name], shard, tokens),
                key: self._write_rows(self.group[key], shard, np.asarray(scales, dtype=np.float32))}

    def _stored_checksum(self, array: Any, shard: int) -> str:
        """The checksum of a shard object as the store holds it (read back after zarr's own write)."""
        key = f"{array.path}/{shard_key(array, shard)}"
        data = _store_get(self.group.store, key)
        if data is None:
            raise CacheError(f"{_where(self.url, key)}: zarr stored no object for shard {shard} of {array.path}")
        return checksum(data)

    def _write_rows(self, array: Any, shard: int, data: np.ndarray) -> str:
        """Write the shard's rows of one array; returns the checksum of the stored object."""
        data = np.asarray(data, dtype=array.dtype)
        lo, hi = self.layout.shard_rows_range(shard)
        fmt = self._direct.get(array.path)
        if array.path not in self._direct:
            fmt, reason = choose_io(local_root(self.url), array)
            self._direct[array.path] = fmt
            log_io_choice("writes", self.url, array.path, fmt, reason)
        if fmt is not None:
            try:
                return write_shard_file(os.path.join(local_root(self.url), array.path, fmt.shard_key(shard)), data, fmt)
            except Exception as e:  # a layout this code does not know after all: zarr's own path is correct
                self._direct[array.path] = None
                log_io_choice("writes", self.url, array.path, None, f"a direct write failed ({type(e).__name__}: {e})",
                              fell_back=True)
        # zarr's own write; empty chunks stored too, so its shard bytes equal the direct writer's
        array.with_config({"write_empty_chunks": True})[lo:hi] = data
        return self._stored_checksum(array, shard)

    def finalize(self, stats: Mapping[str, Any]) -> Manifest:
        """Check that every shard is present, gather the skip list, mark the manifest complete. While adding
        teachers: move each shard's checksums of the added arrays into its progress record, then list the
        teachers in the manifest (the commit point), then remove the records of the addition."""
        missing = sorted(set(range(self.layout.num_shards)) - self.completed_shards())
        if missing:
            raise CacheError(f"cannot finalize: {len(missing)} shards missing (first {missing[:5]})")
        if self.adding:
            return self._finish_addition()
        skipped = []
        for shard in range(self.layout.num_shards):
            record = json.loads(_get(self.group, _progress_key(shard)))
            skipped += record["skipped"]
        manifest = dict(self.group.attrs[MANIFEST_KEY])
        manifest.update(complete=True, skipped=skipped, stats=dict(stats))
        self.manifest = _typed(self.url, manifest)
        self.group.attrs[MANIFEST_KEY] = self.manifest.to_dict()
        return self.manifest

    def _finish_addition(self) -> Manifest:
        for shard in range(self.layout.num_shards):
            added = json.loads(_get(self.group, _addition_key(shard)))
            record = json.loads(_get(self.group, _progress_key(shard)))
            record["checksums"] = {**record.get("checksums", {}), **added["checksums"]}
            _put(self.group, _progress_key(shard), json.dumps(record).encode())
        stored = dict(self.group.attrs[MANIFEST_KEY])
        pending = stored.pop(ADDING_KEY)
        stored["layout"] = self.layout.to_dict()
        stored["teachers"] = {**(stored.get("teachers") or {}), **{k: v["record"] for k, v in pending.items()}}
        self.manifest = _typed(self.url, stored)
        self.group.attrs[MANIFEST_KEY] = self.manifest.to_dict()
        for key in _list(self.group, "build/adding/"):
            _put_delete(self.group, key)
        _logger.info("%s: added teacher(s) %s", self.url, ", ".join(self.adding))
        self.adding = ()
        return self.manifest

    def forget_damaged(self) -> list[ShardDamage]:
        """Verify every finished shard (:func:`verify_shards`) and forget the damaged ones, so that the
        resume path encodes them again: the manifest is marked incomplete first, then each damaged
        shard's progress record is deleted, then its objects. Returns the damage found."""
        if self.adding:
            raise CacheError(f"{self.url} is adding teacher(s) {', '.join(self.adding)}: finish that (rerun its command) "
                             "or drop it (`python -m cache.edit ... --drop-teacher NAME`) before --repair")
        damage = verify_shards(self.group, self.url, self.layout)
        shards = sorted({d.shard for d in damage})
        if shards and self.manifest.is_complete:
            manifest = dict(self.group.attrs[MANIFEST_KEY])
            manifest["complete"] = False
            self.manifest = _typed(self.url, manifest)
            self.group.attrs[MANIFEST_KEY] = self.manifest.to_dict()
        store = self.group.store
        arrays = _data_arrays(self.group, self.layout)
        for shard in shards:
            _store_delete(store, _progress_key(shard))
            for arr in arrays.values():
                _store_delete(store, f"{arr.path}/{shard_key(arr, shard)}")
        return damage

    def put_text(self, key: str, text: str) -> None:
        """Store a text record (resolved config) under ``build/``."""
        _put(self.group, f"build/{key}", text.encode())


def _typed(url: str | os.PathLike, manifest: Any) -> Manifest:
    try:
        return Manifest.from_dict(manifest)
    except ManifestError as e:
        raise CacheError(f"{os.fspath(url)}: the manifest ({_where(url, 'zarr.json')}) is malformed: {e}; rebuild "
                         "the cache with --overwrite") from None


def _probe_group(url: str | os.PathLike) -> tuple[zarr.Group | None, str | None]:
    """(the zarr group at ``url``, None), (None, None) where there is none, or (None, why it is unreadable)."""
    try:
        return zarr.open_group(url, mode="r"), None
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None, None
    except Exception as e:  # garbage zarr.json and the like
        return None, f"{_where(url, 'zarr.json')} cannot be read: {type(e).__name__}: {e}"


def _is_empty(url: str | os.PathLike, store: Any) -> bool:
    root = local_root(url)
    if root is not None:
        return not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root))
    return not _store_list(store, "")


def _delete(url: str | os.PathLike, store: Any) -> None:
    """Delete a cache: its identity marker first, so that readers and builds see at once that it is gone."""
    _store_delete(store, IDENTITY_KEY)
    root = local_root(url)
    if root is not None:
        shutil.rmtree(root)
    else:
        sync(store.delete_dir(""))


# ---------------------------------------------------------------------------------------------
# Reader


def reader_manifest(url: str, manifest: Any, *, where: str, rebuild: str,
                    allow_incomplete: bool = False) -> Manifest:
    """The manifest of a cache as every format stores it (the build's ``Manifest.to_dict()``, verbatim)
    checked for what a reader needs, as a typed :class:`cache.manifest.Manifest` (its ``layout`` the
    :class:`Layout`); a :class:`CacheError` naming ``where`` (the file or attribute that holds it) and
    what to do (``rebuild``) otherwise. The one reader of the manifest shared by the zarr, HDF5 and FFCV
    formats."""
    if not isinstance(manifest, Mapping):
        raise CacheError(f"{url} is not a readable cache: its manifest ({where}) is not a JSON object; {rebuild}")
    lacking = [k for k in READER_KEYS if k not in manifest]
    if lacking:
        raise CacheError(f"{url} is not a readable cache: its manifest ({where}) lacks "
                         f"{', '.join(map(repr, lacking))}; {rebuild}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{url} has cache schema {manifest.get('schema_version')}, this code reads {SCHEMA_VERSION}")
    if not manifest.get("complete") and not allow_incomplete:
        raise CacheError(f"{url} is incomplete: rerun the build command to finish it")
    try:
        Layout.from_dict(manifest["layout"])
    except (KeyError, TypeError, ValueError, AttributeError, CacheError) as e:
        raise CacheError(f"{url} is not a readable cache: the layout in its manifest ({where}) is malformed "
                         f"({type(e).__name__}: {e}); {rebuild}") from None
    try:
        return Manifest.from_dict(manifest)
    except ManifestError as e:
        raise CacheError(f"{url} is not a readable cache: its manifest ({where}) is malformed ({e}); "
                         f"{rebuild}") from None


class CacheReader(abc.ABC):
    """What every cache format offers readers (zarr :class:`Cache`, :class:`cache.h5cache.H5Cache`,
    :class:`cache.ffcvcache.FfcvCache`); each sets the attributes below in its constructor.

    Rows reach :class:`cache.loader.CacheLoader` one of two ways: a format that reads rows itself defines
    ``row_reader(name)`` (a reader of single rows of 'latents', 'features/<teacher>' or
    'feature_scales/<teacher>' into batches: ``read(rows, variants, out)``, ``direct``, ``variant_shape``,
    ``dtype``, ``close()``); a format whose own loader assembles whole batches (FFCV) defines
    ``batch_source(keys, num_workers=, prefetch=)`` instead (``batches(...)``, ``variant_shapes``,
    ``variant_dtypes``, ``close()``).

    Attributes:
        url: where the cache is; root: its local folder or file (None for remote stores).
        format: 'zarr', 'hdf5' or 'ffcv'.
        manifest: the build manifest, a :class:`cache.manifest.Manifest`; layout: its :class:`Layout`
            (``manifest.layout``).
        latents: array-like (N, F, 8, R/8, R/8) float16 of posterior moments (``.shape``, ``[rows]``).
        features: dict teacher name -> array-like (N, F, T, D): float16, or int8 for teachers stored as int8
            (``layout.quantized(name)``), whose float32 scales (N, F, T) are in ``feature_scales[name]``
            (tokens = values x scales, :func:`cache.quant.dequantize_tokens`).
        feature_scales: dict int8 teacher name -> array-like (N, F, T) float32 (empty without int8 teachers).
        labels: numpy int32 (N,); -1 on skipped rows.
        rows: numpy int64 ids of the rows that hold data, ascending; ``len(cache)`` counts them.
    """

    format = "zarr"
    url: str
    root: str | None
    manifest: Manifest
    layout: Layout
    labels: np.ndarray
    rows: np.ndarray
    generation: str | None = None

    def _set_labels(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels)
        self.rows = np.flatnonzero(self.labels >= 0).astype(np.int64)

    feature_scales: Mapping[str, Any] = MappingProxyType({})  # formats set their own; none without int8 teachers

    @property
    def complete(self) -> bool:
        return self.manifest.is_complete

    def channel_scales(self, name: str) -> np.ndarray | None:
        """Teacher ``name``'s per-channel scales, float32 (D,), for int8 tokens (``cache.quant``): tokens =
        values x scales x channel scales. None for float16 teachers and int8 caches without them (ones)."""
        return manifest_channel_scales(self.manifest, name, self.layout)

    def array(self, name: str) -> Any:
        """The array-like of 'latents', 'features/<teacher>' or 'feature_scales/<teacher>'."""
        if name == "latents":
            return self.latents
        group, _, teacher = name.partition("/")
        arrays = {"features": self.features, SCALES_GROUP: self.feature_scales}.get(group)
        if arrays is None or teacher not in arrays:
            raise KeyError(f"{self.url} has no array {name!r}")
        return arrays[teacher]

    def check_unchanged(self) -> None:  # noqa: B027 (a real default: formats that cannot tell check nothing)
        """Raise :class:`CacheChangedError` if the cache was replaced since it was opened (formats that
        cannot tell: nothing)."""

    @abc.abstractmethod
    def sources(self) -> list[dict[str, Any]]:
        """The build's source list (relative path and size of every source file, in row order)."""

    def source_path(self, row: int) -> str:
        """Path of the source image of ``row``, relative to the build's SOURCE folder."""
        if getattr(self, "_sources", None) is None:
            self._sources = self.sources()
        return self._sources[row]["path"]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.url!r}, rows={len(self)}/{self.layout.num_rows}, "
                f"variants={self.num_variants}, teachers={ {k: tuple(v) for k, v in self.layout.teachers.items()} })")

    @property
    def num_variants(self) -> int:
        return self.layout.variants

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.classes)

    def loader(self, batch_size: int, **kwargs: Any):
        """A :class:`cache.loader.CacheLoader` over this cache; see its docstring for the options."""
        from .loader import CacheLoader

        return CacheLoader(self, batch_size, **kwargs)


class Cache(CacheReader):
    """A finished zarr cache, opened for reading. Use :func:`open_cache`; see :class:`CacheReader`."""

    format = "zarr"

    def __init__(self, url: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.url = os.fspath(url)
        rebuild = (f"rebuild it (`python -m pipeline.build SOURCE {self.url} --overwrite`) or restore it from a copy")
        group, unreadable = _probe_group(url)
        if unreadable is not None:
            raise CacheError(f"{self.url} is not a readable cache: {unreadable}; {rebuild}")
        if group is None:
            raise CacheError(f"no cache at {self.url}")
        manifest = group.attrs.get(MANIFEST_KEY)
        if manifest is None:
            raise CacheError(f"{self.url} is a zarr group but not a feature cache (no '{MANIFEST_KEY}' attribute)")
        where = f"the '{MANIFEST_KEY}' attribute in {_where(url, 'zarr.json')}"
        self.manifest = reader_manifest(self.url, manifest, where=where, rebuild=rebuild,
                                        allow_incomplete=allow_incomplete)
        self.layout = self.manifest.layout
        self.group = group
        self.root = local_root(self.url)  # the local folder, None for other stores
        self.generation = self.manifest.generation  # None: built before generations were recorded
        try:
            self.latents = group["latents"]
            self.features = {name: group["features"][name] for name in self.layout.teachers}
            self.feature_scales = {name: group[f"{SCALES_GROUP}/{name}"] for name in self.layout.quantized_teachers}
            labels = group["labels"]
        except (KeyError, ValueError, OSError) as e:
            raise CacheError(f"{self.url} is not a readable cache: an array is missing or unreadable "
                             f"({type(e).__name__}: {e}); {rebuild}") from None
        try:
            self.labels = np.asarray(labels[:])
        except Exception as e:
            raise CacheError(f"{self.url}: the labels cannot be read ({type(e).__name__}: {e}): the cache is damaged; "
                             f"run `python -m cache.inspect {self.url} --verify`, then "
                             f"`python -m pipeline.build SOURCE {self.url} --repair`") from None
        self._set_labels(self.labels)
        self._sources: list[dict[str, Any]] | None = None

    def check_unchanged(self) -> None:
        """Raise :class:`CacheChangedError` if the cache was rebuilt or removed since it was opened: one
        small read (the identity marker). Caches built before generations were recorded are not checked."""
        if self.generation is None:
            return
        marker = _identity(self.group.store)
        now = None if marker is None else marker["id"]
        if now != self.generation:
            raise CacheChangedError(
                f"the cache at {self.url} was rebuilt or removed while this loader read it (generation "
                f"{self.generation} when opened, {now or 'none'} now); restart to read the cache as it is now")

    def finished_shards(self) -> set[int]:
        """Shards that have a progress record (their data was written in full)."""
        return {int(k.rsplit("/", 1)[-1][6:-5]) for k in _list(self.group, "build/progress/")
                if k.rsplit("/", 1)[-1].startswith("shard-") and k.endswith(".json")}

    def shard_object(self, name: str, shard: int) -> str:
        """The file (local caches) or URL of shard ``shard`` of array ``name`` ('latents',
        'features/<teacher>', 'labels')."""
        arr = _data_arrays(self.group, self.layout)[name]
        return _where(self.url, f"{arr.path}/{shard_key(arr, shard)}")

    def verify_shards(self) -> list[ShardDamage]:
        """Damaged objects of the finished shards; see :func:`verify_shards`."""
        return verify_shards(self.group, self.url, self.layout)

    def sources(self) -> list[dict[str, Any]]:
        return json.loads(_get(self.group, "build/sources.json") or b"[]")

    def row_reader(self, name: str) -> Any:
        from .loader import _RowReader

        return _RowReader(self.array(name), self.root, self.url, complete=self.complete)

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
        for name in self.layout.array_names()[:-1]:
            arr = self.array(name)
            paths = [os.path.join(root, arr.path, shard_key(arr, s)) for s in range(self.layout.num_shards)]
            out[name] = [p for p in paths if os.path.exists(p)]
        return out

def stored_bytes(group: zarr.Group) -> dict[str, int]:
    """Bytes stored per array of a cache group ('latents', 'labels', 'features/<name>',
    'feature_scales/<name>')."""
    out = {"latents": int(group["latents"].nbytes_stored()), "labels": int(group["labels"].nbytes_stored())}
    for sub in ("features", SCALES_GROUP):
        if sub in group:
            for name, arr in group[sub].arrays():
                out[f"{sub}/{name}"] = int(arr.nbytes_stored())
    return out


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
FFCV_RECORD = "ffcv.json"  # the record that makes a folder an FFCV cache (see cache.ffcvcache)
FORMATS = ("zarr", "hdf5", "ffcv")


def detect_format(url: str | os.PathLike) -> str:
    """'zarr', 'hdf5' or 'ffcv', from what is on disk: a folder with ``zarr.json`` (or any non-local
    store) is zarr, a file that starts with HDF5's signature is HDF5, a folder with ``ffcv.json`` is
    FFCV. Anything else is a :class:`CacheError` naming the path and what it holds."""
    root = local_root(url)
    if root is None:
        return "zarr"
    if os.path.isdir(root):
        if os.path.exists(os.path.join(root, "zarr.json")):
            return "zarr"
        if os.path.exists(os.path.join(root, FFCV_RECORD)):
            return "ffcv"
        if any(n.endswith(".beton") for n in os.listdir(root)):
            raise CacheError(f"{root} holds .beton files but no {FFCV_RECORD}: not a finished FFCV cache (a conversion "
                             "that did not finish, or files copied by hand); convert again: "
                             f"`python -m cache.convert SRC {root} --format ffcv`")
        return "zarr"  # an empty or foreign folder: zarr's reader says "no cache" or why
    if os.path.isfile(root):
        with open(root, "rb") as f:
            head = f.read(8)
        if head == HDF5_SIGNATURE:
            return "hdf5"
        raise CacheError(f"{root} is a file but not an HDF5 cache (it does not start with HDF5's signature); a cache "
                         "is a zarr folder, an .h5 file or an FFCV folder: `python -m cache.convert SRC DST --format "
                         "zarr|hdf5|ffcv` writes one")
    raise CacheError(f"no cache at {root}")


def open_cache(url: str | os.PathLike, *, allow_incomplete: bool = False) -> CacheReader:
    """Open a finished cache for reading, in any format (:func:`detect_format`): a zarr folder or any
    store URL zarr accepts, an HDF5 file, an FFCV folder. Every format offers :class:`CacheReader`."""
    fmt = detect_format(url)
    if fmt == "hdf5":
        from .h5cache import H5Cache

        return H5Cache(url, allow_incomplete=allow_incomplete)
    if fmt == "ffcv":
        from .ffcvcache import FfcvCache

        return FfcvCache(url, allow_incomplete=allow_incomplete)
    return Cache(url, allow_incomplete=allow_incomplete)
