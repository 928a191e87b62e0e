"""The HDF5 format of a feature cache: one ``.h5`` file, its writer and its reader.

This module is the only code that knows this layout::

    /latents                  (N, F, 8, R/8, R/8) float16, contiguous, uncompressed (or chunked + gzip)
    /features/<teacher>       (N, F, T, D) float16, or int8 for a teacher the layout stores as int8
    /feature_scales/<teacher> (N, F, T) float32: one scale per token, int8 teachers only (cache.quant)
    /labels                   (N,) int32; -1 marks a skipped source file (its row holds zeros)
    /sources_json             uint8: the build's source list as JSON (relative path and size per row)
    attrs["urepa_cache"]      the build manifest, verbatim, as a JSON string (its layout names each
                              teacher's stored dtype; the datasets must match it)
    attrs["urepa_hdf5"]       this format's record (JSON): version, block_rows, and the crc32c of every
                              block of ``block_rows`` rows of every dataset (and of the source list),
                              written last, so :meth:`H5Cache.verify` finds a flipped byte anywhere

The same rows as the zarr cache it was converted from (``python -m cache.convert``), so row i is
source file i. REPA-E stores its SD-VAE moments in one such file.

Reading. For a contiguous, unfiltered, little-endian dataset whose offset HDF5 reports
(``dataset.id.get_offset()``, computed once at open), a row is a byte range of the file: the loader
reads it with ``os.preadv`` from reader threads into the batch, as the zarr path does, and never
takes h5py's global lock. Anything else (a chunked or compressed file, ``UREPA_IO=library``, a
direct read that fails for a reason other than a short file) goes through h5py, logged once. The
file is opened lazily, per process (and per thread on h5py's path): nothing is held open by
:class:`H5Cache` itself, so it may be handed to forked workers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CacheChangedError, CacheError
from ..files import ENV_LIBRARY_IO, FileStamp, ProcessFile, checksum, library_io_forced, pread_rows
from ..layout import SCALES_GROUP, ByTeacher, Layout
from ..manifest import MANIFEST_KEY, Manifest, check_manifest
from ..reader import CacheReader, Problem
from ..writer import CopyWriter, Format

__all__ = ["HDF5", "H5Cache", "H5Writer", "FORMAT_KEY", "FORMAT_VERSION", "SIGNATURE"]

_logger = logging.getLogger(__name__)

FORMAT_KEY = "urepa_hdf5"
FORMAT_VERSION = 1
SOURCES = "sources_json"
SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first bytes of every HDF5 file


def _h5py() -> Any:
    import h5py

    return h5py


def dataset_dtype(layout: Layout, name: str) -> np.dtype:
    """The stored dtype of dataset ``name``: the layout's, little-endian."""
    return np.dtype(layout.row_shapes()[name][1]).newbyteorder("<")


