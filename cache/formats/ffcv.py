"""The FFCV format of a feature cache: a folder with one ``.beton`` file, its writer and its reader.

This module is the only code that knows this layout::

    <root>/ffcv.json       this format's record: version, the .beton's name, size and crc32c, the field
                           of every array, the variants, the crc32c of labels.npy; written last, so a
                           folder without it is never a cache
    <root>/manifest.json   the build manifest, verbatim
    <root>/sources.json    the build's source list (relative path and size per row)
    <root>/labels.npy      (N,) int32; -1 marks a skipped source file
    <root>/data.beton      FFCV's file: one sample per (row, variant), sample ``row * F + variant``;
                           fields ``latents`` (8, h, w), ``f0``, ``f1``, ... (T, D) per teacher in the
                           manifest's order, then ``s<i>`` float32 per-token scales for each int8
                           teacher ``f<i>`` (stored (T, 1), read as (T,)), then ``label``. A teacher's tokens are float16 or int8 as the
                           manifest's layout says. float16 values are stored as their int16 bit patterns
                           (FFCV's loader hangs on float16 fields) and viewed back; int8 and float32
                           are stored as they are.

Skipped rows are stored too (zeros, label -1) so that row i stays source file i; the loader's order
never visits them.

Reading. Every sample's array fields lie whole in one of FFCV's pages, at a file offset the header's
per-sample metadata records (``ptr``). Where FFCV's own reader parses that metadata, every pointer and
size lies inside the file and the machine is little-endian, a row is a byte range: the loader reads it
with ``os.preadv`` from reader threads straight into the batch, as the HDF5 and zarr paths do (float16
values are the int16 bit patterns stored, byte for byte). Anything else (``UREPA_IO=library``, metadata
that does not check out, a direct read that fails for a reason other than a short file) goes through
FFCV's own :class:`ffcv.loader.Loader` (its compiled pipelines, its page cache handling), fed the sample
ids of this epoch's and this rank's positions in our order (``indices=``,
``order=OrderOption.SEQUENTIAL``, ``drop_last=False``, our batch size), so its batches are ours
(:mod:`cache.loader`); logged once. Why not FFCV's loader always: it builds and compiles its pipeline
for every epoch (0.2 s constructing the loader plus about 0.8 s of numba compilation before the first
batch, per epoch, on the 2-core machine), maps the file afresh each epoch and copies each sample with
at most as many threads as cores (numba's ``NUMBA_NUM_THREADS``), and its buffers are reused, so each
batch is copied once more; measured in docs/benchmarks.md. FFCV trusts its file: on a truncated file
it may hang or crash. So the .beton's size and header are checked against the record before FFCV (or
a direct read) sees the file, at open and before every epoch's loader, and the header's field
descriptors (name, dtype, shape) against the manifest's layout at open; :meth:`FfcvCache.verify`
checks the whole file's crc32c.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import CacheChangedError, CacheError
from ..files import ENV_LIBRARY_IO, FileStamp, checksum, file_checksum, library_io_forced, write_json
from ..layout import SCALES_GROUP, ByTeacher, Layout
from ..manifest import Manifest, check_manifest
from ..reader import CacheReader, Problem
from ..writer import CopyWriter, Format

__all__ = ["FFCV", "FfcvCache", "FfcvWriter", "write_ffcv", "FORMAT_VERSION", "BETON", "RECORD"]

_logger = logging.getLogger(__name__)

RECORD = "ffcv.json"  # the record that makes a folder an FFCV cache
FORMAT_VERSION = 1
BETON = "data.beton"
MANIFEST = "manifest.json"
SOURCES = "sources.json"
LABELS = "labels.npy"


def field_names(layout: Layout) -> dict[str, str]:
    """Array name -> FFCV field name (FFCV allows 16 bytes; teacher names are longer): 'latents', teacher
    i's tokens 'f<i>', its scales 's<i>' (int8 teachers), in the order of the file."""
    index = {t: i for i, t in enumerate(layout.teachers)}
    return {"latents": "latents", **{f"features/{t}": f"f{i}" for t, i in index.items()},
            **{f"{SCALES_GROUP}/{t}": f"s{index[t]}" for t in layout.quantized_teachers}}


