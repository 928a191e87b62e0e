"""Deterministic, resumable, distributed batches of matched latents, teacher tokens and labels.

Order. An epoch is one permutation of the cache's data rows, a pure function of ``(seed, epoch)``
(:func:`epoch_order`); the flip variant of each position is another (:func:`epoch_flips`). Global
batch k is positions ``[start + k*B*W, start + (k+1)*B*W)`` of that order, and rank r takes the
r-th slice of B positions (:func:`rank_batches`). So the samples of a global batch do not depend
on the number of ranks, ranks are disjoint and together cover the epoch, and ``start`` (samples
already consumed by all ranks in this epoch) resumes exactly where a run stopped.

For object stores, ``order="blocks"`` (:func:`block_order`) visits shuffled blocks of rows that the format
reads well together (:attr:`cache.reader.CacheReader.read_unit_rows`: a zarr inner chunk), each rank its
own blocks, mixed within a shuffle window of ``shuffle_window`` rows: still a pure function of
``(seed, epoch)`` (and of the block, window, batch size and number of ranks), ranks disjoint and covering,
``start`` exact. The loader tells each row reader the rows it will ask for (``RowReader.plan``), so a
remote reader fetches each block whole, once, and keeps it until its rows are used. docs/remote.md
measures what this costs in randomness beside the full permutation.

Reading. Rows come in a fully random order, so the loader reads each row by itself, through the
row readers of the cache's format (:meth:`cache.reader.CacheReader.row_reader`: by byte range where the
format allows it, else through its library), ``num_workers`` threads in parallel into preallocated
batches. A format whose own loader assembles whole batches (FFCV) offers
:meth:`cache.reader.CacheReader.batch_source` instead and is fed this rank's positions of the same
order. This module names no format: order, ranks, resume, flips and the batch dict are shared by all.
A damaged or missing object of a finished cache is an error (:class:`cache.errors.ShardReadError`),
never rows of zeros. Batches are prefetched ``prefetch`` deep and come back as CPU tensors, pinned
when CUDA is available.

Rebuilds. Each batch, once read, is checked against the cache (:meth:`cache.reader.CacheReader.check_unchanged`):
a cache rebuilt or removed while the loader reads it stops the loader with
:class:`cache.errors.CacheChangedError`, never mixed rows.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .errors import CacheError, ShardReadError
from .layout import SCALES_GROUP, ByTeacher, Layout
from .quant import dequantize_into, scales_valid

__all__ = ["ORDERS", "epoch_order", "block_order", "epoch_flips", "rank_batches", "CacheLoader", "release_buffers"]

#: The loader's orders: "permutation" (every row anywhere: the default) or "blocks" (shuffled blocks of rows
#: that read well together plus a shuffle window: for object stores), see :func:`block_order`.
ORDERS = ("permutation", "blocks")
#: Rows of the shuffle window of the "blocks" order unless told (docs/remote.md measures the trade-off).
DEFAULT_WINDOW = 4096


class Source(Protocol):
    """What the loader reads: an opened cache of any format (:class:`cache.reader.CacheReader` is one; the
    contract offers ``loader()``, so the loader states what it uses instead of importing the contract)."""

    rows: np.ndarray
    labels: np.ndarray
    layout: Layout

    @property
    def read_unit_rows(self) -> int: ...

    @property
    def num_variants(self) -> int: ...

    def teacher_names(self, wanted: Sequence[str] | None = None) -> list[str]: ...

    def channel_scales(self, name: str) -> np.ndarray | None: ...

    def row_reader(self, name: str) -> Any: ...

    def batch_source(self, keys: Sequence[str], *, num_workers: int, prefetch: int) -> Any: ...

    def check_unchanged(self) -> None: ...


def epoch_order(rows: np.ndarray, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The rows of one epoch in visiting order: a permutation drawn from (seed, epoch) alone."""
    rows = np.asarray(rows, dtype=np.int64)
    if not shuffle:
        return rows.copy()
    return np.random.default_rng([seed, epoch, 0]).permutation(rows)


