"""How a zarr cache stores its rows: the storage settings of the zarr format, recorded in the manifest's
layout (:attr:`cache.layout.Layout.storage`).

All arrays share one row sharding: one shard (one object per array) holds ``shard_rows`` rows, split into
inner chunks of ``chunk_rows`` rows, uncompressed by default so that the loader can read single rows by
byte range."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr

from ...errors import CacheError
from ...layout import Layout
from .shardfile import shard_index_nbytes

__all__ = ["COMPRESSORS", "ZarrStorage", "zarr_layout"]

COMPRESSORS = ("none", "zstd")


@dataclass(frozen=True)
class ZarrStorage:
    """Rows per shard and per inner chunk, and the compressor of every array."""

    shard_rows: int = 256
    chunk_rows: int = 16
    compressor: str = "none"

    def __post_init__(self) -> None:
        if self.shard_rows < 1 or self.chunk_rows < 1 or self.shard_rows % self.chunk_rows:
            raise CacheError(f"shard_rows ({self.shard_rows}) must be a positive multiple of chunk_rows ({self.chunk_rows})")
        if self.compressor not in COMPRESSORS:
            raise CacheError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")

    @classmethod
    def of(cls, layout: Layout) -> ZarrStorage:
        """The settings a layout records (defaults for those it does not)."""
        known = {k: v for k, v in layout.storage.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_shards(self, layout: Layout) -> int:
        return -(-layout.num_rows // self.shard_rows)

    def shard_range(self, layout: Layout, shard: int) -> tuple[int, int]:
        """Rows ``(lo, hi)`` of shard ``shard``."""
        lo = shard * self.shard_rows
        return lo, min(lo + self.shard_rows, layout.num_rows)

    def array_kwargs(self, layout: Layout, row_shape: tuple[int, ...]) -> dict[str, Any]:
        """``create_array`` arguments of one sharded array of rows of ``row_shape``."""
        compressors = None if self.compressor == "none" else zarr.codecs.ZstdCodec(level=3)
        return dict(shape=(layout.num_rows, *row_shape), chunks=(self.chunk_rows, *row_shape),
                    shards=(self.shard_rows, *row_shape), compressors=compressors, fill_value=0)

    def nbytes(self, layout: Layout) -> dict[str, int]:
        """Bytes of each array's objects in an uncompressed cache of ``layout`` (zarr's ``zarr.json``
        documents aside): per sharded array the inner chunks that hold rows (the last one padded to
        ``chunk_rows``) plus every shard's index; for ``labels`` one chunk of ``shard_rows`` per shard.
        Measured against a written cache in tests/test_store.py."""
        if self.compressor != "none":
            raise CacheError(f"nbytes: the size of a {self.compressor}-compressed cache depends on its data")
        out = {}
        chunks = -(-layout.num_rows // self.chunk_rows)
        shards = self.num_shards(layout)
        for name, (shape, dtype) in layout.row_shapes().items():
            row = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if name == "labels":
                out[name] = shards * self.shard_rows * row
            else:
                out[name] = chunks * self.chunk_rows * row + shards * shard_index_nbytes(self.shard_rows // self.chunk_rows)
        return out


def zarr_layout(*, num_rows: int, resolution: int, variants: int, teachers: Mapping[str, tuple[int, int]],
                feature_dtypes: Mapping[str, str] | None = None, shard_rows: int = 256, chunk_rows: int = 16,
                compressor: str = "none") -> Layout:
    """A :class:`Layout` stored as zarr with these settings (checked)."""
    storage = ZarrStorage(shard_rows=shard_rows, chunk_rows=chunk_rows, compressor=compressor)
    return Layout(num_rows=num_rows, resolution=resolution, variants=variants, teachers=teachers,
                  feature_dtypes=feature_dtypes or {}, storage=storage.to_dict())
