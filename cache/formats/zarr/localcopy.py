"""Single rows of one zarr array in an object store, from node-local copies of its shard objects
(:class:`cache.nodecache.NodeCache`): for multi-epoch training from a remote store.

Each shard object is downloaded whole, once per node (every process of the node shares the folder), into a
file named by the object's key and the checksum its progress record holds (a copy found there is used
without asking the store anything; a rebuilt shard has another name); the bytes are checked
against that checksum as they arrive (a mismatch is :class:`cache.errors.ShardReadError` naming the object,
and nothing is kept), the download is conditional on the ETag the shard's index was read with. Rows are then
read from the local copy with ``os.preadv``, as from a local cache.

Guarded: a shard that cannot be copied (larger than the folder's bound, no checksum recorded, the bound
taken by other downloads) is read by range from the store (:class:`cache.formats.zarr.remote.RemoteRowReader`,
which this reader wraps); a local disk that fails (full, read-only, gone) switches the array to ranged reads
for good, logged once. Store errors (a missing object, refused credentials, a changed object) are raised as
the remote reader raises them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np
from zarr.core.sync import sync

from ...errors import CacheError, ShardReadError
from ...nodecache import NodeCache
from .remote import RemoteRowReader
from .shardfile import EMPTY_CHUNK, ShardIndexError, read_index

__all__ = ["LocalCopyRowReader", "LocalDiskError", "namespace_of"]

_logger = logging.getLogger(__name__)
_EMPTY = np.uint64(EMPTY_CHUNK)
_BLOCK = 8 << 20  # bytes per piece of a download


class LocalDiskError(Exception):
    """Writing a local copy failed (the node's disk, not the store): the array is read by range instead."""


def namespace_of(url: str) -> str:
    """The folder of one cache's copies inside a node cache: a hash of its URL (no credentials in it)."""
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:20]


def _write(fd: int, data: np.ndarray, at: int) -> None:
    try:
        n = 0
        while n < len(data):
            n += os.pwrite(fd, memoryview(data[n:]), at + n)
    except OSError as e:
        raise LocalDiskError(f"writing the local copy failed: {e.strerror or e}") from e


