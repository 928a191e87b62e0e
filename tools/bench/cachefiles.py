"""What the benchmarks read of a zarr cache beyond the reader contract: the files of its shards (for raw
reads, the limit a loader is measured against) and its progress records (for build timings)."""

from __future__ import annotations

import json
import os
from typing import Any

from cache.formats.zarr import ZarrCache
from cache.formats.zarr import store as keys
from cache.formats.zarr.shardfile import shard_key

__all__ = ["shard_paths", "progress_records"]


def shard_paths(c: ZarrCache) -> dict[str, list[str]]:
    """Local file of every stored shard, per array ('latents', 'features/<name>', ...); local caches only."""
    if c.root is None:
        raise ValueError(f"{c.url} is not a local folder")
    out = {}
    for name in c.layout.array_names(labels=False):
        arr = c.array(name)
        paths = [os.path.join(c.root, arr.path, shard_key(arr, s)) for s in range(c.storage.num_shards(c.layout))]
        out[name] = [p for p in paths if os.path.exists(p)]
    return out


def progress_records(c: ZarrCache) -> list[dict[str, Any]]:
    """Every finished shard's progress record, in key order."""
    return [json.loads(keys.get(c.group, key)) for key in sorted(keys.keys(c.group, keys.PROGRESS))]