def variant_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """The shape of one (row, variant) of every array (:meth:`Layout.variant_shapes`)."""
    return {k: shape for k, (shape, _) in layout.variant_shapes().items()}


def array_dtypes(layout: Layout) -> dict[str, np.dtype]:
    """The dtype of every array as read: the layout's, little-endian."""
    return {k: np.dtype(dtype).newbyteorder("<") for k, (_, dtype) in layout.variant_shapes().items()}


def _field_dtype(dtype: np.dtype) -> np.dtype:
    """How an array's values are stored in an FFCV field: float16 as its int16 bit patterns (FFCV's loader
    hangs on float16 fields), int8 and float32 as they are."""
    return np.dtype("<i2") if dtype == np.float16 else dtype


def _field_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of an array's FFCV field: a 1-D array (scales (T,)) is stored as (T, 1), because FFCV's
    decoder of 1-D fields leaves numba dispatchers whose finalizer fails ("Exception ignored ... KeyError")
    when collected; read back in the array's own shape."""
    return (*shape, 1) if len(shape) == 1 else tuple(shape)


class _Samples:
    """FFCV's writer input: sample ``row * F + variant`` from raw staged arrays (``.npy`` files, opened
    lazily in each of FFCV's writer processes)."""

    def __init__(self, stage: Mapping[str, str], layout: Layout, labels: np.ndarray) -> None:
        self.stage, self.layout, self.labels = dict(stage), layout, labels
        self.arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.layout.num_rows * self.layout.variants

    def __getitem__(self, j: int) -> tuple:
        if self.arrays is None:
            self.arrays = {k: np.load(p, mmap_mode="r") for k, p in self.stage.items()}
        row, v = divmod(int(j), self.layout.variants)
        dtypes = array_dtypes(self.layout)
        out = [np.ascontiguousarray(self.arrays[k][row, v], dtype=dtypes[k]).view(_field_dtype(dtypes[k]))
               .reshape(_field_shape(self.arrays[k].shape[2:])) for k in field_names(self.layout)]
        return (*out, int(self.labels[row]))


def _page_size(layout: Layout) -> int:
    """The .beton's page: a power of two (at least 8 MiB) that holds at least two whole samples."""
    shapes, dtypes, names = variant_shapes(layout), array_dtypes(layout), field_names(layout)
    largest = max(int(np.prod(shapes[k])) * dtypes[k].itemsize for k in names) * (len(shapes) + 1)
    page = 1 << 23
    while page < 2 * largest:
        page <<= 1
    return page


