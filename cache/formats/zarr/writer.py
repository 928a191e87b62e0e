"""Writing a zarr cache: whole shards, one writer per process of a build (:class:`CacheWriter`).

Every write unit is a shard (one object per array), so ranks never share an object. A shard's progress
record is written after all of its data, which makes "record present" mean "data complete" for any
interruption; a shard without a record is simply written again.

Creation decides in two steps: :func:`survey` says what is at the place (a typed :class:`Target`), and
:meth:`CacheWriter.create_or_resume` dispatches on it: resume the same cache, add teachers to a finished
one, create a new one, or refuse (the errors say which remedy applies; the entry points word it).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import zarr

from ...diff import describe_change, nested_diff
from ...errors import CacheError, CacheMismatchError
from ...files import local_root
from ...layout import SCALES_GROUP, Layout
from ...manifest import (
    MANIFEST_KEY,
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    channel_scales_of,
    manifest_diff,
)
from ...quant import quantize_tokens
from ...reader import Problem
from . import store as keys
from .reader import data_arrays, stored_bytes, verify_shards
from .settings import ZarrStorage
from .shardfile import ShardFormat, checksum, choose_io, log_io_choice, shard_key, write_shard_file

__all__ = ["CacheWriter", "Target", "survey"]

_logger = logging.getLogger(__name__)
_PER_RUN = ("encode", "dtype", "channel_scales")  # a teacher record's entries that belong to the run that encoded it


def _typed(url: str | os.PathLike, manifest: Any) -> Manifest:
    try:
        return Manifest.from_dict(manifest)
    except ManifestError as e:
        raise CacheError(f"{os.fspath(url)}: the manifest ({keys.where(url, 'zarr.json')}) is malformed: {e}",
                         url=os.fspath(url), remedy="rebuild") from None


# ---------------------------------------------------------------------------------------------
# What is at OUT


@dataclass(frozen=True)
class Target:
    """What a build finds where it is to write a cache.

    ``kind``: ``empty`` (nothing, or an empty folder), ``unfinished`` (a creation of ours that was killed
    before its manifest), ``cache`` (a cache with a manifest: ``manifest``, as every reader sees it),
    ``damaged`` (our cache whose manifest is not a JSON object, or whose group is unreadable), ``foreign-group``
    (a zarr group that is not ours), ``unreadable`` (not a readable zarr group and no mark of ours: never
    touched), ``foreign`` (a folder or store holding other things: never touched). ``why``: for damaged and
    unreadable, what is wrong."""

    kind: Literal["empty", "unfinished", "cache", "damaged", "foreign-group", "unreadable", "foreign"]
    manifest: dict[str, Any] | None = None
    why: str = ""


def survey(url: str | os.PathLike, store: Any) -> Target:
    """What is at ``url`` (see :class:`Target`)."""
    ours = keys.identity(store) is not None
    group, unreadable = keys.probe_group(url, store)
    if group is not None:
        old = group.attrs.get(MANIFEST_KEY)
        if old is None:
            return Target("unfinished" if ours else "foreign-group")
        if not isinstance(old, Mapping):
            return Target("damaged", why="its manifest is not a JSON object")
        try:
            old = Manifest.from_dict(old).to_dict()  # compared as every reader sees it
        except ManifestError:
            old = dict(old)
        return Target("cache", manifest=old)
    if unreadable is not None:
        return Target("damaged" if ours else "unreadable", why=unreadable)
    if ours:
        return Target("unfinished")
    return Target("empty" if keys.is_empty(url, store) else "foreign")


# ---------------------------------------------------------------------------------------------
# Arrays and additions


def _create_array(group: zarr.Group, layout: Layout, name: str) -> None:
    """The sharded array ``name`` of :meth:`Layout.row_shapes` ('latents', 'features/<t>', ...) in a cache group."""
    shape, dtype = layout.row_shapes()[name]
    parent, _, leaf = name.rpartition("/")
    (group.require_group(parent) if parent else group).create_array(
        leaf, dtype=dtype, **ZarrStorage.of(layout).array_kwargs(layout, shape))


def _create_teacher_arrays(group: zarr.Group, layout: Layout, name: str) -> None:
    """The token array of teacher ``name`` (and for int8 tokens its scales) in a cache group."""
    _create_array(group, layout, f"features/{name}")
    if layout.quantized(name):
        _create_array(group, layout, f"{SCALES_GROUP}/{name}")


def _has_array(group: zarr.Group, name: str) -> bool:
    try:
        group[name]
    except KeyError:
        return False
    return True


def _delete_teacher_arrays(group: zarr.Group, name: str) -> None:
    """Delete the token (and scale) arrays of teacher ``name`` from a cache group, where they exist."""
    for sub in ("features", SCALES_GROUP):
        keys.delete_array(group, f"{sub}/{name}")


def _keep_calibration(old: Mapping[str, Any], new: dict[str, Any]) -> None:
    """Give the run's manifest ``new`` the channel scales the cache ``old`` already holds for the same teachers
    (finished or being added): they were measured once, when the teacher was first encoded, and a rerun must
    quantise as the first run did (a GPU may measure the last bits differently)."""
    stored = {k: v.get("channel_scales") for k, v in (old.get("teachers") or {}).items() if isinstance(v, Mapping)}
    stored.update({k: (v.get("record") or {}).get("channel_scales")
                   for k, v in (old.get("adding") or {}).items() if isinstance(v, Mapping)})
    for name, record in (new.get("teachers") or {}).items():
        if isinstance(record, dict) and stored.get(name) is not None and "channel_scales" in record:
            record["channel_scales"] = stored[name]


def _addition(url: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """When the run whose manifest is ``new`` names every teacher of the cache ``old`` and more, and agrees
    with it on everything else: the teachers to add (name -> {tokens, dim, dtype, record}, the manifest's
    ``adding`` entry); None when the run adds no teacher. A run that adds teachers but differs in anything
    else, a cache that is not finished, or an unfinished addition of other teachers or settings is refused
    (CacheMismatchError).

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
    for key in ("encode", "adding"):
        projected.pop(key, None)
        if key in old:
            projected[key] = old[key]
    diffs = manifest_diff(old, projected)
    if diffs:
        raise CacheMismatchError(
            f"{url}: this run adds teacher(s) {', '.join(added)}, but differs from the cache in more than its teachers",
            url=url, differences=diffs, teachers=list(old_teachers))
    if not old.get("complete"):
        raise CacheMismatchError(
            f"{url} is not finished: finish it with its own teachers ({', '.join(old_teachers)}), then add "
            f"{', '.join(added)}", url=url, remedy="resume", teachers=list(old_teachers))
    layout = Layout.from_dict(new["layout"])
    adding = {k: {"tokens": new_teachers[k][0], "dim": new_teachers[k][1], "dtype": layout.feature_dtype(k),
                  "record": (new.get("teachers") or {}).get(k, {})} for k in added}
    pending = old.get("adding")
    if pending is not None and pending != adding:
        raise CacheMismatchError(
            f"{url} has an unfinished addition of teacher(s) {', '.join(pending)} with other teachers or settings "
            f"than this run's ({', '.join(added)})", url=url, remedy="addition", teachers=list(pending),
            differences=[describe_change(name, a, b, sides=("the cache", "this run"))
                         for name, a, b in nested_diff(pending, adding)])
    return adding


