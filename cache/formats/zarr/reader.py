"""A finished zarr cache opened for reading (:class:`ZarrCache`), and the check of its stored objects."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from ... import stores
from ...errors import CacheChangedError, CacheError
from ...files import checksum, local_root
from ...layout import SCALES_GROUP, ByTeacher, Layout
from ...manifest import MANIFEST_KEY, check_manifest
from ...nodecache import NodeCache
from ...reader import CacheReader, Problem
from . import store as keys
from .localcopy import LocalCopyRowReader
from .remote import RemoteRowReader
from .rows import ZarrRowReader
from .settings import ZarrStorage
from .shardfile import ShardIndexError, choose_io, decode_index, direct_format, log_io_choice, shard_key

__all__ = ["ZarrCache", "verify_shards", "stored_bytes"]


def data_arrays(group: zarr.Group, layout: Layout) -> dict[str, Any]:
    """Every array with one object per shard (:meth:`Layout.array_names`, labels included), by name."""
    return {name: group[name] for name in layout.array_names()}


def verify_shards(group: zarr.Group, url: str | os.PathLike, layout: Layout) -> list[Problem]:
    """Check every shard that has a progress record: each array's object exists, its bytes match the
    checksum recorded when it was written (records from before checksums: not checked), its shard index
    passes its crc32c. Reads every object once, whole, through the store."""
    shards = [s for s in map(keys.record_shard, sorted(keys.keys(group, keys.PROGRESS))) if s is not None]
    return [p for s in shards for p in shard_problems(group, url, layout, s)]


def shard_problems(group: zarr.Group, url: str | os.PathLike, layout: Layout, shard: int) -> list[Problem]:
    """The damage of one finished shard: its progress record (missing: the shard is not finished), each
    array's object (missing, failing the checksum recorded when it was written, an index failing its crc32c)."""
    rows = ZarrStorage.of(layout).shard_range(layout, shard)
    key = keys.record_key(keys.PROGRESS, shard)
    raw = keys.get(group, key)
    if raw is None:
        return [Problem(keys.where(url, key), "the shard has no progress record: the build has not finished it",
                        "progress", shard, rows, remedy="resume")]
    try:
        sums = json.loads(raw).get("checksums") or {}
    except (ValueError, AttributeError) as e:
        return [Problem(keys.where(url, key), f"the record is not readable JSON ({e})", "progress", shard, rows,
                        remedy="repair")]
    out = []
    for array_name, arr in data_arrays(group, layout).items():
        obj = f"{arr.path}/{shard_key(arr, shard)}"
        problem = _object_problem(arr, keys.store_get(group.store, obj), sums.get(array_name))
        if problem:
            out.append(Problem(keys.where(url, obj), problem, array_name, shard, rows, remedy="repair"))
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


def stored_bytes(group: zarr.Group) -> dict[str, int]:
    """Bytes stored per array of a cache group ('latents', 'labels', 'features/<name>',
    'feature_scales/<name>')."""
    out = {"latents": int(group["latents"].nbytes_stored()), "labels": int(group["labels"].nbytes_stored())}
    for sub in ("features", SCALES_GROUP):
        if sub in group:
            for name, arr in group[sub].arrays():
                out[f"{sub}/{name}"] = int(arr.nbytes_stored())
    return out