def beton_bytes(layout: Layout) -> int:
    """At least the size of the .beton FFCV writes for ``layout``: the header, field descriptors and per-sample
    metadata padded to a page, then whole pages of samples (FFCV never splits a sample between pages)."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.types import FieldDescType, HeaderType, get_metadata_type

    shapes, dtypes, names = variant_shapes(layout), array_dtypes(layout), field_names(layout)
    page, samples = _page_size(layout), layout.num_rows * layout.variants
    fields = [NDArrayField(_field_dtype(dtypes[k]), _field_shape(shapes[k])) for k in names] + [IntField()]
    head = HeaderType.itemsize + FieldDescType.itemsize * len(fields) + get_metadata_type(fields).itemsize * samples
    sample = sum(int(np.prod(shapes[k])) * dtypes[k].itemsize for k in names)
    per_page = page // sample
    return -(-head // page) * page + -(-samples // per_page) * page


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _space_error(folder: str, path: str, what: str, err: int | None, detail: str) -> CacheError:
    """The error of a write that failed: ``remedy='space'`` when the disk is full (or the quota spent)."""
    full = err in (errno.ENOSPC, errno.EDQUOT)
    return CacheError(f"{what} {path} failed: {os.strerror(err) if full and err else detail}", url=folder,
                      remedy="space" if full else None)


def _writer_process(errors: Any, *args: Any) -> None:
    """One of FFCV's writer processes: FFCV's own job (``worker_job_indexed_dataset``); whatever ends it early
    is sent to the parent as (errno, text) and the process exits with 1, without a traceback."""
    from ffcv.writer import worker_job_indexed_dataset

    try:
        worker_job_indexed_dataset(*args)
    except BaseException as e:  # everything ends the process; the parent words it
        errors.put((getattr(e, "errno", None), f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None


def _write_samples(writer: Any, dataset: _Samples, *, chunksize: int) -> None:
    """FFCV's ``DatasetWriter.from_indexed_dataset`` (ffcv 1.0.2's ``_write_common``: the same header, worker
    job, page allocator and final table), watched: FFCV's parent waits for a sample count and then for
    every worker's allocation list, forever if a worker died (a full disk kills it with ENOSPC, and the
    others then spin waiting for its page). Here a worker that exits early stops the write: the others are
    terminated and :class:`_WriterDied` says what ended it."""
    import ctypes
    import multiprocessing as mp
    import queue

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from tqdm import tqdm

    n = len(dataset)
    writer.num_samples = n
    writer.prepare()  # header, field descriptors; the samples' metadata in shared memory
    work, allocations, errors = mp.Queue(), mp.Queue(), mp.Queue()
    for chunk in chunks(list(enumerate(range(n))), chunksize):
        work.put(chunk)
    for _ in range(writer.num_workers):
        work.put(None)
    done = mp.Value(ctypes.c_uint64, 0)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    args = (errors, work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations, dataset)
    procs = [mp.Process(target=_writer_process, args=args, daemon=True) for _ in range(writer.num_workers)]
    table: list = []
    bar = tqdm(total=n, unit="sample", desc="ffcv .beton", disable=None, file=sys.stderr)
    try:
        for p in procs:
            p.start()
        received = 0
        while received < len(procs):
            try:
                table.extend(allocations.get(timeout=0.2))
                received += 1
                continue
            except queue.Empty:
                bar.update(done.value - bar.n)
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                try:
                    err, text = errors.get(timeout=2)
                except queue.Empty:
                    err, text = None, (f"killed by signal {-dead[0]}" if dead[0] < 0 else f"exit code {dead[0]}")
                raise _WriterDied(err, text)
        writer.finalize(table)
    finally:
        bar.close()
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


class _WriterDied(Exception):
    def __init__(self, err: int | None, text: str) -> None:
        super().__init__(text)
        self.errno, self.text = err, text


def write_ffcv(folder: str, *, stage: Mapping[str, str], layout: Layout, manifest: Manifest,
               sources: list[dict[str, Any]], labels: np.ndarray, num_workers: int = 2) -> None:
    """Write an FFCV cache into ``folder`` (the caller's temporary name, which exists) from raw staged
    arrays: ``stage`` maps every array but the labels ('latents', 'features/<teacher>', 'feature_scales/<teacher>'
    for int8 teachers) to ``.npy`` files of shape (N, F, ...) in their stored dtype (:func:`array_dtypes`).
    The record ``ffcv.json`` is written last. A disk too small for the .beton (:func:`beton_bytes`) is
    refused before FFCV starts; a write that fails (a writer process dies: the disk filled up meanwhile)
    removes the half-written .beton and raises :class:`cache.errors.CacheError` (``remedy='space'`` for a
    full disk), never hangs."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    names = field_names(layout)
    shapes = variant_shapes(layout)
    dtypes = array_dtypes(layout)
    fields: dict[str, Any] = {names[k]: NDArrayField(_field_dtype(dtypes[k]), _field_shape(shapes[k])) for k in names}
    fields["label"] = IntField()
    beton = os.path.join(folder, BETON)
    need, free = beton_bytes(layout), _free_bytes(folder)
    if need > free:
        raise CacheError(f"writing {beton} needs at least {need:,} bytes, the disk has {free:,} free: "
                         f"{os.strerror(errno.ENOSPC)}", url=folder, remedy="space")
    writer = DatasetWriter(beton, fields, page_size=_page_size(layout), num_workers=max(1, num_workers))
    try:
        try:
            _write_samples(writer, _Samples(stage, layout, labels), chunksize=64)
        except _WriterDied as e:
            raise _space_error(folder, beton, "FFCV's writer process writing", e.errno, e.text) from None
        except OSError as e:
            raise _space_error(folder, beton, "writing", e.errno, str(e)) from None
    except CacheError:
        if os.path.exists(beton):
            os.remove(beton)  # its space back; the staged rows stay for the next run
        raise
    labels = np.ascontiguousarray(labels, dtype="<i4")
    try:
        np.save(os.path.join(folder, LABELS), labels)
        write_json(os.path.join(folder, MANIFEST), manifest.to_dict(), indent=None)
        write_json(os.path.join(folder, SOURCES), list(sources), indent=None)
        record = {"format": "urepa-ffcv", "version": FORMAT_VERSION, "file": BETON,
                  "size": os.path.getsize(beton), "checksum": file_checksum(beton), "variants": layout.variants,
                  "fields": names, "labels": checksum(labels)}
        write_json(os.path.join(folder, RECORD), record, indent=None)
    except OSError as e:
        raise _space_error(folder, folder, "writing the records of", e.errno, str(e)) from None


def _reserve(path: str) -> None:
    """Give a staged .npy file its disk blocks now: writes into a memory map of a sparse file on a full disk
    kill the process (SIGBUS); a reservation that does not fit fails here, with ENOSPC."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class FfcvWriter(CopyWriter):
    """An FFCV copy: the rows staged as raw .npy arrays block by block (resumable: one marker per finished
    block, in ``<tmp>/stage``; their disk space reserved up front), then FFCV's writer makes the .beton from
    them (:func:`write_ffcv`), then the stage is dropped. A full disk is a :class:`cache.errors.CacheError`
    with ``remedy='space'``: the staged rows are kept for the next run, a half-written .beton is not."""

    def __init__(self, tmp: str, *, layout: Layout, manifest: Manifest, sources: list[dict[str, Any]],
                 block_rows: int, workers: int = 2) -> None:
        self.tmp, self.layout, self.manifest, self.sources = tmp, layout, manifest, sources
        self.block_rows, self.workers = block_rows, workers
        self.stage = os.path.join(tmp, "stage")
        os.makedirs(self.stage, exist_ok=True)
        plan = {"rows": layout.num_rows, "block": block_rows, "layout": layout.to_dict(),
                "manifest": manifest.to_dict()}
        plan_path = os.path.join(self.stage, "plan.json")
        old = None
        if os.path.exists(plan_path):
            with open(plan_path) as f:
                old = json.load(f)
        if old != plan:  # another conversion's leftovers (in our own temporary folder): start again
            shutil.rmtree(tmp)
            os.makedirs(self.stage)
            write_json(plan_path, plan, indent=None)
        shapes = {**{k: (layout.variants, *s) for k, s in variant_shapes(layout).items()}, "labels": ()}
        dtypes = {**array_dtypes(layout), "labels": np.dtype("<i4")}
        self.files = {name: os.path.join(self.stage, name.replace("/", "__") + ".npy") for name in layout.array_names()}
        self.arrays = {}
        try:
            for name, path in self.files.items():
                self.arrays[name] = np.lib.format.open_memmap(path, mode="r+" if os.path.exists(path) else "w+",
                                                              dtype=dtypes[name], shape=(layout.num_rows, *shapes[name]))
                _reserve(path)
        except OSError as e:
            self.arrays = {}
            if not self.done_blocks():  # nothing worth keeping: leave no partial folder behind
                shutil.rmtree(tmp, ignore_errors=True)
            raise _space_error(tmp, path, "staging rows in", e.errno, str(e)) from None

    def _marker(self, lo: int) -> str:
        return os.path.join(self.stage, f"block-{lo:012d}.done")

    def done_blocks(self) -> set[int]:
        return {lo for lo in range(0, self.layout.num_rows, self.block_rows) if os.path.exists(self._marker(lo))}

    def write_block(self, lo: int, arrays: Mapping[str, np.ndarray]) -> None:
        for name, arr in self.arrays.items():
            arr[lo:lo + len(arrays[name])] = arrays[name]
            arr.flush()
        open(self._marker(lo), "w").close()  # after the block's data: a killed run writes this block again

    def finish(self) -> None:
        labels = np.array(self.arrays["labels"])
        self.close()
        beton = os.path.join(self.tmp, BETON)
        if os.path.exists(beton):
            os.remove(beton)
        write_ffcv(self.tmp, stage={k: p for k, p in self.files.items() if k != "labels"}, layout=self.layout,
                   manifest=self.manifest, sources=self.sources, labels=labels, num_workers=self.workers)
        shutil.rmtree(self.stage)

    def close(self) -> None:
        self.arrays = {}


def _expected_fields(layout: Layout) -> dict[str, tuple[str, tuple[int, ...]]]:
    """FFCV field name -> (stored dtype, shape) of every field the manifest's layout implies, label last."""
    shapes, dtypes = variant_shapes(layout), array_dtypes(layout)
    out = {field: (_field_dtype(dtypes[k]).str, _field_shape(shapes[k])) for k, field in field_names(layout).items()}
    out["label"] = ("int", ())
    return out


def _field_descriptors(descriptors: np.ndarray) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """The fields a .beton's header describes, as :func:`_expected_fields` spells them (None: unreadable)."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.types import TYPE_ID_HANDLER
    from ffcv.utils import decode_null_terminated_string

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        for desc in descriptors:
            name = decode_null_terminated_string(desc["name"])
            handler = TYPE_ID_HANDLER.get(int(desc["type_id"]))
            if handler is IntField:
                out[name] = ("int", ())
            elif handler is NDArrayField:
                field = NDArrayField.from_binary(desc["arguments"])
                out[name] = (np.dtype(field.dtype).str, tuple(int(d) for d in field.shape))
            else:
                out[name] = (f"type {int(desc['type_id'])}", ())
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError, IndexError):
        return None
    return out


class _BetonArray:
    """A read-only view of one array of an FFCV cache: ``shape``, ``dtype``, ``[rows]`` (an int, a slice or
    an index array along rows; each read runs one FFCV loader over the rows' samples)."""

    def __init__(self, cache: FfcvCache, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cache, self.name, self.shape, self.dtype = cache, name, shape, dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sel: Any) -> np.ndarray:
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
        self._lock = threading.Lock()
        self._fd: tuple[int, int] | None = None  # (pid, fd): opened lazily, never inherited across a fork

    @property
    def direct(self) -> bool:
        return self.pointers is not None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._fd[0] == os.getpid():
                os.close(self._fd[1])
            self._fd = None

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None or self._fd[0] != os.getpid():
                self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
            return self._fd[1]

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
        fd = self._descriptor()
        offsets = self.pointers[rows.astype(np.int64) * self.variants + variants.astype(np.int64)]
        view = memoryview(out.reshape(-1).view(np.uint8))
        size = self.variant_nbytes
        for i, offset in enumerate(offsets.tolist()):
            dst = view[i * size:(i + 1) * size]
            got = os.preadv(fd, [dst], offset)
            while got < size:  # short read
                n = os.preadv(fd, [dst[got:]], offset + got)
                if n == 0:
                    raise CacheError(f"{self.path} ends inside row {int(rows[i])} of '{self.name}': the file is "
                                     "truncated", url=self.cache.url, remedy="reconvert")
                got += n


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


def _claims(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, RECORD)):
        return True
    if any(n.endswith(".beton") for n in os.listdir(path)):
        raise CacheError(f"{path} holds .beton files but no {RECORD}: not a finished FFCV cache (a conversion that "
                         "did not finish, or files copied by hand)", url=path, remedy="reconvert")
    return False


FFCV = Format(name="ffcv", claims=_claims, open=FfcvCache, copy_writer=FfcvWriter, options=("workers",),
              description="an FFCV cache (a folder with ffcv.json and a .beton)")
