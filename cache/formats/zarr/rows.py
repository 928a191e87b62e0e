"""Single rows of one zarr array into the loader's batches: by byte range where
:func:`cache.formats.zarr.shardfile.choose_io` confirms the layout (uncompressed shards in a local
folder: ``os.preadv`` straight into the batch, each shard's index and its crc32c read once), else
through zarr's own reads. A direct read that fails for a reason other than damage switches the array to
zarr's path for good (logged once). A missing shard or a damaged index of a finished cache is a
:class:`cache.errors.ShardReadError`, never rows of zeros: on zarr's path, which serves fill values for
a missing object, the store is asked once per shard whether the object exists."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
from zarr.core.sync import sync

from ...errors import ShardReadError
from ...files import pread_rows
from .shardfile import EMPTY_CHUNK, ShardIndexError, choose_io, log_io_choice, read_index, shard_key

__all__ = ["ZarrRowReader"]

_EMPTY = np.uint64(EMPTY_CHUNK)


class ZarrRowReader:
    """Reads single rows (one variant each) of one zarr array into a preallocated batch: by byte range
    where :func:`cache.formats.zarr.shardfile.choose_io` allows it, else through zarr. A direct read that fails for
    any reason but damage switches this array to zarr's path for good (logged once). ``complete``: the
    cache is finished, so a missing shard object is damage (checked once per shard on zarr's path)."""

    def __init__(self, array: Any, root: str | None, url: str, *, complete: bool = True) -> None:
        self.array = array
        self.url = url
        self.complete = complete
        self.root = root
        self._present: set[int] = set()  # shards whose object zarr's path has seen in the store
        self.row_shape = tuple(array.shape[1:])  # (F, ...)
        self.variant_shape = self.row_shape[1:]
        self.dtype = np.dtype(array.dtype)
        self.variant_nbytes = int(np.prod(self.variant_shape)) * array.dtype.itemsize
        self.row_nbytes = self.variant_nbytes * self.row_shape[0]
        self.fmt, reason = choose_io(root, array)
        if self.fmt is not None and self.fmt.row_nbytes != self.row_nbytes:
            self.fmt, reason = None, f"rows of {self.fmt.row_nbytes} bytes in the metadata, {self.row_nbytes} in the array"
        log_io_choice("reads", url, array.path, self.fmt, reason)
        if self.fmt is not None:
            self.base = os.path.join(root, array.path)
        self._lock = threading.Lock()
        self._index: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}

    @property
    def direct(self) -> bool:
        return self.fmt is not None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def plan(self, rows: np.ndarray) -> None:
        """Single rows of a local folder read cheaply (and zarr's path reads whole chunks anyway): the loader's
        plan changes nothing."""

    def _shard(self, shard: int) -> tuple[int, np.ndarray]:
        with self._lock:
            if shard in self._fds:
                return self._fds[shard], self._index[shard]
            path = os.path.join(self.base, self.fmt.shard_key(shard))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise ShardReadError(
                    f"{path} is missing from the finished cache {self.url}: the cache is damaged; run "
                    f"`python -m cache.inspect {self.url} --verify`", url=self.url, where=path) from None
            try:
                index = read_index(self.fmt, fd, what=path)
            except ShardIndexError as e:
                os.close(fd)
                raise ShardReadError(f"{e}: the cache is damaged; run `python -m cache.inspect {self.url} --verify` "
                                     "and rebuild the shards it names") from None
            except BaseException:
                os.close(fd)
                raise
            self._fds[shard], self._index[shard] = fd, index
            return fd, index

    def read(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        """out[i] = array[rows[i], variants[i]]."""
        if self.fmt is not None:
            try:
                self._read_direct(rows, variants, out)
                return
            except ShardReadError:
                raise
            except Exception as e:  # not damage: a layout or platform this code does not know; zarr is correct
                self.fmt = None
                log_io_choice("reads", self.url, self.array.path, None,
                              f"a direct read failed ({type(e).__name__}: {e})", fell_back=True)
        if self.complete:
            self._check_present(rows)
        order = np.argsort(rows, kind="stable")
        try:
            block = self.array.get_orthogonal_selection((rows[order],))
        except Exception as e:  # zarr checks each shard index's crc32c, and raises on a damaged one
            raise ShardReadError(
                f"{self._failing_object(rows)}: reading it through zarr failed ({type(e).__name__}: {e}): the cache "
                f"is damaged; run `python -m cache.inspect {self.url} --verify` and rebuild the shards it names") from e
        out[order] = block[np.arange(len(rows)), variants[order]]

    @property
    def _shard_rows(self) -> int:
        return (self.array.shards or self.array.chunks)[0]

    def _object(self, shard: int) -> tuple[str, str]:
        """(store key, file or URL for messages) of one shard of this array."""
        key = f"{self.array.path}/{shard_key(self.array, shard)}"
        return key, os.path.join(self.root, *key.split("/")) if self.root else f"{self.url.rstrip('/')}/{key}"

    def _failing_object(self, rows: np.ndarray) -> str:
        """After a failed zarr read: the first shard whose own read fails (its index is read with any row)."""
        for shard in np.unique(rows // self._shard_rows).tolist():
            try:
                self.array[shard * self._shard_rows]
            except Exception:
                return f"{self._object(shard)[1]} (shard {shard} of {self.array.path})"
        return f"{self.url}: {self.array.path}"

    def _check_present(self, rows: np.ndarray) -> None:
        """zarr serves the fill value for a missing shard object; ask the store, once per shard."""
        for shard in np.unique(rows // self._shard_rows).tolist():
            if shard in self._present:
                continue
            key, where = self._object(shard)
            if not sync(self.array.store.exists(key)):
                raise ShardReadError(
                    f"{where} (shard {shard} of {self.array.path}) is missing from the finished cache {self.url}: the "
                    f"cache is damaged; run `python -m cache.inspect {self.url} --verify` and rebuild the shards it "
                    "names")
            with self._lock:
                self._present.add(shard)

    def _read_direct(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        fmt = self.fmt
        if not len(rows):
            return
        shards, within = np.divmod(rows, fmt.shard_rows)
        chunks, k = np.divmod(within, fmt.chunk_rows)
        uniq, which = np.unique(shards, return_inverse=True)
        opened = [self._shard(shard) for shard in uniq.tolist()]  # (fd, index) of each shard the rows touch
        fds = np.array([fd for fd, _ in opened], dtype=np.int64)[which]
        starts = np.stack([index[:, 0] for _, index in opened])[which, chunks]  # one index length: every shard's
        offsets = np.where(starts == _EMPTY, -1, starts.astype(np.int64) + k * self.row_nbytes
                           + variants * self.variant_nbytes)
        short = pread_rows(fds, offsets, out)
        if short is not None:
            raise ShardReadError(f"{self.base}: shard {int(shards[short])} ends early: the cache is damaged; run "
                                 f"`python -m cache.inspect {self.url} --verify`", url=self.url)