class H5Writer(CopyWriter):
    """Writes one HDF5 cache at ``path`` (the caller's temporary name) block by block; :meth:`finish`
    records the block checksums last. ``compression``: "none" (contiguous, read by byte range) or "gzip"
    (chunked by ``block_rows``, read through h5py). An HDF5 file is not safely resumable: a rerun starts
    again (it costs one read of the source)."""

    def __init__(self, path: str, *, layout: Layout, manifest: Manifest, sources: list[dict[str, Any]],
                 block_rows: int = 256, compression: str = "none") -> None:
        h5py = _h5py()
        if os.path.lexists(path):  # our own temporary name, left by a killed conversion
            os.remove(path)
        compression = None if compression == "none" else compression
        self.path, self.layout, self.block_rows = path, layout, block_rows
        self.file = h5py.File(path, "w", libver="latest")  # dense attributes: a manifest may exceed 64 KiB
        self.sums: dict[str, list[str]] = {name: [] for name in layout.array_names()}
        for name, (shape, _) in layout.row_shapes().items():
            kw: dict[str, Any] = {}
            if compression is not None:
                kw = dict(chunks=(min(block_rows, layout.num_rows), *shape), compression=compression)
            self.file.create_dataset(name, shape=(layout.num_rows, *shape), dtype=dataset_dtype(layout, name), **kw)
        raw = json.dumps(list(sources)).encode()
        self.file.create_dataset(SOURCES, data=np.frombuffer(raw, dtype=np.uint8))
        self.sources_sum = checksum(raw)
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest.to_dict())

    def write_block(self, lo: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Rows ``lo .. lo + block_rows`` (fewer for the last block) of every dataset, each in its stored
        dtype (int8 tokens with their float32 scales, never float tokens to be quantised here)."""
        if lo % self.block_rows:
            raise ValueError(f"block at row {lo} is not aligned to {self.block_rows} rows")
        for name in self.layout.array_names():
            want = dataset_dtype(self.layout, name)
            if np.dtype(arrays[name].dtype).kind != want.kind or np.dtype(arrays[name].dtype).itemsize != want.itemsize:
                raise CacheError(f"{self.path}: rows of '{name}' given as {arrays[name].dtype}, stored as {want}",
                                 url=self.path)
            data = np.ascontiguousarray(arrays[name], dtype=want)
            self.file[name][lo:lo + len(data)] = data
            self.sums[name].append(checksum(data))

    def finish(self) -> None:
        record = {"version": FORMAT_VERSION, "block_rows": self.block_rows, "checksums": self.sums,
                  "sources": self.sources_sum}
        self.file.attrs[FORMAT_KEY] = json.dumps(record)
        self.file.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class _H5Array:
    """A read-only view of one dataset of an HDF5 cache: ``shape``, ``dtype``, ``[selection]`` (each read
    opens the file, reads through h5py and closes it)."""

    def __init__(self, path: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.name, self.shape, self.dtype = path, name, shape, dtype

    def __getitem__(self, sel: Any) -> np.ndarray:
        with _h5py().File(self.path, "r") as f:
            return f[self.name][sel]

    def __len__(self) -> int:
        return self.shape[0]


class H5Cache(CacheReader):
    """A finished HDF5 cache, opened for reading. Use :func:`cache.open_cache`; see
    :class:`cache.reader.CacheReader`."""

    format = "hdf5"

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.url = self.root = os.fspath(path)
        h5py = _h5py()
        self._stamp = FileStamp.of(self.url)
        try:
            f = h5py.File(self.url, "r")
        except OSError as e:
            raise CacheError(f"{self.url} is not a readable HDF5 cache ({e}): the file is truncated or damaged",
                             url=self.url, remedy="reconvert") from None
        with f:
            if MANIFEST_KEY not in f.attrs or FORMAT_KEY not in f.attrs:
                raise CacheError(f"{self.url} is an HDF5 file but not a finished feature cache (no '{MANIFEST_KEY}' "
                                 f"or '{FORMAT_KEY}' attribute: not written by cache.convert, or the conversion did "
                                 "not finish)", url=self.url, remedy="replace")
            where = f"the '{MANIFEST_KEY}' attribute of {self.url}"
            try:
                manifest = json.loads(f.attrs[MANIFEST_KEY])
                self.record = json.loads(f.attrs[FORMAT_KEY])
            except (TypeError, ValueError) as e:
                raise CacheError(f"{self.url}: its manifest or format record is not JSON ({e})", url=self.url,
                                 remedy="reconvert") from None
            try:
                self.manifest = check_manifest(self.url, manifest, where=where, allow_incomplete=allow_incomplete)
            except CacheError as e:
                raise CacheError(str(e), url=self.url, remedy="reconvert" if e.remedy == "rebuild" else e.remedy) from None
            self.layout = self.manifest.layout
            self.generation = self.manifest.generation
            shapes = {}
            self._offsets: dict[str, int | None] = {}
            self._chunk_rows = 1
            self._why_not_direct: dict[str, str] = {}
            for name, (row_shape, _) in self.layout.row_shapes().items():
                want = (self.layout.num_rows, *row_shape)
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise CacheError(f"{self.url} lacks the dataset '{name}' its manifest names", url=self.url,
                                     remedy="reconvert")
                ds = f[name]
                dtype = dataset_dtype(self.layout, name)
                if ds.shape != want or ds.dtype.kind != dtype.kind or ds.dtype.itemsize != dtype.itemsize:
                    raise CacheError(f"{self.url}: dataset '{name}' is {ds.shape} {ds.dtype}, its manifest says "
                                     f"{want} {dtype}: the file does not match its manifest", url=self.url,
                                     remedy="reconvert")
                shapes[name] = (want, ds.dtype)
                if ds.chunks and name != "labels":  # compressed copies are chunked by block: read whole by h5py
                    self._chunk_rows = max(self._chunk_rows, int(ds.chunks[0]))
                self._offsets[name], self._why_not_direct[name] = _direct_offset(ds, self._stamp.size)
            try:
                labels = f["labels"][:]
            except OSError as e:
                raise CacheError(f"{self.url}: the labels cannot be read ({e}): the file is damaged", url=self.url,
                                 remedy="reconvert") from None
        self.latents = _H5Array(self.url, "latents", *shapes["latents"])
        self.features = ByTeacher({t: _H5Array(self.url, f"features/{t}", *shapes[f"features/{t}"])
                                   for t in self.layout.teachers})
        self.feature_scales = ByTeacher({t: _H5Array(self.url, f"{SCALES_GROUP}/{t}", *shapes[f"{SCALES_GROUP}/{t}"])
                                         for t in self.layout.quantized_teachers})
        self._set_labels(labels.astype(np.int32))

    def check_unchanged(self) -> None:
        """The file was replaced or rewritten since it was opened: :class:`CacheChangedError` (one stat)."""
        if FileStamp.now(self.url) != self._stamp:
            raise CacheChangedError(f"the cache file {self.url} was replaced or removed while this loader read it; "
                                    "restart to read the cache as it is now", url=self.url)

    def sources(self) -> list[dict[str, Any]]:
        with _h5py().File(self.url, "r") as f:
            return json.loads(f[SOURCES][:].tobytes())

    def row_reader(self, name: str) -> _H5RowReader:
        return _H5RowReader(self, name)

    def stored_bytes(self) -> dict[str, int]:
        with _h5py().File(self.url, "r") as f:
            return {name: int(f[name].id.get_storage_size()) for name in self.layout.array_names()}

    @property
    def block_rows(self) -> int:
        return int(self.record.get("block_rows") or 256)

    @property
    def read_unit_rows(self) -> int:
        """A compressed copy's chunk (h5py decompresses it whole for any row of it); 1 for contiguous datasets."""
        return self._chunk_rows

    def describe_storage(self) -> str:
        return f"hdf5, blocks of {self.record.get('block_rows')} rows checksummed"

    def verify_stored(self) -> list[Problem]:
        """Every block of every dataset (and the source list) against the crc32c recorded at conversion."""
        return self._verify(0, self.layout.num_rows, sources=True)

    def verify_rows(self, lo: int, hi: int) -> list[Problem]:
        """The recorded blocks that hold rows lo..hi, against their crc32c."""
        return self._verify(lo, hi, sources=False)

    def _verify(self, start: int, stop: int, *, sources: bool) -> list[Problem]:
        problems = []
        block = int(self.record.get("block_rows", 0))
        sums = self.record.get("checksums", {})
        n = self.layout.num_rows
        first = start // block * block
        try:
            with _h5py().File(self.url, "r") as f:
                for name in self.layout.array_names():
                    recorded = sums.get(name, [])
                    for lo in range(first, stop, block):
                        k = lo // block
                        got = checksum(np.ascontiguousarray(f[name][lo:lo + block]))
                        want = recorded[k] if k < len(recorded) else None
                        if got != want:
                            problems.append(Problem(self.url, f"dataset '{name}' rows {lo}..{min(lo + block, n)} fail "
                                                    f"the checksum recorded at conversion ({got}, recorded {want})",
                                                    name, rows=(lo, min(lo + block, n)), remedy="reconvert"))
                if sources and checksum(f[SOURCES][:].tobytes()) != self.record.get("sources"):
                    problems.append(Problem(self.url, "the source list fails its checksum", remedy="reconvert"))
        except OSError as e:
            problems.append(Problem(self.url, f"cannot be read ({e}): the file is damaged", remedy="reconvert"))
        return problems


def _direct_offset(ds: Any, file_size: int) -> tuple[int | None, str]:
    """(the file offset of a dataset's first byte, "") when its rows can be read by byte range, else
    (None, why not)."""
    if library_io_forced():
        return None, f"forced by {ENV_LIBRARY_IO}=library"
    if ds.chunks is not None:
        return None, f"the dataset is chunked {ds.chunks}"
    if ds.id.get_create_plist().get_nfilters():
        return None, "the dataset has filters"
    if ds.dtype.byteorder not in ("<", "=", "|") or sys.byteorder != "little":
        return None, f"byte order {ds.dtype.byteorder!r} on a {sys.byteorder}-endian machine"
    offset = ds.id.get_offset()
    if offset is None:
        return None, "HDF5 reports no offset (storage not allocated)"
    if offset + ds.id.get_storage_size() > file_size:
        return None, f"the dataset ends past the file's {file_size} bytes"
    return int(offset), ""


_LOGGED: set[tuple[str, str, bool]] = set()


def _log_choice(path: str, name: str, direct: bool, reason: str, *, fell_back: bool = False) -> None:
    key = (path, name, direct)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    if direct:
        _logger.info("%s: %s reads by byte range", path, name)
    elif fell_back:
        _logger.warning("%s: %s reads through h5py from now on: %s", path, name, reason)
    else:
        _logger.info("%s: %s reads through h5py: %s", path, name, reason)


class _H5RowReader:
    """Reads single rows (one variant each) of one dataset into a batch: by byte range (``os.preadv``)
    where :func:`_direct_offset` allowed it, else through h5py (a file handle per thread and process)."""

    def __init__(self, cache: H5Cache, name: str) -> None:
        self.path, self.name = cache.url, name
        array = cache.array(name)
        self.shape, self.dtype = array.shape, np.dtype(array.dtype)
        self.variant_shape = tuple(self.shape[2:])
        self.variant_nbytes = int(np.prod(self.variant_shape)) * self.dtype.itemsize
        self.row_nbytes = self.variant_nbytes * self.shape[1]
        self.offset = cache._offsets[name]
        _log_choice(self.path, name, self.offset is not None, cache._why_not_direct[name])
        self._file = ProcessFile(self.path)  # opened lazily in each process, never inherited across a fork
        self._local = threading.local()

    @property
    def direct(self) -> bool:
        return self.offset is not None

    def close(self) -> None:
        self._file.close()

    def plan(self, rows: np.ndarray) -> None:
        """Single rows of a local file read cheaply: the loader's plan changes nothing."""

    def read(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        """out[i] = dataset[rows[i], variants[i]]."""
        if self.offset is not None:
            try:
                self._read_direct(rows, variants, out)
                return
            except CacheError:
                raise
            except Exception as e:  # not damage: a platform this code does not know; h5py is correct
                self.offset = None
                _log_choice(self.path, self.name, False, f"a direct read failed ({type(e).__name__}: {e})",
                            fell_back=True)
        f = getattr(self._local, "file", None)
        if f is None or self._local.pid != os.getpid():
            f = self._local.file = _h5py().File(self.path, "r")
            self._local.pid = os.getpid()
        order = np.argsort(rows, kind="stable")
        try:
            block = f[self.name][rows[order]]
        except OSError as e:
            raise CacheError(f"{self.path}: reading '{self.name}' through h5py failed ({e}): the file is damaged",
                             url=self.path, remedy="reconvert") from None
        out[order] = block[np.arange(len(rows)), variants[order]]

    def _read_direct(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        offsets = self.offset + rows.astype(np.int64) * self.row_nbytes + variants.astype(np.int64) * self.variant_nbytes
        short = pread_rows(self._file.fd(), offsets, out)
        if short is not None:
            raise CacheError(f"{self.path} ends inside row {int(rows[short])} of '{self.name}': the file is truncated",
                             url=self.path, remedy="reconvert")


def _claims(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(len(SIGNATURE)) == SIGNATURE


HDF5 = Format(name="hdf5", claims=_claims, open=H5Cache, copy_writer=H5Writer, options=("compression",),
              description="an HDF5 cache (one .h5 file that starts with HDF5's signature)")
