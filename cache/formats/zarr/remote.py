"""Single rows of one zarr array in an object store, by byte range: the remote twin of
:class:`cache.formats.zarr.rows.ZarrRowReader`'s direct path.

Per shard object the reader asks the store once for its size and ETag, reads its index (the last
``index_nbytes`` bytes) and checks it (:func:`cache.formats.zarr.shardfile.decode_index`: crc32c, every
chunk inside the object), and keeps both. Rows are then fetched as byte ranges: the rows one read needs
from a shard are sorted and neighbouring ones merged into pieces (gaps up to ``max_gap`` bytes read and
dropped, pieces up to ``max_piece`` bytes), all pieces of all shards in flight at once (obstore's async
``get``, at most ``concurrency`` requests), each piece conditional on the ETag the index was read with.

Whole chunks for the block order. Told the rows it will be asked for (:meth:`RemoteRowReader.plan`, the
loader's ``order="blocks"``), the reader fetches each planned row's inner chunk whole, one range per chunk
(every variant of its rows), once, and keeps it in memory until each planned row of it was read; then drops
it. It fetches ahead: up to ``ahead`` planned chunks that no read has asked for yet are in flight or kept,
taken in the plan's order, so the chunks of the next batches (the next shuffle window) arrive while the
current ones are copied out. Rows outside the plan are fetched by range as above. The bytes a request brings
are used where they land (no copy); each read's copies into the batch run on the calling thread, not on
zarr's one event-loop thread, so several reader threads copy at once. The kept chunks are bounded (``max_kept`` bytes; past
it the least recently used one is dropped, and fetched again if still needed, counted in
:attr:`RemoteRowReader.refetches`), so a plan that does not fit (a full permutation) costs requests, not memory.

Never a wrong row: an object replaced since its index was read fails its condition
(:class:`cache.errors.CacheChangedError`), a piece shorter than asked is damage
(:class:`cache.errors.ShardReadError`), a missing object of a finished cache is damage naming it.
Transient failures (connection errors, timeouts, 5xx, throttling) are retried with exponential backoff and
counted (:attr:`RemoteRowReader.retries`); one that persists after ``attempts`` tries is a
:class:`cache.stores.StoreError` naming the object. Any other failure (a layout this code does not know)
switches the array to zarr's own path for good (logged once): the guarded fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import numpy as np
from zarr.core.sync import sync

from ... import stores
from ...errors import CacheChangedError, CacheError, ShardReadError
from .rows import ZarrRowReader
from .shardfile import EMPTY_CHUNK, ShardFormat, ShardIndexError, decode_index, log_io_choice

__all__ = ["RemoteRowReader", "coalesce"]

_EMPTY = np.uint64(EMPTY_CHUNK)


def coalesce(starts: np.ndarray, size: int, *, max_gap: int, max_piece: int) -> list[tuple[int, int, np.ndarray]]:
    """Pieces ``(lo, hi, members)`` covering byte ranges ``[starts[i], starts[i] + size)``: sorted, a range
    joins the current piece when the gap before it is at most ``max_gap`` bytes and the piece stays within
    ``max_piece`` bytes (a single range may pass it); ``members``: indices into ``starts``."""
    order = np.argsort(starts, kind="stable")
    pieces: list[tuple[int, int, list[int]]] = []
    for i in order.tolist():
        s = int(starts[i])
        if pieces and s - pieces[-1][1] <= max_gap and max(pieces[-1][1], s + size) - pieces[-1][0] <= max_piece:
            lo, hi, members = pieces[-1]
            pieces[-1] = (lo, max(hi, s + size), members + [i])
        else:
            pieces.append((s, s + size, [i]))
    return [(lo, hi, np.asarray(m, dtype=np.int64)) for lo, hi, m in pieces]


def _retrieved(f: asyncio.Future) -> None:
    """Mark a fetch's failure as seen: the read that needs the chunk raises it; a fetch ahead that no read
    needed any more (a loader closed early) must not log "exception never retrieved"."""
    if not f.cancelled():
        f.exception()


class _Shard:
    __slots__ = ("index", "etag", "size", "key")

    def __init__(self, index: np.ndarray, etag: str | None, size: int, key: str) -> None:
        self.index, self.etag, self.size, self.key = index, etag, size, key


class RemoteRowReader:
    """Reads single rows (one variant each) of one array of a zarr cache in an object store into a batch.
    ``array``: the zarr array (its path and metadata; zarr's path for the fallback); ``store``: the obstore
    store whose prefix is the cache; ``fmt``: the array's shard format (:func:`shardfile.direct_format`)."""

    def __init__(self, array: Any, store: Any, url: str, fmt: ShardFormat, *, complete: bool = True,
                 concurrency: int = 32, max_gap: int = 1 << 16, max_piece: int = 8 << 20, attempts: int = 5,
                 backoff: float = 0.2, max_kept: int = 8 << 30, ahead: int = 32) -> None:
        self.array, self.store, self.url, self.fmt, self.complete = array, store, url, fmt, complete
        self.row_shape = tuple(array.shape[1:])
        self.variant_shape = self.row_shape[1:]
        self.dtype = np.dtype(array.dtype)
        self.variant_nbytes = int(np.prod(self.variant_shape)) * self.dtype.itemsize
        self.row_nbytes = self.variant_nbytes * self.row_shape[0]
        self.concurrency, self.max_gap, self.max_piece = concurrency, max_gap, max_piece
        self.attempts, self.backoff = attempts, backoff
        self.retries = 0  # transient failures retried
        self.requests = 0  # GETs and HEADs sent (retries included)
        self.index_reads = 0  # shard indexes read (once per shard)
        self.bytes_fetched = 0  # bytes of rows and chunks received (indexes aside)
        self.chunk_reads = 0  # whole chunks fetched for the plan
        self.refetches = 0  # planned chunks fetched again after the memory bound dropped them
        self.max_kept = max_kept
        self.ahead = ahead  # planned chunks fetched before a read asks for them
        self.chunk_nbytes = fmt.chunk_rows * self.row_nbytes
        self._planned: dict[int, int] = {}  # global chunk (row // chunk_rows) -> planned rows not yet read
        self._sequence: list[int] = []  # the planned chunks in the order of their first planned row
        self._cursor = 0  # chunks of _sequence considered for fetching ahead so far
        self._untouched: set[int] = set()  # chunks fetched ahead that no read asked for yet
        self._chunk_limit = asyncio.Semaphore(concurrency)  # chunk GETs in flight (reads and fetches ahead)
        self._kept: dict[int, asyncio.Future] = {}  # global chunk -> its bytes (insertion order: least recent first)
        self._kept_bytes = 0
        self._fetched_once: set[int] = set()
        self._shards: dict[int, asyncio.Future] = {}  # shard -> its index read (kept)
        self._lock = threading.Lock()
        self._fallback: ZarrRowReader | None = None
        log_io_choice("reads", url, array.path, fmt, "")

    @property
    def direct(self) -> bool:
        return self._fallback is None

    def plan(self, rows: np.ndarray) -> None:
        """The rows :meth:`read` will be asked for, in order (the loader's block order): their chunks are then
        fetched whole and kept until each planned row of them was read. Replaces an earlier plan."""
        chunk_of = np.asarray(rows, dtype=np.int64) // self.fmt.chunk_rows
        chunks, first, counts = np.unique(chunk_of, return_index=True, return_counts=True)
        self._planned = dict(zip(chunks.tolist(), counts.tolist()))
        self._sequence = chunks[np.argsort(first, kind="stable")].tolist()
        self._cursor = 0
        self._untouched.clear()
        self._kept.clear()
        self._kept_bytes = 0

    def close(self) -> None:
        """Stops the fetches ahead still in flight (a loader closed before its epoch's end), on zarr's event loop
        where every fetch runs (so no fetch sees the plan half cleared)."""
        pending = [f for f in self._kept.values() if not f.done()]

        def stop() -> None:
            self._planned, self._sequence, self._cursor = {}, [], 0
            for f in pending:
                f.cancel()

        if pending:
            with contextlib.suppress(RuntimeError):  # the loop already closed (interpreter exit): nothing runs
                pending[0].get_loop().call_soon_threadsafe(stop)
        else:
            stop()
        if self._fallback is not None:
            self._fallback.close()

    # -- requests ---------------------------------------------------------------------------
    def _where(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def _failure(self, key: str, e: BaseException) -> CacheError | None:
        """The error a failed request for ``key`` means, or None for a transient failure (retry it)."""
        import obstore.exceptions as ox

        if isinstance(e, (ox.NotFoundError, FileNotFoundError)):
            return ShardReadError(f"{self._where(key)} is missing from the finished cache {self.url}: the cache is "
                                  f"damaged; run `python -m cache.inspect {self.url} --verify`", url=self.url,
                                  where=self._where(key))
        if isinstance(e, ox.PreconditionError):
            return CacheChangedError(f"{self._where(key)} changed while it was being read (its ETag is not the one "
                                     "its index was read with)", url=self.url)
        if isinstance(e, (ox.PermissionDeniedError, ox.UnauthenticatedError)):
            return stores.store_error(self.url, e) or stores.StoreError(
                f"{self._where(key)}: the store refused the request: {e}", url=self.url)
        if isinstance(e, (ox.GenericError, ConnectionError, TimeoutError, OSError)):
            return None
        raise e

    def _gave_up(self, key: str, e: BaseException) -> stores.StoreError:
        return stores.StoreError(f"{self._where(key)}: reading it failed {self.attempts} times "
                                 f"({stores._one_line(e)})", url=self.url, reason=stores._one_line(e))

    async def _call(self, key: str, make: Any) -> Any:
        """One request, retried with backoff while it fails transiently; typed errors for the rest."""
        for attempt in range(self.attempts):
            with self._lock:
                self.requests += 1
            try:
                return await make()
            except Exception as e:
                err = self._failure(key, e)
                if err is not None:
                    raise err from None
                if attempt + 1 == self.attempts:
                    raise self._gave_up(key, e) from None
                with self._lock:
                    self.retries += 1
                await asyncio.sleep(self.backoff * 2 ** attempt)

    async def _shard(self, shard: int) -> _Shard:
        """The shard's kept index; read once, however many reads ask for it at the same time (every
        coroutine runs on zarr's one event loop, so the check and the insertion below cannot interleave)."""
        got = self._shards.get(shard)
        if got is None:
            got = self._shards[shard] = asyncio.ensure_future(self._read_index(shard))
        elif got.done() and not got.cancelled() and got.exception() is None:
            return got.result()  # kept: no hop through the loop
        try:
            return await asyncio.shield(got)
        except BaseException:
            if self._shards.get(shard) is got and got.done():
                del self._shards[shard]  # a failed read is not kept: the next read asks again
            raise

    async def _read_index(self, shard: int) -> _Shard:
        import obstore

        key = f"{self.array.path}/{self.fmt.shard_key(shard)}"
        n = self.fmt.index_nbytes

        async def tail_of() -> tuple[dict[str, Any], bytes]:  # one request: the index, the size and the ETag
            result = await obstore.get_async(self.store, key, options={"range": {"suffix": n}})
            return result.meta, bytes(await result.bytes_async())

        meta, tail = await self._call(key, tail_of)
        size, etag = int(meta["size"]), meta.get("e_tag")
        try:
            index = decode_index(self.fmt, tail, file_size=size, what=self._where(key))
        except ShardIndexError as e:
            raise ShardReadError(f"{e}: the cache is damaged; run `python -m cache.inspect {self.url} --verify` and "
                                 "rebuild the shards it names", url=self.url, where=self._where(key)) from None
        with self._lock:
            self.index_reads += 1
        return _Shard(index, etag, size, key)

    async def _get(self, key: str, lo: int, hi: int, etag: str | None) -> Any:
        import obstore

        options: dict[str, Any] = {"range": (lo, hi)}
        if etag:
            options["if_match"] = etag

        async def fetch() -> Any:  # obstore's Bytes: a buffer over the received bytes, used without a copy
            result = await obstore.get_async(self.store, key, options=options)
            return await result.bytes_async()

        data = await self._call(key, fetch)
        if len(data) != hi - lo:
            raise ShardReadError(f"{self._where(key)}: bytes {lo}..{hi} came back as {len(data)} bytes: the object is "
                                 "shorter than its index says; the cache is damaged", url=self.url,
                                 where=self._where(key))
        return data

    def _want(self, chunk: int) -> asyncio.Future:
        """The fetch of one inner chunk (global number ``chunk``): the kept one, or a new one; now the most
        recently used. Runs on zarr's event loop."""
        self._untouched.discard(chunk)
        got = self._kept.pop(chunk, None)
        if got is None:
            got = asyncio.ensure_future(self._fetch_chunk(chunk))
            got.add_done_callback(_retrieved)
        self._kept[chunk] = got
        return got

    def _fetch_ahead(self) -> None:
        """Start fetching the next planned chunks no read asked for yet, in the plan's order: at most
        ``ahead`` of them fetched ahead at a time, never past ``max_kept`` bytes kept."""
        while (self._cursor < len(self._sequence) and len(self._untouched) < self.ahead
               and (len(self._kept) + 1) * self.chunk_nbytes <= self.max_kept):
            chunk = self._sequence[self._cursor]
            self._cursor += 1
            if chunk in self._planned and chunk not in self._kept:
                self._want(chunk)
                self._untouched.add(chunk)

    async def _chunk(self, chunk: int) -> np.ndarray:
        """The bytes of one inner chunk, fetched whole once and kept while planned rows of it remain; the least
        recently used kept chunks are dropped past ``max_kept`` bytes."""
        got = self._want(chunk)
        try:
            return await asyncio.shield(got)
        except BaseException:
            if self._kept.get(chunk) is got and got.done():
                del self._kept[chunk]  # a failed fetch is not kept
            raise

    async def _fetch_chunk(self, chunk: int) -> np.ndarray:
        info = await self._shard(chunk * self.fmt.chunk_rows // self.fmt.shard_rows)
        entry = info.index[chunk % self.fmt.chunks_per_shard]
        if entry[0] == _EMPTY:  # a chunk never stored: all fill value (0)
            self._kept_bytes += self.chunk_nbytes
            return np.zeros(self.chunk_nbytes, dtype=np.uint8)
        lo, n = int(entry[0]), int(entry[1])
        if n < self.chunk_nbytes:
            raise ShardReadError(f"{self._where(info.key)}: chunk {chunk % self.fmt.chunks_per_shard} holds {n} bytes, "
                                 f"its {self.fmt.chunk_rows} rows need {self.chunk_nbytes}: the "
                                 "cache is damaged", url=self.url, where=self._where(info.key))
        while self._kept_bytes + n > self.max_kept and len(self._kept) > 1:
            old = next(iter(self._kept))
            if not self._kept[old].done():
                break  # only fetches in flight are left to drop: keep them
            del self._kept[old]
            self._untouched.discard(old)
            self._kept_bytes -= n  # every chunk of an array has the same size
        async with self._chunk_limit:
            data = np.frombuffer(await self._get(info.key, lo, lo + n, info.etag), dtype=np.uint8)
        with self._lock:
            self.chunk_reads += 1
            self.bytes_fetched += n
            if chunk in self._fetched_once:
                self.refetches += 1
            self._fetched_once.add(chunk)
        self._kept_bytes += n
        return data

    def _used(self, chunk: int, rows: int) -> None:
        """``rows`` planned rows of ``chunk`` were read: drop the chunk when none remains."""
        left = self._planned.get(chunk, 0) - rows
        if left > 0:
            self._planned[chunk] = left
            return
        self._planned.pop(chunk, None)
        got = self._kept.pop(chunk, None)
        if got is not None:
            self._kept_bytes -= int(got.result().nbytes) if got.done() and not got.exception() else 0

    async def _read(self, rows: np.ndarray, variants: np.ndarray, flat: np.ndarray, copies: list) -> None:
        """Fetch what rows ``rows`` (variants ``variants``) need; ``copies`` gets ``(data, dst, src)``: flat[i] =
        data[s:s + variant_nbytes] for i, s in zip(dst, src), done by :meth:`read` on the calling thread."""
        fmt = self.fmt
        shards, within = np.divmod(rows, fmt.shard_rows)
        chunks, k = np.divmod(within, fmt.chunk_rows)
        pos = np.arange(len(rows))
        if self._planned:  # the block order: planned rows from whole chunks, the rest by range
            whole = np.fromiter((c in self._planned for c in (rows // fmt.chunk_rows).tolist()), dtype=bool,
                                count=len(rows))
            if whole.any():
                await self._read_chunks(rows, variants, flat, whole, copies)
                pos = np.flatnonzero(~whole)
                if not len(pos):
                    return
        limit = asyncio.Semaphore(self.concurrency)
        wanted = np.unique(shards[pos]).tolist()
        infos = await asyncio.gather(*(self._shard(s) for s in wanted))

        async def piece(info: _Shard, lo: int, hi: int, members: np.ndarray, starts: np.ndarray) -> None:
            async with limit:
                data = np.frombuffer(await self._get(info.key, lo, hi, info.etag), dtype=np.uint8)
            copies.append((data, members.tolist(), (starts - lo).tolist()))

        jobs = []
        for shard, info in zip(wanted, infos):
            sel = pos[shards[pos] == shard]
            empty = info.index[chunks[sel], 0] == _EMPTY
            flat[sel[empty]] = 0  # a chunk never stored: all fill value (0)
            sel = sel[~empty]
            if not len(sel):
                continue
            starts = (info.index[chunks[sel], 0].astype(np.int64) + k[sel] * self.row_nbytes
                      + variants[sel] * self.variant_nbytes)
            for lo, hi, members in coalesce(starts, self.variant_nbytes, max_gap=self.max_gap,
                                            max_piece=self.max_piece):
                jobs.append(piece(info, lo, hi, sel[members], starts[members]))
        await asyncio.gather(*jobs)

    async def _read_chunks(self, rows: np.ndarray, variants: np.ndarray, flat: np.ndarray, whole: np.ndarray,
                           copies: list) -> None:
        """The rows ``whole`` selects, out of their kept chunks (``copies`` as for :meth:`_read`)."""
        fmt = self.fmt
        sel = np.flatnonzero(whole)
        chunk_of = rows[sel] // fmt.chunk_rows
        unique = np.unique(chunk_of).tolist()
        for c in unique:  # this read's chunks first, then the ones ahead (in the order they are asked for)
            self._want(c)
        self._fetch_ahead()

        at = (rows[sel] % fmt.chunk_rows) * self.row_nbytes + variants[sel] * self.variant_nbytes
        order = np.argsort(chunk_of, kind="stable")  # this read's rows grouped by chunk, once
        bounds = np.searchsorted(chunk_of[order], unique + [unique[-1] + 1]).tolist()
        dst, src = sel[order].tolist(), at[order].tolist()

        def use(i: int, chunk: int, data: np.ndarray) -> None:
            lo, hi = bounds[i], bounds[i + 1]
            copies.append((data, dst[lo:hi], src[lo:hi]))
            self._used(chunk, hi - lo)

        async def one(i: int, chunk: int) -> None:
            use(i, chunk, await self._chunk(chunk))
            self._fetch_ahead()

        waiting = []
        for i, c in enumerate(unique):
            got = self._kept[c]
            if got.done() and not got.cancelled() and got.exception() is None:  # landed already: no coroutine
                use(i, c, got.result())
            else:
                waiting.append(one(i, c))
        self._fetch_ahead()
        if waiting:
            await asyncio.gather(*waiting)

    def read(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        """out[i] = array[rows[i], variants[i]]."""
        if self._fallback is None:
            try:
                flat = out.reshape(len(out), -1).view(np.uint8)
                copies: list[tuple[np.ndarray, list[int], list[int]]] = []
                sync(self._read(np.asarray(rows, dtype=np.int64), np.asarray(variants, dtype=np.int64), flat, copies))
                n = self.variant_nbytes
                for data, dst, src in copies:  # here, not on the event loop: the reader threads copy in parallel
                    for i, s in zip(dst, src):
                        flat[i] = data[s:s + n]
                return
            except CacheError:  # damage, a changed object, the store: never papered over
                raise
            except Exception as e:  # not damage: a layout or client this code does not know; zarr is correct
                log_io_choice("reads", self.url, self.array.path, None,
                              f"a ranged read failed ({type(e).__name__}: {e})", fell_back=True)
                self._fallback = ZarrRowReader(self.array, None, self.url, complete=self.complete)
        self._fallback.read(rows, variants, out)