def epoch_flips(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """Which variant (0 as is, 1 mirrored) each position of the epoch uses, from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch, 1]).integers(0, 2, size=n, dtype=np.int64)


def block_order(rows: np.ndarray, *, block_rows: int, window: int, seed: int, epoch: int, batch_size: int,
                world_size: int = 1) -> np.ndarray:
    """The rows of one epoch in a remote-friendly order, laid out for :func:`rank_batches`: a pure function
    of ``(seed, epoch)`` and of the block, window, batch size and number of ranks.

    1. Rows are grouped in aligned blocks (``row // block_rows``: the rows the format reads well together,
       :attr:`cache.reader.CacheReader.read_unit_rows`), and the blocks shuffled (drawn from ``[seed,
       epoch, 2]``).
    2. The shuffled rows are cut into ``world_size`` consecutive parts, one per rank, sized so that rank r's
       part is exactly the positions :func:`rank_batches` gives rank r (from ``start=0``; with ``drop_last``
       the parts' last ``< world_size * batch_size`` rows are those it drops). So a rank reads whole blocks
       of its own (at most two blocks, at its part's ends, are shared with a neighbour rank).
    3. Each part is shuffled within consecutive windows of ``window`` rows (drawn from ``[seed, epoch, 3]``):
       the in-memory shuffle window, whose blocks a reader keeps until their rows are used.

    Rank r's k-th batch is then positions ``[k*G + r*B, k*G + (r+1)*B)`` of the result (G = B x world_size),
    as for :func:`epoch_order`, so ranks are disjoint, cover the epoch together, and ``start`` (a multiple
    of G: whole global batches, as the trainer resumes) resumes exactly. Unlike the full permutation, the
    samples of a global batch depend on the number of ranks (each rank reads its own blocks).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if block_rows < 1 or window < 1 or batch_size < 1 or world_size < 1:
        raise ValueError(f"bad block_rows/window/batch_size/world_size: {block_rows}/{window}/{batch_size}/{world_size}")
    n = len(rows)
    blocks, first = np.unique(rows // block_rows, return_inverse=True)
    rank_of_block = np.empty(len(blocks), dtype=np.int64)
    rank_of_block[np.random.default_rng([seed, epoch, 2]).permutation(len(blocks))] = np.arange(len(blocks))
    shuffled = rows[np.lexsort((rows, rank_of_block[first]))]  # blocks in shuffled order, rows ascending inside
    g = batch_size * world_size
    full = n // g
    tail = np.linspace(0, n - full * g, world_size + 1).round().astype(np.int64)  # rank_batches' split of the rest
    sizes = full * batch_size + np.diff(tail)
    part = np.repeat(np.arange(world_size), sizes)  # the rank of each position of `shuffled`
    at = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # position inside its part
    keys = np.random.default_rng([seed, epoch, 3]).random(n)
    shuffled = shuffled[np.lexsort((keys, at // window, part))]  # each part shuffled within its windows
    # lay the parts out as rank_batches reads them: global batch k holds the k-th batch of every part in rank order
    k, i = np.divmod(at, batch_size)
    dest = np.where(k < full, k * g + part * batch_size + i, full * g + tail[part] + at - full * batch_size)
    out = np.empty(n, dtype=np.int64)
    out[dest] = shuffled
    return out


def rank_batches(
    num_samples: int, *, batch_size: int, world_size: int = 1, rank: int = 0, start: int = 0, drop_last: bool = True
) -> list[tuple[int, int]]:
    """Position ranges ``(lo, hi)`` of the epoch order that ``rank`` reads, one per batch.

    Global batch k covers ``[start + k*G, start + (k+1)*G)`` with ``G = batch_size * world_size``;
    rank r reads its r-th slice of ``batch_size``. Without ``drop_last`` the last, partial global
    batch is split into ``world_size`` nearly equal slices (a rank whose slice is empty gets no
    batch).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size/world_size/rank: {batch_size}/{world_size}/{rank}")
    if not 0 <= start <= num_samples:
        raise ValueError(f"start={start} is outside the epoch of {num_samples} samples")
    g = batch_size * world_size
    full = (num_samples - start) // g
    out = []
    for k in range(full):
        lo = start + k * g + rank * batch_size
        out.append((lo, lo + batch_size))
    rest = num_samples - start - full * g
    if rest and not drop_last:
        bounds = np.linspace(0, rest, world_size + 1).round().astype(int)
        lo, hi = start + full * g + bounds[rank], start + full * g + bounds[rank + 1]
        if hi > lo:
            out.append((int(lo), int(hi)))
    return out


def _read_dequantized(values: Any, scales: Any, channels: np.ndarray | None, rows: np.ndarray, variants: np.ndarray,
                      q: np.ndarray, sc: np.ndarray, out: np.ndarray, name: str) -> None:
    """out (n, T, D) float16 = int8 values x scales x channel scales of the given rows (one reader thread's part)."""
    values.read(rows, variants, q)
    scales.read(rows, variants, sc)
    _check_scales(sc, rows, name)
    dequantize_into(q, sc, out, channels)


def _check_scales(scales: np.ndarray, rows: np.ndarray, name: str) -> None:
    if not scales_valid(scales):
        bad = ~(np.isfinite(scales) & (scales >= 0)).reshape(len(scales), -1).all(axis=1)
        raise ShardReadError(f"{SCALES_GROUP}/{name}: non-finite or negative per-token scales in row "
                             f"{int(rows[np.flatnonzero(bad)[0]])}: the cache is damaged; run `python -m cache.inspect "
                             "CACHE --verify`")


class _BufferPool:
    """Recycles batch buffers once nothing refers to them any more, across loaders: one pool per process.

    A fresh 100 MB batch buffer is zeroed by the kernel page by page when first written (``clear_page``:
    measured at 1.4x the time of reading the rows into it, docs/benchmarks.md), and a loader is made per
    epoch, so the buffers outlive it: after the first epoch no batch touches a fresh page. A buffer
    handed out through ``torch.from_numpy`` is referenced by every tensor (and view) made from it, so a
    reference count at the pool's own baseline means that no batch uses it and it can be refilled. At
    most ``keep`` buffers of each shape are kept (the most any loader asked for); :meth:`clear` lets
    them go. A fork empties the pool in parent and child: a kept buffer the child shares would be copied
    page by page (copy-on-write) at the parent's next write into it, slower than a fresh buffer (measured).
    """

    _BASELINE = sys.getrefcount(np.empty(0)) + 1  # the pool's list entry, and the loop variable

    def __init__(self) -> None:
        self.buffers: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self._lock = threading.Lock()  # loaders of several threads share it: a free buffer goes to one of them

    def get(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float16, *, keep: int = 8) -> np.ndarray:
        with self._lock:
            owned = self.buffers.setdefault((np.dtype(dtype).str, *shape), [])
            for buf in owned:
                if sys.getrefcount(buf) <= self._BASELINE + 1:  # + getrefcount's own argument
                    return buf
            buf = np.empty(shape, dtype=dtype)
            if len(owned) < keep:
                owned.append(buf)
            return buf

    def clear(self) -> None:
        """Forget every kept buffer (batches still in use keep theirs)."""
        with self._lock:
            self.buffers = {}

    def _forked(self) -> None:
        """In a forked child: a new lock (another thread may have held the parent's at the fork), no buffers."""
        self._lock = threading.Lock()
        self.buffers = {}


_POOL = _BufferPool()
os.register_at_fork(after_in_parent=_POOL.clear, after_in_child=_POOL._forked)


def release_buffers() -> None:
    """Let go of the batch buffers the loaders of this process keep for the next epoch (a few batches' worth
    per batch shape)."""
    _POOL.clear()


class CacheLoader:
    """Batches ``{"latents", "features", "labels", "index", "flip"}`` from a cache of any format.

    Args:
        cache: an opened cache.
        batch_size: samples per batch on this rank (the global batch is ``batch_size * world_size``).
        shuffle: visit rows in the random order of (seed, epoch); otherwise in row order.
        seed, epoch: the order is a pure function of these two.
        rank, world_size: this process' share; ranks are disjoint and cover the epoch together.
        start: samples of this epoch already consumed by all ranks together; resumes exactly.
        flip: draw variant 0 or 1 per position (needs a cache built with ``--flip both``).
        drop_last: drop the last partial global batch.
        num_workers: reader threads.
        prefetch: batches read ahead.
        teachers: subset of teacher names to read (default all).
        pin_memory: pin the batch tensors (default: when CUDA is available).
        order: "permutation" (the default: every row anywhere in the epoch) or "blocks" (:func:`block_order`:
            whole blocks of rows per rank, for object stores); ignored without ``shuffle``.
        shuffle_window: rows of the "blocks" order's shuffle window (a remote reader keeps about this many
            rows in memory).

        dequantize: hand out int8 teachers' tokens as float16 (``values x scales``, computed by the reader
            threads) instead of their stored form.

    Each batch: ``latents`` float16 (B, 8, h, w) posterior mean and std; ``features`` dict name ->
    (B, T, D) tokens as stored: float16, or int8 for teachers stored as int8, whose float32 scales
    (B, T) are in ``feature_scales`` (dict name -> scales, int8 teachers only; tokens =
    ``cache.quant.dequantize_tokens(values, scales, loader.channel_scales[name])``). With ``dequantize=True`` every teacher's tokens
    are float16 and ``feature_scales`` is empty. ``labels`` int64 (B,); ``index`` int64 (B,) row ids;
    ``flip`` bool (B,).
    """

    def __init__(
        self,
        cache: Source,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        flip: bool = False,
        drop_last: bool = True,
        num_workers: int = 4,
        prefetch: int = 2,
        teachers: Sequence[str] | None = None,
        pin_memory: bool | None = None,
        dequantize: bool = False,
        order: Literal["permutation", "blocks"] = "permutation",
        shuffle_window: int = DEFAULT_WINDOW,
    ) -> None:
        if flip and cache.num_variants < 2:
            raise ValueError("flip=True needs a cache built with --flip both (this one stores 1 variant)")
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: use one of {', '.join(map(repr, ORDERS))}")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window={shuffle_window}: must be at least 1 row")
        names = cache.teacher_names(teachers)
        self.cache = cache
        self.batch_size = batch_size
        self.flip = flip
        self.num_workers = max(1, num_workers)
        self.prefetch = max(1, prefetch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.blocks = order == "blocks" and shuffle
        if self.blocks:
            self.order = block_order(cache.rows, block_rows=cache.read_unit_rows, window=shuffle_window, seed=seed,
                                     epoch=epoch, batch_size=batch_size, world_size=world_size)
        else:
            self.order = epoch_order(cache.rows, seed=seed, epoch=epoch, shuffle=shuffle)
        self.variants = (epoch_flips(len(self.order), seed=seed, epoch=epoch) if flip
                         else np.zeros(len(self.order), dtype=np.int64))
        self.batches = rank_batches(len(self.order), batch_size=batch_size, world_size=world_size, rank=rank,
                                    start=start, drop_last=drop_last)
        self.teachers = names
        self.dequantize = dequantize
        self.quantized = [n for n in names if cache.layout.quantized(n)]  # int8 teachers read
        #: int8 teacher -> its (D,) float32 channel scales, or None (ones): tokens = values x scales x these
        self.channel_scales = {n: cache.channel_scales(n) for n in self.quantized}
        keys = ["latents", *(f"features/{n}" for n in names), *(f"{SCALES_GROUP}/{n}" for n in self.quantized)]
        # A format whose own loader assembles whole batches (FFCV) offers a batch source; the others read
        # rows into our batches through one row reader per array.
        self._source = cache.batch_source(keys, num_workers=self.num_workers, prefetch=self.prefetch)
        self._readers = {} if self._source is not None else {key: cache.row_reader(key) for key in keys}
        if self.blocks and self.batches:  # the rows this rank will ask for, in order: whole blocks are kept for them
            planned = np.concatenate([self.order[lo:hi] for lo, hi in self.batches])
            for reader in self._readers.values():
                reader.plan(planned)
        self._keep = self.prefetch + 4  # buffers per shape in flight: prefetched, handed out, being refilled

    def __len__(self) -> int:
        return len(self.batches)

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(variant shape, dtype) of each key the batches hold."""
        if self._source is not None:
            dtypes = self._source.variant_dtypes
            shapes = {k: (v, np.dtype(dtypes[k])) for k, v in self._source.variant_shapes.items()}
        else:
            shapes = {key: (reader.variant_shape, reader.dtype) for key, reader in self._readers.items()}
        if self.dequantize:  # int8 values and scales are read into scratch buffers, tokens handed out in float16
            for n in self.quantized:
                shapes[f"features/{n}"] = (shapes[f"features/{n}"][0], np.dtype(np.float16))
                del shapes[f"{SCALES_GROUP}/{n}"]
        return shapes

    def _alloc(self, shape: tuple[int, ...], dtype: np.dtype, *, pin: bool) -> torch.Tensor:
        if pin:  # torch's caching host allocator recycles pinned blocks safely
            return torch.empty(shape, dtype=getattr(torch, dtype.name), pin_memory=True)  # float16, int8, float32
        return torch.from_numpy(_POOL.get(shape, dtype, keep=self._keep))

    def _empty(self, n: int) -> dict[str, torch.Tensor]:
        return {key: self._alloc((n, *shape), dtype, pin=self.pin_memory) for key, (shape, dtype) in self._shapes().items()}

    def _submit(self, pool: ThreadPoolExecutor, lo: int, hi: int) -> tuple[dict[str, Any], list[Future]]:
        rows, variants = self.order[lo:hi], self.variants[lo:hi]
        tensors = self._empty(hi - lo)
        futures = []
        parts = [p for p in np.array_split(np.arange(hi - lo), min(self.num_workers, hi - lo)) if len(p)]
        n = hi - lo
        for key, reader in self._readers.items():
            if self.dequantize and key.startswith(SCALES_GROUP + "/"):
                continue  # read with its values, below
            dst = tensors[key].numpy()
            name = key.removeprefix("features/")
            if self.dequantize and key.startswith("features/") and name in self.quantized:
                scales = self._readers[f"{SCALES_GROUP}/{name}"]
                q = _POOL.get((n, *reader.variant_shape), reader.dtype, keep=self._keep)  # scratch, taken on this thread
                sc = _POOL.get((n, *scales.variant_shape), scales.dtype, keep=self._keep)
                for part in parts:
                    s = slice(part[0], part[-1] + 1)
                    futures.append(pool.submit(_read_dequantized, reader, scales, self.channel_scales[name], rows[s],
                                               variants[s], q[s], sc[s], dst[s], name))
                continue
            for part in parts:
                s = slice(part[0], part[-1] + 1)
                futures.append(pool.submit(reader.read, rows[s], variants[s], dst[s]))
        return self._batch(rows, variants, tensors), futures

    def _batch(self, rows: np.ndarray, variants: np.ndarray, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        labels = torch.from_numpy(self.cache.labels[rows].astype(np.int64))
        scaled = [] if self.dequantize else self.quantized
        return {
            "latents": tensors["latents"],
            "features": ByTeacher({n: tensors[f"features/{n}"] for n in self.teachers}),
            "feature_scales": ByTeacher({n: tensors[f"{SCALES_GROUP}/{n}"] for n in scaled}),
            "labels": labels.pin_memory() if self.pin_memory else labels,
            "index": torch.from_numpy(rows.copy()),
            "flip": torch.from_numpy(variants.astype(bool)),
        }

    def _iter_source(self) -> Iterator[dict[str, Any]]:
        """Batches from a format's own loader, fed this rank's positions in our order."""
        for (lo, hi), arrays in zip(self.batches, self._source.batches(self.order, self.variants, self.batches),
                                    strict=True):
            rows, variants = self.order[lo:hi], self.variants[lo:hi]
            tensors = self._empty(hi - lo)
            for key, value in arrays.items():  # the source reuses its buffers: copy out
                if key in tensors:
                    tensors[key].numpy()[...] = value
            if self.dequantize:
                for n in self.quantized:
                    _check_scales(arrays[f"{SCALES_GROUP}/{n}"], rows, n)
                    dequantize_into(arrays[f"features/{n}"], arrays[f"{SCALES_GROUP}/{n}"], tensors[f"features/{n}"].numpy(),
                                    self.channel_scales[n])
            self.cache.check_unchanged()
            yield self._batch(rows, variants, tensors)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._source is not None:
            yield from self._iter_source()
            return
        pending: deque[tuple[dict[str, Any], list[Future]]] = deque()
        batches = iter(self.batches)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="cache-read") as pool:
            try:
                for lo, hi in batches:
                    pending.append(self._submit(pool, lo, hi))
                    if len(pending) >= self.prefetch:
                        break
                while pending:
                    batch, futures = pending.popleft()
                    try:
                        for f in futures:
                            f.result()
                    except CacheError:  # ShardReadError, or a format's read error (a truncated file)
                        self.cache.check_unchanged()  # a shard gone because the cache is being rebuilt says so
                        raise
                    self.cache.check_unchanged()  # after the reads: a rebuild during them is seen too
                    nxt = next(batches, None)
                    if nxt is not None:
                        pending.append(self._submit(pool, *nxt))
                    yield batch
            finally:
                for _, futures in pending:
                    for f in futures:
                        f.cancel()

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        if self._source is not None:
            self._source.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
