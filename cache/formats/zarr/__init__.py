"""The zarr v3 format of a feature cache (the default, and the one a build writes): one zarr group, all
arrays sharded alike (:mod:`.settings`), readable by byte range (:mod:`.shardfile`, :mod:`.rows`).

    store.py      the keys of the group and the raw build records beside the arrays, identity
    settings.py   shard and chunk rows, compressor (the layout's storage settings)
    shardfile.py  zarr's sharding byte format, for direct byte-range reads and writes
    rows.py       single rows into the loader's batches
    reader.py     :class:`ZarrCache` and the check of its stored objects
    writer.py     :class:`CacheWriter`: create, resume, add or drop teachers, write shards, repair
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...layout import SCALES_GROUP, Layout
from ...manifest import Manifest
from ...writer import CopyWriter, Format
from .reader import ZarrCache
from .settings import ZarrStorage, zarr_layout
from .writer import CacheWriter

__all__ = ["ZARR", "ZarrCache", "CacheWriter", "ZarrStorage", "zarr_layout"]


def _claims(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "zarr.json"))


class _ZarrCopy(CopyWriter):
    """A zarr copy, one shard per block; a rerun keeps the finished shards. ``overwrite``: replace a cache of
    other settings at ``tmp`` (a local copy's temporary name is its own); ``storage_options``: the settings of
    an object store at ``tmp`` (a copy into a store is written in place: a store has no rename)."""

    def __init__(self, tmp: str, *, layout: Layout, manifest: Manifest, sources: list[dict[str, Any]],
                 block_rows: int, overwrite: bool = True, storage_options: Mapping[str, Any] | None = None) -> None:
        del block_rows  # a zarr copy's block is its shard (the source's storage settings)
        self.writer, resumed = CacheWriter.create_or_resume(tmp, layout=layout, manifest=manifest, sources=sources,
                                                            overwrite=overwrite, storage_options=storage_options)
        self.block_rows = self.writer.storage.shard_rows
        self.skipped = [s.to_dict() for s in manifest.skipped_files]
        self.stats = manifest.stats.to_dict() if manifest.stats is not None else {}
        self._done = {self.writer.shard_range(s)[0] for s in self.writer.completed_shards()} if resumed else set()

    def done_blocks(self) -> set[int]:
        return set(self._done)

    def write_block(self, lo: int, arrays: Mapping[str, np.ndarray]) -> None:
        layout = self.writer.layout
        shard = lo // self.block_rows
        hi = self.writer.shard_range(shard)[1]
        self.writer.write_shard(shard, latents=arrays["latents"],
                                features={t: arrays[f"features/{t}"] for t in layout.teachers},
                                scales={t: arrays[f"{SCALES_GROUP}/{t}"] for t in layout.quantized_teachers},
                                labels=arrays["labels"], skipped=[s for s in self.skipped if lo <= s["row"] < hi])

    def finish(self) -> None:
        self.writer.finalize(self.stats)


ZARR = Format(name="zarr", claims=_claims, open=ZarrCache, copy_writer=_ZarrCopy, remote=True,
              options=("overwrite", "storage_options"),
              description="a zarr cache (a folder or store URL: the build's format)")