class LocalCopyRowReader:
    """Reads single rows of one array from node-local copies of its shard objects. ``remote``: the array's
    ranged reader (its shard indexes, its requests, and the path for shards that are not copied);
    ``node``: the node's folder; ``checksum_of(shard)``: the checksum the shard's progress record holds for
    this array (None: not recorded, the shard is read by range)."""

    def __init__(self, remote: RemoteRowReader, node: NodeCache, checksum_of: Callable[[int], str | None]) -> None:
        self.remote, self.node, self.checksum_of = remote, node, checksum_of
        self.url = remote.url
        self.fmt = remote.fmt
        self.variant_shape, self.dtype = remote.variant_shape, remote.dtype
        self.variant_nbytes, self.row_nbytes = remote.variant_nbytes, remote.row_nbytes
        self.namespace = namespace_of(self.url)
        self.broken: str | None = None  # why the local disk is no longer used (None: it is)
        self._lock = threading.Lock()
        self._shards: dict[int, tuple[int, np.ndarray] | None] = {}  # shard -> (fd, index), None: read by range
        self._paths: dict[int, str] = {}  # shard -> its copy (each read records a use: the LRU order)

    @property
    def direct(self) -> bool:
        return self.remote.direct

    @property
    def local(self) -> bool:
        """Whether rows come from local copies (False once the local disk failed)."""
        return self.broken is None

    def plan(self, rows: np.ndarray) -> None:
        """Local copies read single rows cheaply: the plan changes nothing. It is not handed to the ranged reader
        either: the rows read here would never count down its kept chunks (shards it reads, rarely, are read
        row by row)."""

    def close(self) -> None:
        with self._lock:
            for entry in self._shards.values():
                if entry is not None:
                    os.close(entry[0])
            self._shards.clear()
        self.remote.close()

    # -- copies ------------------------------------------------------------------------------
    def _download(self, key: str, etag: str | None, size: int, want: str) -> Callable[[str], None]:
        """What writes the object ``key`` into a partial file and checks it against the checksum ``want``."""
        import google_crc32c
        import obstore

        remote = self.remote

        def fetch(partial: str) -> None:
            for attempt in range(remote.attempts):
                with remote._lock:
                    remote.requests += 1
                crc, at = 0, 0
                fd = os.open(partial, os.O_WRONLY)
                try:
                    try:
                        result = obstore.get(remote.store, key, options={"if_match": etag} if etag else None)
                        for piece in result.stream(min_chunk_size=_BLOCK):
                            piece = np.frombuffer(piece, dtype=np.uint8)
                            crc = google_crc32c.extend(crc, piece)
                            _write(fd, piece, at)
                            at += len(piece)
                    except LocalDiskError:
                        raise
                    except Exception as e:
                        err = remote._failure(key, e)
                        if err is not None:
                            raise err from None
                        if attempt + 1 == remote.attempts:
                            raise remote._gave_up(key, e) from None
                        with remote._lock:
                            remote.retries += 1
                        time.sleep(remote.backoff * 2 ** attempt)
                        continue
                finally:
                    os.close(fd)
                got = f"crc32c:{int(crc):08x}"
                if at != size or got != want:
                    raise ShardReadError(f"{remote._where(key)}: its {at} bytes fail the checksum recorded when it was "
                                         f"written ({got}, recorded {want}): the cache is damaged; run `python -m "
                                         f"cache.inspect {self.url} --verify`", url=self.url, where=remote._where(key))
                with remote._lock:
                    remote.bytes_fetched += at
                return

        return fetch

    def _open(self, shard: int) -> tuple[int, np.ndarray] | None:
        """The local copy of ``shard`` (made if missing) as (fd, index); None: read this shard by range."""
        with self._lock:
            if shard in self._shards:
                return self._shards[shard]
        want = self.checksum_of(shard)
        path = where = None
        if want is not None:
            key = f"{self.remote.array.path}/{self.fmt.shard_key(shard)}"
            where = self.remote._where(key)
            name = f"{self.namespace}/{key}.{want.replace(':', '-')}"
            path = self.node.find(name)  # a copy made earlier: no request to the store at all
            if path is None:
                info = sync(self.remote._shard(shard))  # its size and ETag (and its index, checked)
                path = self.node.local_path(name, info.size, self._download(info.key, info.etag, info.size, want))
        entry = None
        if path is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                index = read_index(self.fmt, fd, what=path)
            except ShardIndexError as e:
                os.close(fd)
                raise ShardReadError(f"{e}: the copy of {where} matches its recorded checksum but not its index: the "
                                     "cache is damaged", url=self.url, where=where) from None
            entry = (fd, index)
        with self._lock:
            if path is not None:
                self._paths[shard] = path
            if shard in self._shards:  # another thread opened it meanwhile
                if entry is not None:
                    os.close(entry[0])
                return self._shards[shard]
            self._shards[shard] = entry
            return entry

    def _use(self, shard: int) -> None:
        """Record a use of the shard's copy (its modification time: the folder evicts the least recently used)."""
        try:
            os.utime(self._paths[shard])
        except (FileNotFoundError, KeyError):  # evicted by another process: this descriptor still reads it
            pass

    # -- reads -------------------------------------------------------------------------------
    def read(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        """out[i] = array[rows[i], variants[i]]."""
        rows, variants = np.asarray(rows, dtype=np.int64), np.asarray(variants, dtype=np.int64)
        if self.broken is None:
            try:
                self._read_local(rows, variants, out)
                return
            except CacheError:  # damage, a changed object, the store: never papered over
                raise
            except Exception as e:  # the local disk (full, read-only, gone), or anything not damage: ranged reads
                with self._lock:
                    first, self.broken = self.broken is None, self.broken or f"{type(e).__name__}: {e}"
                if first:
                    _logger.warning("%s: %s: the node-local copy in %s failed (%s); reading by range from now on",
                                    self.url, self.remote.array.path, self.node.folder, self.broken)
        self.remote.read(rows, variants, out)

    def _read_local(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        fmt = self.fmt
        shards, within = np.divmod(rows, fmt.shard_rows)
        chunks, k = np.divmod(within, fmt.chunk_rows)
        ranged = np.zeros(len(rows), dtype=bool)
        view = memoryview(out.reshape(-1).view(np.uint8))
        size = self.variant_nbytes
        for shard in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == shard)
            entry = self._open(shard)
            if entry is None:
                ranged[sel] = True
                continue
            fd, index = entry
            self._use(shard)
            starts = index[chunks[sel], 0]
            for i, start, kk, v in zip(sel.tolist(), starts.tolist(), k[sel].tolist(), variants[sel].tolist()):
                if start == _EMPTY:
                    out[i] = 0  # a chunk never stored: all fill value (0)
                    continue
                offset = int(start) + kk * self.row_nbytes + v * self.variant_nbytes
                dst = view[i * size:(i + 1) * size]
                got = os.preadv(fd, [dst], offset)
                while got < size:
                    n = os.preadv(fd, [dst[got:]], offset + got)
                    if n == 0:
                        raise ShardReadError(f"the local copy of shard {shard} of {self.remote.array.path} in "
                                             f"{self.node.folder} ends early", url=self.url)
                    got += n
        if ranged.any():
            at = np.flatnonzero(ranged)
            sub = np.empty((len(at), *out.shape[1:]), dtype=out.dtype)
            self.remote.read(rows[at], variants[at], sub)
            out[at] = sub
