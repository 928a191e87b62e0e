"""Writing an FFCV cache: the rows staged as raw .npy arrays, then FFCV's writer processes, watched, make the
.beton (:func:`write_ffcv`, :class:`FfcvWriter`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import CacheError
from ...files import checksum, file_checksum, write_json
from ...layout import Layout
from ...manifest import Manifest
from ...writer import CopyWriter
from .fields import (
    BETON,
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    RECORD,
    SOURCES,
    _field_dtype,
    _field_shape,
    _page_size,
    array_dtypes,
    beton_bytes,
    field_names,
    variant_shapes,
)

__all__ = ["FfcvWriter", "write_ffcv"]


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
    kill the process (SIGBUS); a reservation that does not fit fails here, with ENOSPC. A file system that
    cannot reserve (EOPNOTSUPP, EINVAL) keeps the sparse file, as without this."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


class FfcvWriter(CopyWriter):
    """An FFCV copy: the rows staged as raw .npy arrays block by block (resumable: one marker per finished
    block, in ``<tmp>/stage``; their disk space reserved up front), then FFCV's writer makes the .beton from
    them (:func:`write_ffcv`), then the stage is dropped. A full disk is a :class:`cache.errors.CacheError`
    with ``remedy='space'``: the staged rows are kept for the next run, a half-written .beton is not."""

    space_factor = 2.0  # the staged rows and the .beton side by side until the stage is dropped

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
