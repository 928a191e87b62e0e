"""Reading an FFCV cache: :class:`FfcvCache`, rows by byte range (:class:`_BetonRowReader`) or whole batches
from FFCV's own loader (:class:`_FfcvSource`); see the package's docstring."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ...errors import CacheChangedError, CacheError
from ...files import (
    ENV_LIBRARY_IO,
    FileStamp,
    ProcessFile,
    checksum,
    file_checksum,
    library_io_forced,
    pread_rows,
)
from ...layout import SCALES_GROUP, ByTeacher, Layout
from ...manifest import check_manifest
from ...reader import CacheReader, Problem
from .fields import (
    BETON,
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    RECORD,
    SOURCES,
    _expected_fields,
    _field_descriptors,
    array_dtypes,
    field_names,
    variant_shapes,
)

__all__ = ["FfcvCache"]

_logger = logging.getLogger(__name__)


class _BetonArray:
    """A read-only view of one array of an FFCV cache: ``shape``, ``dtype``, ``[rows]`` or ``[rows, ...]`` (an
    int, a slice or an index array along rows, then any index of what they hold; each read runs one FFCV
    loader over the rows' samples)."""

    def __init__(self, cache: FfcvCache, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cache, self.name, self.shape, self.dtype = cache, name, shape, dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, tuple):  # rows first, then the rest of the selection on what they read
            block = self[sel[0]]
            single = np.ndim(np.arange(self.shape[0])[sel[0]]) == 0
            return block[sel[1:]] if single else block[(slice(None), *sel[1:])]
        rows = np.arange(self.shape[0])[sel]
        scalar = np.ndim(rows) == 0
        rows = np.atleast_1d(rows).astype(np.int64)
        f = self.shape[1]
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        if len(rows):
            ids = (rows[:, None] * f + np.arange(f)[None, :]).reshape(-1)
            got = np.concatenate([b[self.name] for b in self.cache._run([self.name], ids, batch_size=len(ids))])
            out[...] = got.reshape(out.shape)
        return out[0] if scalar else out


class FfcvCache(CacheReader):
    """A finished FFCV cache, opened for reading. Use :func:`cache.open_cache`; see
    :class:`cache.reader.CacheReader`."""

    format = "ffcv"

    def __init__(self, folder: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.url = self.root = os.fspath(folder)
        record_path = os.path.join(self.url, RECORD)
        try:
            with open(record_path) as f:
                self.record = json.load(f)
            with open(os.path.join(self.url, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise self._damaged(f"{self.url} is not a readable FFCV cache ({type(e).__name__}: {e})") from None
        if not isinstance(self.record, dict) or self.record.get("format") != "urepa-ffcv":
            raise CacheError(f"{record_path} is not this code's FFCV cache record", url=self.url, remedy="replace")
        if self.record.get("version") != FORMAT_VERSION:
            raise self._damaged(f"{record_path}: FFCV cache format {self.record.get('version')}, this code reads "
                                f"{FORMAT_VERSION}")
        try:
            self.manifest = check_manifest(self.url, manifest, where=os.path.join(self.url, MANIFEST),
                                           allow_incomplete=allow_incomplete)
        except CacheError as e:
            raise CacheError(str(e), url=self.url, remedy="reconvert" if e.remedy == "rebuild" else e.remedy) from None
        self.layout = self.manifest.layout
        self.generation = self.manifest.generation
        self.beton = os.path.join(self.url, self.record.get("file", BETON))
        if self.record.get("fields") != field_names(self.layout) or self.record.get("variants") != self.layout.variants:
            raise self._damaged(f"{record_path} does not match {os.path.join(self.url, MANIFEST)} (fields or variants "
                                "differ): the folder mixes two caches")
        self._stamp = self._check_file()
        try:
            labels = np.load(os.path.join(self.url, LABELS))
        except (OSError, ValueError) as e:
            raise self._damaged(f"{os.path.join(self.url, LABELS)} cannot be read ({e})") from None
        if labels.shape != (self.layout.num_rows,) or checksum(np.ascontiguousarray(labels)) != self.record.get("labels"):
            raise self._damaged(f"{os.path.join(self.url, LABELS)} does not match the record (shape {labels.shape} or "
                                "its checksum): the folder is damaged")
        n, f = self.layout.num_rows, self.layout.variants
        shapes, dtypes = variant_shapes(self.layout), array_dtypes(self.layout)
        self.latents = _BetonArray(self, "latents", (n, f, *shapes["latents"]), dtypes["latents"])
        self.features = ByTeacher({t: _BetonArray(self, f"features/{t}", (n, f, *shapes[f"features/{t}"]),
                                                  dtypes[f"features/{t}"]) for t in self.layout.teachers})
        self.feature_scales = ByTeacher({t: _BetonArray(self, f"{SCALES_GROUP}/{t}", (n, f, *shapes[f"{SCALES_GROUP}/{t}"]),
                                                        dtypes[f"{SCALES_GROUP}/{t}"]) for t in self.layout.quantized_teachers})
        self._set_labels(labels.astype(np.int32))
        self._pointers, self._why_not_direct = _direct_pointers(self.beton, self.layout, self._stamp.size)

    def _damaged(self, message: str) -> CacheError:
        return CacheError(message, url=self.url, remedy="reconvert")

    def _check_file(self) -> FileStamp:
        """Before FFCV reads the .beton: its size is the recorded one, its header names the samples and
        fields this cache has (each field's name, dtype and shape those of the manifest's layout) and its
        allocation table lies inside the file. Returns (inode, mtime, size)."""
        from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType

        try:
            stamp = FileStamp.of(self.beton)
        except OSError as e:
            raise self._damaged(f"{self.beton} is missing ({e})") from None
        if stamp.size != self.record.get("size"):
            raise self._damaged(f"{self.beton} has {stamp.size} bytes, {self.record.get('size')} when it was written: "
                                "the file is truncated or was replaced")
        num_fields = len(self.record["fields"]) + 1
        with open(self.beton, "rb") as fh:
            header = np.frombuffer(fh.read(HeaderType.itemsize), dtype=HeaderType)
            descriptors = np.frombuffer(fh.read(FieldDescType.itemsize * num_fields), dtype=np.uint8)
        samples = self.layout.num_rows * self.layout.variants
        if (len(header) != 1 or int(header["num_samples"][0]) != samples
                or int(header["num_fields"][0]) != num_fields
                or int(header["alloc_table_ptr"][0]) + samples * ALLOC_TABLE_TYPE.itemsize > stamp.size):
            raise self._damaged(f"{self.beton}: its header does not match the cache's manifest ({samples} samples, "
                                f"{num_fields} fields) or points outside the file")
        got = (_field_descriptors(descriptors.view(FieldDescType))
               if descriptors.size == FieldDescType.itemsize * num_fields else None)
        want = _expected_fields(self.layout)
        if got != want:
            raise self._damaged(f"{self.beton}: its fields {got} do not match the cache's manifest, which says {want} "
                                "(name: dtype, shape): the file does not match its manifest")
        return stamp

    def check_unchanged(self) -> None:
        if FileStamp.now(self.beton) != self._stamp:
            raise CacheChangedError(f"the cache file {self.beton} was replaced or removed while this loader read it; "
                                    "restart to read the cache as it is now", url=self.url)

    def sources(self) -> list[dict[str, Any]]:
        with open(os.path.join(self.url, SOURCES)) as f:
            return json.load(f)

    def stored_bytes(self) -> dict[str, int]:
        return {"data.beton": os.path.getsize(self.beton), "labels": os.path.getsize(os.path.join(self.url, LABELS))}

    def describe_storage(self) -> str:
        return f"ffcv, {os.path.basename(self.beton)} (one sample per row and variant)"

    def verify_rows(self, lo: int, hi: int) -> list[Problem]:
        """FFCV records one crc32c for the whole .beton: the whole file, checked once per opened cache."""
        if getattr(self, "_verified", None) is None:
            self._verified = self.verify_stored()
        return list(self._verified)

    def verify_stored(self) -> list[Problem]:
        """The whole .beton against the crc32c recorded at conversion (and its size and header)."""
        try:
            self._check_file()
        except CacheError as e:
            return [Problem(self.beton, str(e), remedy="reconvert")]
        got = file_checksum(self.beton)
        if got != self.record.get("checksum"):
            return [Problem(self.beton, f"fails the checksum recorded at conversion ({got}, recorded "
                            f"{self.record.get('checksum')}): the file is damaged", remedy="reconvert")]
        return []

    @property
    def reads_rows(self) -> bool:  # type: ignore[override]
        """Whether rows are read by byte range (else whole batches through FFCV's loader, :meth:`batch_source`)."""
        return self._pointers is not None

    def row_reader(self, name: str) -> _BetonRowReader:
        if self._pointers is None:
            return super().row_reader(name)
        return _BetonRowReader(self, name)

    def batch_source(self, keys: Sequence[str], *, num_workers: int, prefetch: int) -> _FfcvSource | None:
        """FFCV's own loader, where rows cannot be read by byte range; None (row readers) where they can."""
        _log_choice(self.beton, self._pointers is not None, self._why_not_direct)
        if self._pointers is not None:
            return None
        return _FfcvSource(self, list(keys), num_workers=num_workers, prefetch=prefetch)

    def _run(self, keys: Sequence[str], ids: np.ndarray, *, batch_size: int, num_workers: int = 1,
             prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
        """FFCV's loader over samples ``ids`` in this order, ``batch_size`` at a time: dicts key -> views
        of FFCV's buffers in the arrays' dtypes (:func:`array_dtypes`; valid until the next batch)."""
        import numba
        from ffcv.fields.decoders import NDArrayDecoder
        from ffcv.loader import Loader, OrderOption

        if self._check_file() != self._stamp:
            raise CacheChangedError(f"the cache file {self.beton} was replaced while it was open; restart to read it", url=self.url)
        names = field_names(self.layout)
        wanted = {names[k]: k for k in keys}
        pipelines: dict[str, Any] = {field: ([NDArrayDecoder()] if field in wanted else None) for field in names.values()}
        pipelines["label"] = None
        num_workers = max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))  # numba's limit: the cores
        loader = Loader(self.beton, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                        indices=np.asarray(ids, dtype=np.int64), drop_last=False, os_cache=True,
                        batches_ahead=max(1, prefetch), pipelines=pipelines)
        fields_in_order = [field for field in names.values() if field in wanted]  # FFCV yields the file's order
        dtypes, shapes = array_dtypes(self.layout), variant_shapes(self.layout)
        it = iter(loader)
        try:
            for out in it:
                yield {wanted[field]: np.asarray(arr).view(dtypes[wanted[field]]).reshape(len(arr), *shapes[wanted[field]])
                       for field, arr in zip(fields_in_order, out, strict=True)}
        finally:
            it.close()


def _direct_pointers(beton: str, layout: Layout, file_size: int) -> tuple[dict[str, np.ndarray] | None, str]:
    """(field name -> the file offset of every sample's bytes, "") when rows can be read by byte range, else
    (None, why not). The offsets come from FFCV's own reader of the header's per-sample metadata."""
    if library_io_forced():
        return None, f"forced by {ENV_LIBRARY_IO}=library"
    if sys.byteorder != "little":
        return None, f"a {sys.byteorder}-endian machine"
    from ffcv.reader import Reader

    try:
        metadata = Reader(beton).metadata
    except Exception as e:  # FFCV's reader asserts, or reads past the end: FFCV's loader would fail the same way
        return None, f"FFCV's reader cannot parse the header ({type(e).__name__}: {e})"
    shapes, dtypes = variant_shapes(layout), array_dtypes(layout)
    samples = layout.num_rows * layout.variants
    out = {}
    for i, (key, field) in enumerate(field_names(layout).items()):  # FFCV names the metadata of field i 'f<i>'
        if f"f{i}" not in (metadata.dtype.names or ()) or len(metadata) != samples:
            return None, f"the per-sample metadata has no entry for field {field!r} of {samples} samples"
        ptr = np.asarray(metadata[f"f{i}"], dtype=np.int64)
        size = int(np.prod(shapes[key])) * dtypes[key].itemsize
        if len(ptr) and (ptr.min() < 0 or ptr.max() + size > file_size):
            return None, f"field {field!r} points outside the file's {file_size} bytes"
        out[key] = ptr
    return out, ""


_LOGGED: set[tuple[str, bool, bool]] = set()


def _log_choice(path: str, direct: bool, reason: str, *, fell_back: bool = False) -> None:
    if (path, direct, fell_back) in _LOGGED:
        return
    _LOGGED.add((path, direct, fell_back))
    if direct:
        _logger.info("%s: rows read by byte range", path)
    elif fell_back:
        _logger.warning("%s: batches come from FFCV's loader from now on: %s", path, reason)
    else:
        _logger.info("%s: batches come from FFCV's loader: %s", path, reason)


class _BetonRowReader:
    """Reads single rows (one variant each) of one array into a batch by byte range (``os.preadv`` at the
    sample's pointer); after a direct read that fails for a reason other than a short file, through FFCV's
    loader (:class:`_BetonArray`) instead."""

    def __init__(self, cache: FfcvCache, name: str) -> None:
        self.cache, self.name, self.path = cache, name, cache.beton
        self.variants = cache.layout.variants
        self.variant_shape = variant_shapes(cache.layout)[name]
        self.dtype = array_dtypes(cache.layout)[name]
        self.variant_nbytes = int(np.prod(self.variant_shape)) * self.dtype.itemsize
        self.pointers: np.ndarray | None = cache._pointers[name] if cache._pointers is not None else None
        self._file = ProcessFile(self.path)  # opened lazily in each process, never inherited across a fork

    @property
    def direct(self) -> bool:
        return self.pointers is not None

    def close(self) -> None:
        self._file.close()

    def plan(self, rows: np.ndarray) -> None:
        """Single rows of a local file read cheaply: the loader's plan changes nothing."""

    def read(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        """out[i] = array[rows[i], variants[i]]."""
        if self.pointers is not None:
            try:
                self._read_direct(rows, variants, out)
                return
            except CacheError:
                raise
            except Exception as e:  # not damage: a platform this code does not know; FFCV's loader is correct
                self.pointers = None
                _log_choice(self.path, False, f"a direct read failed ({type(e).__name__}: {e})", fell_back=True)
        array = {"latents": self.cache.latents, **{f"features/{t}": a for t, a in self.cache.features.items()},
                 **{f"{SCALES_GROUP}/{t}": a for t, a in self.cache.feature_scales.items()}}[self.name]
        block = array[rows]
        out[...] = block[np.arange(len(rows)), variants]

    def _read_direct(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        assert self.pointers is not None
        offsets = self.pointers[rows.astype(np.int64) * self.variants + variants.astype(np.int64)]
        short = pread_rows(self._file.fd(), offsets, out)
        if short is not None:
            raise CacheError(f"{self.path} ends inside row {int(rows[short])} of '{self.name}': the file is truncated",
                             url=self.cache.url, remedy="reconvert")


class _FfcvSource:
    """Batches of one epoch and rank from FFCV's loader, in :class:`cache.loader.CacheLoader`'s order."""

    def __init__(self, cache: FfcvCache, keys: list[str], *, num_workers: int, prefetch: int) -> None:
        self.cache, self.keys, self.num_workers, self.prefetch = cache, keys, num_workers, prefetch
        shapes, dtypes = variant_shapes(cache.layout), array_dtypes(cache.layout)
        self.variant_shapes = {k: shapes[k] for k in keys}
        self.variant_dtypes = {k: dtypes[k] for k in keys}

    def batches(self, order: np.ndarray, variants: np.ndarray,
                batches: Sequence[tuple[int, int]]) -> Iterator[dict[str, np.ndarray]]:
        if not batches:
            return
        sizes = [hi - lo for lo, hi in batches]
        size = sizes[0]
        if any(s != size for s in sizes[:-1]) or sizes[-1] > size:
            raise ValueError(f"batches of sizes {sorted(set(sizes))}: only the last may be smaller")
        ids = np.concatenate([order[lo:hi] * self.cache.layout.variants + variants[lo:hi] for lo, hi in batches])
        yield from self.cache._run(self.keys, ids, batch_size=size, num_workers=self.num_workers,
                                   prefetch=self.prefetch)

    def close(self) -> None:
        """Nothing is held between epochs: each :meth:`batches` call owns its FFCV loader."""