# ---------------------------------------------------------------------------------------------
# The writer


class CacheWriter:
    """Writes whole shards of a zarr cache; one per process in a distributed build (see the module docstring)."""

    def __init__(self, url: str | os.PathLike, group: zarr.Group, manifest: Manifest) -> None:
        self.url = os.fspath(url)
        self.group = group
        self.manifest = manifest
        #: Teachers being added to this finished cache (their tokens alone are written); () for a build.
        self.adding: tuple[str, ...] = tuple(manifest.pending)
        #: The layout the writes fill: the manifest's, plus the teachers being added.
        self.layout = manifest.layout_with_pending()
        self.storage = ZarrStorage.of(self.layout)
        self._direct: dict[str, ShardFormat | None] = {}  # array path -> its direct format, None: zarr's path

    @property
    def num_shards(self) -> int:
        return self.storage.num_shards(self.layout)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows ``(lo, hi)`` of shard ``shard``."""
        return self.storage.shard_range(self.layout, shard)

    def channel_scales(self, name: str) -> np.ndarray | None:
        """The channel scales teacher ``name``'s int8 tokens are written with (None: ones, or float16)."""
        return channel_scales_of(self.manifest, name, url=self.url)

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
        storage_options: Mapping[str, Any] | None = None,
    ) -> tuple[CacheWriter, bool]:
        """Create a cache at ``url``, or reopen one built with the same manifest (resume).

        Returns ``(writer, resumed)``. A cache whose manifest differs in anything but bookkeeping raises
        :class:`CacheMismatchError` naming each difference, unless ``overwrite`` is set, in which case the old
        cache is deleted first. A run that names every teacher of a finished cache and more, and agrees with
        it on everything else, adds the new teachers: the writer's :attr:`adding` lists them, and only their
        tokens are written (``resumed``: an earlier run began this addition). Call on one process only (rank
        0). ``manifest`` is a :class:`Manifest` or its JSON form (its layout is replaced by ``layout``).
        ``storage_options``: the settings of an object store at ``url`` (:func:`cache.stores.open_store`)."""
        url = os.fspath(url)
        manifest = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
        manifest["layout"] = layout.to_dict()
        manifest.setdefault("schema_version", SCHEMA_VERSION)
        try:
            manifest = Manifest.from_dict(manifest).to_dict()  # as every reader will see it
        except ManifestError as e:
            raise CacheError(f"{url}: the manifest to write is malformed: {e}", url=url) from None
        ZarrStorage.of(layout)  # the storage settings are checked before anything is written
        store = keys.store_for(url, storage_options)
        target = survey(url, store)
        if target.kind == "cache":
            reused = cls._reuse(url, store, target.manifest, manifest, overwrite=overwrite)
            if reused is not None:
                return reused
        elif target.kind == "foreign":
            raise CacheError(f"{url} exists and is not a feature cache; refusing to write into it", url=url)
        elif target.kind == "unreadable":
            raise CacheError(f"{url} is not a readable zarr group ({target.why}) and carries no mark of a cache this "
                             "program created; refusing to write into it, even when told to replace it", url=url)
        elif target.kind in ("foreign-group", "damaged") and not overwrite:
            what = ("a zarr group that is not a feature cache this program created" if target.kind == "foreign-group"
                    else f"a damaged cache ({target.why})")
            raise CacheMismatchError(f"{url} holds {what}", url=url, remedy="replace")
        if target.kind == "unfinished":
            _logger.info("%s: finishing an interrupted creation", url)
        if target.kind != "empty":
            keys.delete_cache(url, store)
        return cls._create(url, store, layout, manifest, sources), False

    @classmethod
    def _reuse(cls, url: str, store: Any, old: dict[str, Any], manifest: dict[str, Any], *,
               overwrite: bool) -> tuple[CacheWriter, bool] | None:
        """The writer that resumes the cache ``old`` or adds teachers to it; None when it is to be replaced."""
        _keep_calibration(old, manifest)
        if ("adding" in old and not overwrite
                and set(old["layout"]["teachers"]) == set(manifest["layout"]["teachers"])):
            raise CacheMismatchError(f"{url} is finished but has an unfinished addition of teacher(s) "
                                     f"{', '.join(old['adding'])}", url=url, remedy="addition",
                                     teachers=list(old["adding"]))
        diffs = manifest_diff(old, manifest)
        if not diffs:
            return cls(url, zarr.open_group(store, mode="r+"), _typed(url, old)), True
        try:
            addition = _addition(url, old, manifest)
        except CacheMismatchError:
            if not overwrite:
                raise
            addition = None
        if addition is not None:
            return cls._begin_addition(url, store, old, addition), "adding" in old
        if not overwrite:
            raise CacheMismatchError(f"{url} holds a cache built with other settings", url=url, differences=diffs,
                                     teachers=list(old["layout"]["teachers"]),
                                     wanted=list(manifest["layout"]["teachers"]))
        return None

    @classmethod
    def _create(cls, url: str, store: Any, layout: Layout, manifest: dict[str, Any],
                sources: Sequence[Mapping[str, Any]]) -> CacheWriter:
        # The marker goes first: from here on, whatever a killed creation leaves is provably ours.
        generation = uuid.uuid4().hex
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest["complete"] = False
        manifest["generation"] = generation
        keys.write_identity(store, {"created_by": keys.CREATED_BY, "id": generation, "created": manifest["created"]})
        group = zarr.open_group(store, mode="a")
        _create_array(group, layout, "latents")
        group.create_group("features")
        for name in layout.teachers:
            _create_teacher_arrays(group, layout, name)
        storage = ZarrStorage.of(layout)
        group.create_array("labels", dtype="int32", shape=(layout.num_rows,), chunks=(storage.shard_rows,),
                           compressors=None, fill_value=-1)
        group.create_group("build")
        keys.put(group, keys.SOURCES_KEY, json.dumps(list(sources), separators=(",", ":")).encode())
        group.attrs[MANIFEST_KEY] = manifest
        return cls(url, group, _typed(url, manifest))

    @classmethod
    def _begin_addition(cls, url: str, store: Any, old: dict[str, Any], adding: dict[str, Any]) -> CacheWriter:
        """Record the teachers to add in the manifest (first: from then on their arrays are provably ours),
        then create their arrays. A resumed addition keeps its arrays and progress records."""
        group = zarr.open_group(store, mode="r+")
        fresh = "adding" not in old
        if fresh:
            _logger.info("%s: adding teacher(s) %s to the finished cache", url, ", ".join(adding))
            for key in keys.keys(group, keys.ADDING):  # left by an addition that was dropped: not this one's
                keys.delete(group, key)
            group.attrs[MANIFEST_KEY] = {**old, "adding": adding}
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
    def drop_teacher(cls, url: str | os.PathLike, name: str, *,
                     storage_options: Mapping[str, Any] | None = None) -> Manifest:
        """Remove teacher ``name`` from a finished cache (or a teacher being added) without touching the
        other arrays: the manifest first (readers opened from then on do not see it), then its arrays,
        then its checksums in the progress records. Returns the new manifest."""
        url = os.fspath(url)
        store = keys.store_for(url, storage_options)
        group, unreadable = keys.probe_group(url, store)
        if group is None or keys.identity(store) is None:
            raise CacheError(f"{url} is not a cache this program created" + (f" ({unreadable})" if unreadable else ""),
                             url=url)
        group = zarr.open_group(store, mode="r+")
        stored = group.attrs.get(MANIFEST_KEY)
        manifest = _typed(url, stored)
        pending = dict(manifest.pending)
        teachers = list(manifest.layout.teachers)
        if name in pending:
            del pending[name]
            new = {k: v for k, v in stored.items() if k != "adding"}
            if pending:
                new["adding"] = {k: v for k, v in stored["adding"].items() if k in pending}
        elif name in teachers:
            if not manifest.is_complete:
                raise CacheError(f"{url} is not finished: finish its build first, then drop teacher {name!r}",
                                 url=url, remedy="resume")
            lay = manifest.layout
            layout = lay.with_teachers({k: v for k, v in lay.teachers.items() if k != name},
                                       {k: v for k, v in lay.feature_dtypes.items() if k != name})
            new = {**stored, "layout": layout.to_dict(),
                   "teachers": {k: v for k, v in (stored.get("teachers") or {}).items() if k != name}}
        else:
            raise CacheError(f"{url} has no teacher {name!r}; it holds {teachers}"
                             + (f" and is adding {sorted(pending)}" if pending else ""), url=url)
        new = _typed(url, new).to_dict()
        group.attrs[MANIFEST_KEY] = new
        _delete_teacher_arrays(group, name)
        if not pending:
            for key in keys.keys(group, keys.ADDING):
                keys.delete(group, key)
        gone = {f"features/{name}", f"{SCALES_GROUP}/{name}"}
        for key in keys.keys(group, keys.PROGRESS):
            record = json.loads(keys.get(group, key) or b"{}")
            sums = record.get("checksums") or {}
            if gone & set(sums):
                record["checksums"] = {k: v for k, v in sums.items() if k not in gone}
                keys.put(group, key, json.dumps(record).encode())
        return _typed(url, new)

    @classmethod
    def open(cls, url: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> CacheWriter:
        """Open a cache created by :meth:`create_or_resume` (the other ranks of a build)."""
        group = zarr.open_group(keys.store_for(url, storage_options), mode="r+")
        return cls(url, group, _typed(url, group.attrs[MANIFEST_KEY]))

    # -- progress -------------------------------------------------------------------------
    def completed_shards(self) -> set[int]:
        """Shards whose data this writer's job has written: all of a build's arrays, or while adding
        teachers, the tokens of every teacher being added."""
        done = set()
        for key in keys.keys(self.group, keys.ADDING if self.adding else keys.PROGRESS):
            shard = keys.record_shard(key)
            if shard is None:
                continue
            if self.adding:
                record = json.loads(keys.get(self.group, key) or b"{}")
                if not set(self.adding) <= set(record.get("teachers") or ()):
                    continue
            done.add(shard)
        return done

    def sources(self) -> list[dict[str, Any]]:
        return json.loads(keys.get(self.group, keys.SOURCES_KEY) or b"[]")

    def labels(self) -> np.ndarray:
        """The labels written so far (int32, -1 where no row is)."""
        return np.asarray(self.group["labels"][:])

    def stored_bytes(self) -> int:
        """Bytes stored in all arrays."""
        return sum(stored_bytes(self.group).values())

    def write_shard(
        self,
        shard: int,
        *,
        latents: np.ndarray | None = None,
        features: Mapping[str, np.ndarray],
        labels: np.ndarray | None = None,
        skipped: Iterable[Mapping[str, Any]] = (),
        scales: Mapping[str, np.ndarray] | None = None,
        source_digests: Sequence[str] | None = None,
    ) -> None:
        """Write every array of one shard, then its progress record (the commit point).

        ``features`` maps each teacher to its tokens (n, F, T, D): float16 for a float16 teacher; for an
        int8 teacher either int8 values with their float32 ``scales[name]`` (n, F, T), or float tokens,
        which are quantised here (:func:`cache.quant.quantize_tokens`). ``source_digests``: the checksum of each
        row's source file bytes ("" where none), kept in the record so that a teacher added later can prove it
        reads the same images (:meth:`source_digests`).

        While adding teachers (:attr:`adding`), ``features`` holds the added teachers alone and
        ``latents``, ``labels`` and ``skipped`` are not given: the shard's record of the addition is written
        after its tokens."""
        lo, hi = self.shard_range(shard)
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
            keys.put(self.group, keys.record_key(keys.ADDING, shard), json.dumps(record).encode())
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
        if source_digests is not None:
            if len(source_digests) != n:
                raise CacheError(f"shard {shard}: {len(source_digests)} source checksums for {n} rows")
            record["sources"] = list(source_digests)
        keys.put(self.group, keys.record_key(keys.PROGRESS, shard), json.dumps(record).encode())

    def source_digests(self, shard: int) -> list[str] | None:
        """The checksums of the source files of shard ``shard``'s rows that its build recorded ("" for a file
        that did not decode); None for a shard written before they were recorded."""
        raw = keys.get(self.group, keys.record_key(keys.PROGRESS, shard))
        digests = None if raw is None else json.loads(raw).get("sources")
        return list(digests) if isinstance(digests, list) else None

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
        data = keys.get(self.group, key)
        if data is None:
            raise CacheError(f"{keys.where(self.url, key)}: zarr stored no object for shard {shard} of {array.path}",
                             url=self.url)
        return checksum(data)

    def _write_rows(self, array: Any, shard: int, data: np.ndarray) -> str:
        """Write the shard's rows of one array; returns the checksum of the stored object."""
        data = np.asarray(data, dtype=array.dtype)
        lo, hi = self.shard_range(shard)
        root = local_root(self.url)
        if array.path not in self._direct:
            fmt, reason = choose_io(root, array)
            self._direct[array.path] = fmt
            log_io_choice("writes", self.url, array.path, fmt, reason)
        fmt = self._direct[array.path]
        if fmt is not None:
            try:
                return write_shard_file(os.path.join(root, array.path, fmt.shard_key(shard)), data, fmt)
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
        missing = sorted(set(range(self.num_shards)) - self.completed_shards())
        if missing:
            raise CacheError(f"cannot finalize: {len(missing)} shards missing (first {missing[:5]})", url=self.url,
                             remedy="resume")
        if self.adding:
            return self._finish_addition()
        skipped = []
        for shard in range(self.num_shards):
            skipped += json.loads(keys.get(self.group, keys.record_key(keys.PROGRESS, shard)))["skipped"]
        manifest = dict(self.group.attrs[MANIFEST_KEY])
        manifest.update(complete=True, skipped=skipped, stats=dict(stats))
        self.manifest = _typed(self.url, manifest)
        self.group.attrs[MANIFEST_KEY] = self.manifest.to_dict()
        return self.manifest

    def _finish_addition(self) -> Manifest:
        for shard in range(self.num_shards):
            added = json.loads(keys.get(self.group, keys.record_key(keys.ADDING, shard)))
            key = keys.record_key(keys.PROGRESS, shard)
            record = json.loads(keys.get(self.group, key))
            record["checksums"] = {**record.get("checksums", {}), **added["checksums"]}
            keys.put(self.group, key, json.dumps(record).encode())
        stored = dict(self.group.attrs[MANIFEST_KEY])
        pending = stored.pop("adding")
        stored["layout"] = self.layout.to_dict()
        stored["teachers"] = {**(stored.get("teachers") or {}), **{k: v["record"] for k, v in pending.items()}}
        self.manifest = _typed(self.url, stored)
        self.group.attrs[MANIFEST_KEY] = self.manifest.to_dict()
        for key in keys.keys(self.group, keys.ADDING):
            keys.delete(self.group, key)
        _logger.info("%s: added teacher(s) %s", self.url, ", ".join(self.adding))
        self.adding = ()
        return self.manifest

    def forget_damaged(self) -> list[Problem]:
        """Verify every finished shard (:func:`cache.formats.zarr.reader.verify_shards`) and forget the
        damaged ones, so that the resume path encodes them again: the manifest is marked incomplete first,
        then each damaged shard's progress record is deleted, then its objects. Returns the damage found."""
        if self.adding:
            raise CacheError(f"{self.url} is adding teacher(s) {', '.join(self.adding)}: finish or drop that addition "
                             "before a repair", url=self.url, remedy="addition")
        damage = verify_shards(self.group, self.url, self.layout)
        shards = sorted({d.shard for d in damage})
        if shards and self.manifest.is_complete:
            manifest = dict(self.group.attrs[MANIFEST_KEY])
            manifest["complete"] = False
            self.manifest = _typed(self.url, manifest)
            self.group.attrs[MANIFEST_KEY] = self.manifest.to_dict()
        arrays = data_arrays(self.group, self.layout)
        for shard in shards:
            keys.delete(self.group, keys.record_key(keys.PROGRESS, shard))
            for arr in arrays.values():
                keys.delete(self.group, f"{arr.path}/{shard_key(arr, shard)}")
        return damage

    def put_text(self, key: str, text: str) -> None:
        """Store a text record (resolved config) under ``build/``."""
        keys.put(self.group, f"build/{key}", text.encode())
