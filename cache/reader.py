"""The reader contract: what every cache format offers the loader, the ``torch.utils.data`` datasets,
``cache.inspect`` and ``cache.convert``, which reach a format through it alone.

A format subclasses :class:`CacheReader` and gets rows to the loader one of two ways:

- :meth:`CacheReader.row_reader` (formats that read rows, :attr:`CacheReader.reads_rows`): a
  :class:`RowReader` per array reads single rows into the loader's batches;
- :meth:`CacheReader.batch_source` (formats whose own loader assembles whole batches, such as FFCV):
  a :class:`BatchSource` is fed this rank's positions of the loader's order.

Checking a cache is :meth:`CacheReader.verify`: the format's own checks of what it stored
(:meth:`CacheReader.verify_stored`: checksums, presence, indexes), then the same label and value
checks in every format; each finding is one :class:`Problem`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import numpy as np

from .errors import CacheError, Remedy, ShardReadError
from .layout import SCALES_GROUP, Layout
from .loader import CacheLoader
from .manifest import Manifest, channel_scales_of

__all__ = ["Problem", "RowReader", "BatchSource", "CacheReader", "value_problems"]


@dataclass(frozen=True)
class Problem:
    """One fault of a cache, as :meth:`CacheReader.verify` finds it. ``where``: the object, file or URL;
    ``array``: 'latents', 'features/<t>', 'feature_scales/<t>', 'labels', 'progress' (a shard's record) or
    None (the cache as a whole); ``rows`` (lo, hi) where it is (None: everywhere), and for zarr the
    ``shard``; ``remedy``: which kind of fix applies (:data:`cache.errors.REMEDIES`)."""

    where: str
    problem: str
    array: str | None = None
    shard: int | None = None
    rows: tuple[int, int] | None = None
    remedy: Remedy | None = None

    def __str__(self) -> str:
        if self.shard is not None:
            return f"{self.array} shard {self.shard} ({self.where}): {self.problem}"
        if self.array is not None and self.rows is not None:
            return f"{self.where}: {self.array} rows {self.rows[0]}..{self.rows[1]}: {self.problem}"
        return f"{self.where}: {self.problem}"


class RowReader(Protocol):
    """Reads single rows (one variant each) of one array into a batch."""

    variant_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def direct(self) -> bool:
        """Whether rows are read by byte range (the fast path) rather than through the format's library."""

    def read(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = array[rows[i], variants[i]]``."""

    def plan(self, rows: np.ndarray) -> None:
        """The rows :meth:`read` will be asked for from now on, in order (the loader's block order): a hint.
        A reader that fetches whole pieces (the remote reader: whole chunks) keeps each until its rows are
        read; one that reads single rows cheaply ignores it. Reads stay correct whatever the plan."""

    def close(self) -> None: ...


class BatchSource(Protocol):
    """Whole batches of one epoch and rank from a format's own loader, in the loader's order."""

    variant_shapes: Mapping[str, tuple[int, ...]]
    variant_dtypes: Mapping[str, np.dtype]

    def batches(self, order: np.ndarray, variants: np.ndarray,
                batches: Sequence[tuple[int, int]]) -> Iterator[dict[str, np.ndarray]]:
        """One dict key -> (n, ...) array per ``(lo, hi)`` of ``batches`` (views valid until the next)."""

    def close(self) -> None: ...


class CacheReader(abc.ABC):
    """A finished cache opened for reading, in any format (:func:`cache.open_cache`).

    Attributes (set by each format's constructor):
        url: where the cache is; root: its local folder or file (None for remote stores).
        format: the format's name ('zarr', 'hdf5', 'ffcv').
        manifest: the build manifest (:class:`cache.manifest.Manifest`); layout: its :class:`Layout`.
        latents: array-like (N, F, 8, R/8, R/8) float16 of posterior moments (``.shape``, ``[rows]``).
        features: dict teacher name -> array-like (N, F, T, D): float16, or int8 for teachers stored as int8
            (``layout.quantized(name)``), whose float32 scales (N, F, T) are in ``feature_scales[name]``
            (tokens = values x scales x channel scales, :func:`cache.quant.dequantize_tokens`).
        feature_scales: dict int8 teacher name -> array-like (N, F, T) float32 (empty without int8 teachers).
        labels: numpy int32 (N,); -1 on skipped rows.
        rows: numpy int64 ids of the rows that hold data, ascending; ``len(cache)`` counts them.
        generation: the id of the cache's creation (None: not recorded).
        local_cache: the node-local copy of a store cache's objects (``open_cache(..., local_cache=DIR)``), or None.
    """

    format: ClassVar[str]
    #: Whether :meth:`row_reader` reads single rows (False: only whole batches, :meth:`batch_source`).
    reads_rows: ClassVar[bool] = True
    url: str
    root: str | None
    manifest: Manifest
    layout: Layout
    labels: np.ndarray
    rows: np.ndarray
    latents: Any
    features: Mapping[str, Any]
    feature_scales: Mapping[str, Any] = MappingProxyType({})
    generation: str | None = None
    #: node-local copies of a store cache's objects (:class:`cache.nodecache.NodeCache`), None where not used
    local_cache: Any = None
    _sources: list[dict[str, Any]] | None = None

    def _set_labels(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels)
        self.rows = np.flatnonzero(self.labels >= 0).astype(np.int64)

    # -- what a format defines ---------------------------------------------------------------
    @abc.abstractmethod
    def sources(self) -> list[dict[str, Any]]:
        """The build's source list (relative path, size and content hash of every source file, in row order)."""

    @abc.abstractmethod
    def stored_bytes(self) -> dict[str, int]:
        """Bytes stored per array (or per file of the format)."""

    @abc.abstractmethod
    def describe_storage(self) -> str:
        """One line on how the format stores this cache (for ``cache.inspect``)."""

    @abc.abstractmethod
    def verify_stored(self) -> list[Problem]:
        """The format's own check of what it stored (presence, recorded checksums, indexes)."""

    def row_reader(self, name: str) -> RowReader:
        """A reader of single rows of 'latents', 'features/<teacher>' or 'feature_scales/<teacher>'. A format
        that reads whole batches only (:attr:`reads_rows` False) refuses."""
        raise CacheError(f"the {self.format} cache {self.url} reads whole batches only (its own loader), not single "
                         "rows", url=self.url)

    def batch_source(self, keys: Sequence[str], *, num_workers: int, prefetch: int) -> BatchSource | None:
        """The format's own batch loader over ``keys``, or None: rows are read by :meth:`row_reader` (the default)."""
        return None

    def check_unchanged(self) -> None:  # noqa: B027 (a real default: formats that cannot tell check nothing)
        """Raise :class:`cache.errors.CacheChangedError` if the cache was replaced since it was opened."""

    @property
    def block_rows(self) -> int:
        """Rows the format reads well at once (zarr: a shard): what copies and checks read at a time."""
        return 256

    @property
    def read_unit_rows(self) -> int:
        """Consecutive rows that read well together, as one request and one unit of storage (zarr: an inner
        chunk): the blocks of the loader's ``order="blocks"`` (default 1: no unit known)."""
        return 1

    @abc.abstractmethod
    def verify_rows(self, lo: int, hi: int) -> list[Problem]:
        """The format's check of what it stored for rows lo..hi (what :meth:`read_checked` reads)."""

    def verify_blocks(self) -> list[tuple[int, int]]:
        """Row ranges whose values :meth:`verify` checks (default: every row, :attr:`block_rows` at a time)."""
        n, step = self.layout.num_rows, self.block_rows
        return [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    # -- shared ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.manifest.is_complete

    def channel_scales(self, name: str) -> np.ndarray | None:
        """Teacher ``name``'s per-channel scales, float32 (D,), for int8 tokens (``cache.quant``): tokens =
        values x scales x channel scales. None for float16 teachers and int8 caches without them (ones)."""
        return channel_scales_of(self.manifest, name, url=self.url)

    def array(self, name: str) -> Any:
        """The array-like of 'latents', 'features/<teacher>' or 'feature_scales/<teacher>'."""
        if name == "latents":
            return self.latents
        group, _, teacher = name.partition("/")
        arrays = {"features": self.features, SCALES_GROUP: self.feature_scales}.get(group)
        if arrays is None or teacher not in arrays:
            raise KeyError(f"{self.url} has no array {name!r}")
        return arrays[teacher]

    def teacher_names(self, wanted: Sequence[str] | None = None) -> list[str]:
        """``wanted`` (default: every teacher of the cache), checked: an unknown name is a ValueError that
        lists the teachers the cache holds."""
        names = list(self.layout.teachers) if wanted is None else list(wanted)
        unknown = [n for n in names if n not in self.layout.teachers]
        if unknown:
            raise ValueError(f"unknown teachers {unknown}: {self.url} holds "
                             f"{', '.join(map(repr, self.layout.teachers)) or 'no teacher'}")
        return names

    def source_path(self, row: int) -> str:
        """Path of the source image of ``row``, relative to the build's SOURCE folder."""
        if self._sources is None:
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

    def loader(self, batch_size: int, **kwargs: Any) -> CacheLoader:
        """A :class:`cache.loader.CacheLoader` over this cache; see its docstring for the options."""
        return CacheLoader(self, batch_size, **kwargs)

    # -- checking --------------------------------------------------------------------------
    def read_checked(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows lo..hi of every array (:meth:`Layout.array_names`, labels included) as stored, after the format
        checked what it recorded for them (:meth:`verify_rows`: damage or a missing object is a
        :class:`cache.errors.ShardReadError` naming the object and the rows, never zeros), and checked for
        values that cannot be right (:func:`value_problems`: a :class:`CacheError` naming the array and rows).
        What a copy of the cache reads (``cache.convert``)."""
        damage = self.verify_rows(lo, hi)
        if damage:
            d = damage[0]
            more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
            raise ShardReadError(f"{self.url}: rows {lo}..{hi} cannot be copied: {d}{more}", url=self.url, where=d.where,
                                 remedy=d.remedy)
        out = {name: np.asarray(self.array(name)[lo:hi]) for name in self.layout.array_names(labels=False)}
        out["labels"] = np.asarray(self.labels[lo:hi], dtype=np.int32)
        problems = value_problems(out, self.layout, len(self.manifest.classes), lo)
        if problems:
            raise CacheError(f"{self.url}: {problems[0]}", url=self.url, remedy="repair")
        return out

    def verify(self) -> list[Problem]:
        """Every fault found, one :class:`Problem` each (empty when sound): :meth:`verify_stored`; labels out
        of range or disagreeing with the skip list; then, in the blocks of :meth:`verify_blocks` that passed
        those checks, non-finite values and all-zero data rows."""
        stored = self.verify_stored()
        problems = stored + self._label_problems()
        if any(p.rows is None and p.remedy != "resume" for p in stored):  # the whole store is in doubt
            return problems
        damaged = [p for p in stored if p.rows is not None]
        for lo, hi in self.verify_blocks():
            data_rows = self.labels[lo:hi] >= 0
            for name in self.layout.array_names(labels=False):
                if any(_overlaps(p, name, lo, hi) for p in damaged):
                    continue
                try:
                    block = np.asarray(self.array(name)[lo:hi])
                except Exception as e:
                    problems.append(Problem(self.url, f"cannot be read ({type(e).__name__}: {e})", name,
                                            rows=(lo, hi), remedy="repair"))
                    continue
                if not np.isfinite(block).all():
                    problems.append(Problem(self.url, f"non-finite values in rows {lo}..{hi}", name, rows=(lo, hi),
                                            remedy="repair"))
                if name.startswith(SCALES_GROUP + "/") and (block < 0).any():
                    problems.append(Problem(self.url, f"negative per-token scales in rows {lo}..{hi}", name,
                                            rows=(lo, hi), remedy="repair"))
                empty = ~block.reshape(len(block), -1).any(axis=1) & data_rows
                if empty.any():
                    row = lo + int(np.flatnonzero(empty)[0])
                    problems.append(Problem(self.url, f"row {row} is all zeros (missing chunk?)", name, rows=(lo, hi),
                                            remedy="repair"))
        return problems

    def _label_problems(self) -> list[Problem]:
        problems = []
        ncls = len(self.manifest.classes)
        if self.labels.size and (self.labels.max() >= ncls or self.labels.min() < -1):
            problems.append(Problem(self.url, f"labels outside [-1, {ncls})", "labels", remedy="repair"))
        skipped_rows = {s.row for s in self.manifest.skipped_files}
        if self.complete and skipped_rows != set(np.flatnonzero(self.labels < 0).tolist()):
            problems.append(Problem(self.url, "rows with label -1 differ from the manifest's skip list", "labels",
                                    remedy="repair"))
        return problems


def _overlaps(p: Problem, name: str, lo: int, hi: int) -> bool:
    """Whether problem ``p`` already covers array ``name`` in rows lo..hi (a damaged object is not read again)."""
    return p.array in (name, "progress") and p.rows is not None and p.rows[0] < hi and lo < p.rows[1]


def value_problems(arrays: Mapping[str, np.ndarray], layout: Layout, num_classes: int, lo: int) -> list[str]:
    """Values that cannot be right in rows ``lo ..`` of a cache's arrays, one sentence each: non-finite latents,
    tokens or scales; negative per-token scales (the build writes ``max|x| / 127``); labels outside
    [-1, num_classes)."""
    out = []
    for name, values in arrays.items():
        hi = lo + len(values)
        if name == "labels":
            if values.size and (values.min() < -1 or values.max() >= num_classes):
                out.append(f"labels of rows {lo}..{hi} lie outside [-1, {num_classes})")
            continue
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            row = lo + int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0])
            out.append(f"{name} holds non-finite values (first in row {row})")
        if name.startswith(SCALES_GROUP + "/") and (values < 0).any():
            out.append(f"{name} holds negative scales in rows {lo}..{hi}")
    return out