class ZarrCache(CacheReader):
    """A finished zarr cache, opened for reading (:func:`cache.open_cache`); see :class:`cache.reader.CacheReader`."""

    format = "zarr"

    def __init__(self, url: str | os.PathLike | Any, *, allow_incomplete: bool = False,
                 storage_options: Mapping[str, Any] | None = None, local_cache: str | os.PathLike | None = None,
                 local_cache_bytes: int | None = None) -> None:
        self.url = stores.location(url)
        self.store = stores.open_store(url, options=storage_options, read_only=True)
        self.storage_options = dict(storage_options or {})  # kept in memory only, never written
        group, unreadable = keys.probe_group(url, self.store)
        if unreadable is not None:
            raise CacheError(f"{self.url} is not a readable cache: {unreadable}", url=self.url, remedy="rebuild")
        if group is None:
            if stores.is_store(url) or stores.scheme_of(url) is not None:
                stores.check_reachable(self.url, self.store)  # a wrong endpoint or bucket says so
            raise CacheError(f"no cache at {self.url}", url=self.url)
        manifest = group.attrs.get(MANIFEST_KEY)
        if manifest is None:
            raise CacheError(f"{self.url} is a zarr group but not a feature cache (no '{MANIFEST_KEY}' attribute)",
                             url=self.url)
        where = f"the '{MANIFEST_KEY}' attribute in {keys.where(url, 'zarr.json')}"
        self.manifest = check_manifest(self.url, manifest, where=where, allow_incomplete=allow_incomplete)
        self.layout = self.manifest.layout
        self.storage = ZarrStorage.of(self.layout)
        self.group = group
        self.root = None if stores.is_store(url) else local_root(self.url)  # the local folder, None for other stores
        self.generation = self.manifest.generation  # None: built before generations were recorded
        try:
            self.latents = group["latents"]
            self.features = ByTeacher({name: group["features"][name] for name in self.layout.teachers})
            self.feature_scales = ByTeacher({name: group[f"{SCALES_GROUP}/{name}"]
                                             for name in self.layout.quantized_teachers})
            labels = group["labels"]
        except (KeyError, ValueError, OSError) as e:
            raise CacheError(f"{self.url} is not a readable cache: an array is missing or unreadable "
                             f"({type(e).__name__}: {e})", url=self.url, remedy="rebuild") from None
        try:
            labels = np.asarray(labels[:])
        except Exception as e:
            raise CacheError(f"{self.url}: the labels cannot be read ({type(e).__name__}: {e}): the cache is damaged",
                             url=self.url, remedy="repair") from None
        self._set_labels(labels)
        #: node-local copies of the shard objects (:mod:`cache.nodecache`), None: rows by range from the store
        self.local_cache: NodeCache | None = None
        if local_cache is not None:
            if self.root is not None or not isinstance(self.store, zarr.storage.ObjectStore):
                raise CacheError(f"{self.url}: a node-local copy (local_cache) applies to caches in an object store "
                                 "(s3://, gs://, az://); this one is read where it is", url=self.url)
            self.local_cache = NodeCache(local_cache, max_bytes=local_cache_bytes)
        self._checksums: dict[int, dict[str, str]] = {}
        self._checksums_lock = threading.Lock()

    def recorded_checksum(self, name: str, shard: int) -> str | None:
        """The checksum the progress record of ``shard`` holds for array ``name``'s object (None: no record or
        none recorded); each record read once."""
        with self._checksums_lock:
            sums = self._checksums.get(shard)
        if sums is None:
            raw = keys.get(self.group, keys.record_key(keys.PROGRESS, shard))
            try:
                sums = dict(json.loads(raw).get("checksums") or {}) if raw is not None else {}
            except (ValueError, AttributeError, TypeError):
                sums = {}
            with self._checksums_lock:
                self._checksums[shard] = sums
        return sums.get(name)

    def check_unchanged(self) -> None:
        """Raise :class:`CacheChangedError` if the cache was rebuilt or removed since it was opened: one
        small read (the identity marker). Caches built before generations were recorded are not checked."""
        if self.generation is None:
            return
        marker = keys.identity(self.group.store)
        now = None if marker is None else marker["id"]
        if now != self.generation:
            raise CacheChangedError(
                f"the cache at {self.url} was rebuilt or removed while this loader read it (generation "
                f"{self.generation} when opened, {now or 'none'} now); restart to read the cache as it is now",
                url=self.url)

    def finished_shards(self) -> set[int]:
        """Shards that have a progress record (their data was written in full)."""
        return {s for s in map(keys.record_shard, keys.keys(self.group, keys.PROGRESS)) if s is not None}

    def shard_object(self, name: str, shard: int) -> str:
        """The file (local caches) or URL of shard ``shard`` of array ``name`` ('latents',
        'features/<teacher>', 'labels')."""
        arr = data_arrays(self.group, self.layout)[name]
        return keys.where(self.url, f"{arr.path}/{shard_key(arr, shard)}")

    def verify_stored(self) -> list[Problem]:
        """Shards without a progress record (the build has not finished them), then the damaged objects of
        the finished ones (:func:`verify_shards`)."""
        missing = sorted(set(range(self.storage.num_shards(self.layout))) - self.finished_shards())
        problems = []
        if missing:
            problems.append(Problem(self.url, f"{len(missing)} shards have no progress record (first {missing[:5]}): "
                                    "the build has not finished them", remedy="resume"))
        return problems + verify_shards(self.group, self.url, self.layout)

    @property
    def block_rows(self) -> int:
        return self.storage.shard_rows

    @property
    def read_unit_rows(self) -> int:
        """An inner chunk: one byte range in its shard object (and what zarr's own path decodes whole)."""
        return self.storage.chunk_rows

    def verify_rows(self, lo: int, hi: int) -> list[Problem]:
        """The damage of the shards that hold rows lo..hi (:func:`shard_problems`)."""
        first, last = lo // self.storage.shard_rows, (hi - 1) // self.storage.shard_rows
        return [p for s in range(first, last + 1) for p in shard_problems(self.group, self.url, self.layout, s)]

    def verify_blocks(self) -> list[tuple[int, int]]:
        """The rows of every finished shard."""
        return [self.storage.shard_range(self.layout, s) for s in sorted(self.finished_shards())]

    def sources(self) -> list[dict[str, Any]]:
        return json.loads(keys.get(self.group, keys.SOURCES_KEY) or b"[]")

    def row_reader(self, name: str) -> ZarrRowReader | RemoteRowReader | LocalCopyRowReader:
        """By byte range from a local folder (:class:`ZarrRowReader`) or an object store
        (:class:`RemoteRowReader`; from node-local copies of its objects with ``local_cache``,
        :class:`LocalCopyRowReader`) where :func:`choose_io` confirms the layout; else through zarr."""
        array = self.array(name)
        if self.root is None and isinstance(self.store, zarr.storage.ObjectStore):
            fmt, reason = choose_io(None, array, ranged=True)
            nbytes = int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize
            if fmt is not None and fmt.row_nbytes == nbytes:
                remote = RemoteRowReader(array, self.store.store, self.url, fmt, complete=self.complete)
                if self.local_cache is None:
                    return remote
                return LocalCopyRowReader(remote, self.local_cache,
                                          lambda shard: self.recorded_checksum(name, shard))
            log_io_choice("reads", self.url, array.path, None, reason or "row sizes disagree")
        return ZarrRowReader(array, self.root, self.url, complete=self.complete)

    def stored_bytes(self) -> dict[str, int]:
        return stored_bytes(self.group)

    def describe_storage(self) -> str:
        s = self.storage
        return f"zarr, shards of {s.shard_rows} rows, chunks of {s.chunk_rows}, compressor {s.compressor}"
