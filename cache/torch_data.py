"""The cache as ``torch.utils.data`` datasets, for training code that is not ours (see docs/reuse.md).

Two ways in:

- :class:`CacheDataset`, map-style: ``ds[i]`` is data row ``cache.rows[i]`` (skipped rows are not
  indexed), read through the format's row readers (zarr and HDF5 caches; an FFCV cache is refused:
  its own loader reads whole batches, so use :class:`CacheBatches`); use it with any sampler, ``DataLoader(ds, batch_size, shuffle=True,
  num_workers=8)``. Items collate into the batches :class:`cache.loader.CacheLoader` yields.
- :class:`CacheBatches`, iterable: whole batches from :class:`~cache.loader.CacheLoader` (its
  deterministic order, byte-range reads and reader threads), with rank and world size taken from
  ``torch.distributed`` when it is initialised; every format (zarr, HDF5, FFCV); ``set_epoch(epoch)`` before each epoch; use with
  ``DataLoader(ds, batch_size=None)``.

An item or batch is ``{"latents", "features", "feature_scales", "labels", "index", "flip"}``: ``latents``
float16 (8, h, w) posterior mean (channels 0-3) and std (4-7), so ``z = (mean + std * randn) * 0.18215``;
``features`` name -> (T, D) teacher tokens; ``labels`` int64 class; ``index`` int64 row id; ``flip`` bool,
whether the mirrored variant was read. Tokens are float16 with ``dequantize=True`` (the default here);
with ``dequantize=False`` int8 teachers' tokens come as stored, int8 values with their float32 scales (T,)
in ``feature_scales``, which a training step can dequantise on its device with the teacher's channel
scales: ``cache.quant.dequantize_tokens(values, scales, cache.channel_scales(name))``. Batched, each gains a leading batch dimension.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .errors import CacheChangedError, ShardReadError
from .formats import open_cache
from .layout import SCALES_GROUP, ByTeacher
from .loader import CacheLoader, rank_batches
from .quant import dequantize_into, scales_valid
from .reader import CacheReader

__all__ = ["CacheDataset", "CacheBatches", "distributed_rank"]


def _open(cache: CacheReader | str | os.PathLike) -> CacheReader:
    return cache if isinstance(cache, CacheReader) else open_cache(cache)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the default ``torch.distributed`` process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _ReopensByUrl:
    """Pickles the cache as its URL, generation and node-local copy folder, so spawned DataLoader workers reopen
    it (and refuse a cache rebuilt in between)."""

    cache: CacheReader
    _unpicklable: tuple[str, ...] = ()  # per-process state (open files), rebuilt on first use

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in self._unpicklable}
        cache = state.pop("cache")
        node = cache.local_cache
        state.update(_url=cache.url, _generation=cache.generation, _complete=cache.complete,
                     _local=None if node is None else (node.folder, node.max_bytes))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        url, generation, complete = state.pop("_url"), state.pop("_generation"), state.pop("_complete")
        local = state.pop("_local", None)  # the node-local copy folder, shared with the process that pickled it
        self.__dict__.update(state)
        self.cache = open_cache(url, allow_incomplete=not complete, **(
            {} if local is None else {"local_cache": local[0], "local_cache_bytes": local[1]}))
        if self.cache.generation != generation:
            raise CacheChangedError(f"the cache at {url} was rebuilt since this dataset opened it (generation "
                                    f"{generation}, now {self.cache.generation}); open it again")


class CacheDataset(_ReopensByUrl, Dataset):
    """Map-style dataset over the data rows of a cache: item ``i`` is row ``cache.rows[i]``.

    Args:
        cache: an opened cache (:func:`cache.open_cache`), or its path or URL; zarr or HDF5.
        teachers: teacher names to read (default all).
        variant: ``0`` (as encoded), ``1`` (mirrored; caches built with ``--flip both``), or
            ``"random"``: 0 or 1 drawn per item from torch's generator (so DataLoader workers, each
            seeded by the DataLoader, draw different ones).

    Reads go through the format's row readers (:meth:`cache.reader.CacheReader.row_reader`, as
    :class:`~cache.loader.CacheLoader`'s), one row at a time. An FFCV cache is refused: FFCV reads whole
    batches through its own loader; use :class:`CacheBatches`, or convert the cache to zarr or HDF5
    (``python -m cache.convert``). A shard missing from a finished cache raises
    :class:`~cache.errors.ShardReadError`; a cache rebuilt since it was opened raises
    :class:`~cache.errors.CacheChangedError`.
    """

    _unpicklable = ("_readers",)

    def __init__(self, cache: CacheReader | str | os.PathLike, *, teachers: Sequence[str] | None = None,
                 variant: int | str = 0, dequantize: bool = True) -> None:
        self.cache = _open(cache)
        if not self.cache.reads_rows:
            raise ValueError(
                f"CacheDataset reads single rows, which the {self.cache.format} cache {self.cache.url} does not offer "
                "(its own loader reads whole batches): use cache.CacheBatches over it, or convert it to zarr or HDF5 "
                "(`python -m cache.convert SRC DST --format hdf5`) for a map-style dataset")
        self.teachers = self.cache.teacher_names(teachers)
        if variant not in (0, 1, "random"):
            raise ValueError(f"variant must be 0, 1 or 'random', got {variant!r}")
        if variant != 0 and self.cache.num_variants < 2:
            raise ValueError(f"variant={variant!r} needs a cache built with --flip both (this one stores 1 variant)")
        self.variant = variant
        self.dequantize = dequantize
        self.quantized = [n for n in self.teachers if self.cache.layout.quantized(n)]
        self.channel_scales = {n: self.cache.channel_scales(n) for n in self.quantized}

    def __len__(self) -> int:
        return len(self.cache.rows)

    def _reader(self, key: str) -> Any:
        readers = self.__dict__.setdefault("_readers", {})
        if key not in readers:
            readers[key] = self.cache.row_reader(key)
        return readers[key]

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.cache.rows[i])
        v = int(torch.randint(0, 2, ())) if self.variant == "random" else int(self.variant)
        rows, variants = np.array([row], dtype=np.int64), np.array([v], dtype=np.int64)
        data = {}
        for key in ["latents", *(f"features/{n}" for n in self.teachers), *(f"{SCALES_GROUP}/{n}" for n in self.quantized)]:
            reader = self._reader(key)
            out = np.empty((1, *reader.variant_shape), dtype=reader.dtype)
            try:
                reader.read(rows, variants, out)
            except Exception:
                self.cache.check_unchanged()  # a shard gone because the cache is being rebuilt says so
                raise
            data[key] = out
        self.cache.check_unchanged()  # after the reads: rows of a rebuilt cache are never served
        if self.dequantize:
            for n in self.quantized:
                if not scales_valid(data[f"{SCALES_GROUP}/{n}"]):
                    raise ShardReadError(f"{self.cache.url}: {SCALES_GROUP}/{n} row {row}: non-finite or negative "
                                         "per-token scales: the cache is damaged", url=self.cache.url)
                tokens = np.empty(data[f"features/{n}"].shape, dtype=np.float16)
                dequantize_into(data[f"features/{n}"], data.pop(f"{SCALES_GROUP}/{n}"), tokens, self.channel_scales[n])
                data[f"features/{n}"] = tokens
        data = {k: torch.from_numpy(v[0]) for k, v in data.items()}
        return {
            "latents": data["latents"],
            "features": ByTeacher({n: data[f"features/{n}"] for n in self.teachers}),
            "feature_scales": ByTeacher({n: data[f"{SCALES_GROUP}/{n}"] for n in self.quantized if not self.dequantize}),
            "labels": torch.tensor(int(self.cache.labels[row]), dtype=torch.int64),
            "index": torch.tensor(row, dtype=torch.int64),
            "flip": torch.tensor(bool(v)),
        }

    def __del__(self) -> None:
        for reader in self.__dict__.get("_readers", {}).values():
            try:
                reader.close()
            except Exception:
                pass


class CacheBatches(_ReopensByUrl, IterableDataset):
    """Whole batches from a :class:`~cache.loader.CacheLoader`, for ``DataLoader(ds, batch_size=None)``.

    Batch k of an epoch is the one ``CacheLoader(cache, batch_size, seed=seed, epoch=epoch, rank=rank,
    world_size=world_size, ...)`` yields k-th: the order is a function of (seed, epoch) alone, ranks are
    disjoint, and the global batch does not depend on the world size. ``rank``/``world_size`` default to
    the ``torch.distributed`` process group's (:func:`distributed_rank`), read at construction and again
    at each :meth:`set_epoch`. Call :meth:`set_epoch` before each epoch (``start`` resumes inside one). With DataLoader workers,
    worker w of n yields batches w, w + n, ... and the DataLoader's in-order round robin restores the
    order; the loader already reads with ``num_workers`` threads, so ``num_workers=0`` is usually
    enough. ``persistent_workers=True`` would not see :meth:`set_epoch`: leave it off.

    Works for every format :class:`~cache.loader.CacheLoader` reads (zarr, HDF5, FFCV). The other keyword
    arguments are :class:`~cache.loader.CacheLoader`'s.
    """

    def __init__(self, cache: CacheReader | str | os.PathLike, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 flip: bool = False, drop_last: bool = True, teachers: Sequence[str] | None = None,
                 num_workers: int = 4, prefetch: int = 2, rank: int | None = None, world_size: int | None = None,
                 pin_memory: bool | None = None, dequantize: bool = True) -> None:
        self.cache = _open(cache)
        self.teachers = self.cache.teacher_names(teachers)
        if flip and self.cache.num_variants < 2:
            raise ValueError("flip=True needs a cache built with --flip both (this one stores 1 variant)")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed's are used)")
        self.batch_size, self.seed, self.shuffle, self.flip, self.drop_last = batch_size, seed, shuffle, flip, drop_last
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        self.dequantize = dequantize
        self._given = rank is not None
        self.rank, self.world_size = (rank, world_size) if self._given else distributed_rank()
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if drop_last and batch_size * self.world_size > len(self.cache):
            raise ValueError(f"a global batch of {batch_size} x {self.world_size} ranks exceeds the {len(self.cache)} "
                             f"data rows of {self.cache.url}: with drop_last=True no batch would come; use a smaller "
                             "batch or drop_last=False")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        """Iterate epoch ``epoch`` next, from sample ``start`` of it (samples all ranks consumed)."""
        self.epoch, self.start = int(epoch), int(start)
        if not self._given:
            self.rank, self.world_size = distributed_rank()

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch."""
        return len(rank_batches(len(self.cache), batch_size=self.batch_size, world_size=self.world_size, rank=self.rank,
                                start=self.start, drop_last=self.drop_last))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        loader = CacheLoader(
            self.cache, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank,
            world_size=self.world_size, start=self.start, flip=self.flip, drop_last=self.drop_last,
            num_workers=self.num_workers, prefetch=self.prefetch, teachers=self.teachers, dequantize=self.dequantize,
            pin_memory=False if worker is not None else self.pin_memory)  # workers leave pinning to the DataLoader
        if worker is not None:
            loader.batches = loader.batches[worker.id::worker.num_workers]
        try:
            yield from loader
        finally:
            loader.close()
