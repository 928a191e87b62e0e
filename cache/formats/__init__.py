"""The cache formats, and the registry that opens a cache in any of them.

    zarr/     the build's format: a zarr v3 group, sharded rows read by byte range
    hdf5.py   one .h5 file of contiguous datasets (cache.convert)
    ffcv/     a folder with one FFCV .beton, rows read by byte range (FFCV's own loader the fallback) (cache.convert)

Each format module claims its own on-disk signature and gives the registry one
:class:`cache.writer.Format` entry; this module names no format's internals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .. import stores
from ..errors import CacheError
from ..files import local_root
from ..reader import CacheReader
from ..writer import Format
from .ffcv import FFCV
from .hdf5 import HDF5
from .zarr import ZARR

__all__ = ["FORMATS", "format_named", "detect_format", "open_cache"]

#: Every format, by name; the first is the build's and the default for store URLs.
FORMATS: dict[str, Format] = {f.name: f for f in (ZARR, HDF5, FFCV)}


def format_named(name: str) -> Format:
    if name not in FORMATS:
        raise CacheError(f"unknown format {name!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(url: str | os.PathLike | Any) -> Format:
    """The format of the cache at ``url``, from what is there: the format that claims a local file or
    folder (an empty or foreign folder goes to the build's format, whose reader says what is missing); a
    store URL (``s3://``, ...) or a store object to a format that reads stores. Anything else is a
    :class:`CacheError` naming the path and what it holds."""
    root = None if stores.is_store(url) else local_root(url)
    if root is None:
        return next(f for f in FORMATS.values() if f.remote)
    for fmt in FORMATS.values():
        if fmt.claims(root):
            return fmt
    if os.path.isdir(root):
        return next(iter(FORMATS.values()))  # an empty or foreign folder: the build's format says what is missing
    if os.path.isfile(root):
        kinds = ", ".join(f"not {f.description}" for f in FORMATS.values())
        raise CacheError(f"{root} is a file but {kinds}", url=root)
    raise CacheError(f"no cache at {root}", url=root)


def open_cache(url: str | os.PathLike | Any, *, allow_incomplete: bool = False,
               storage_options: Mapping[str, Any] | None = None, local_cache: str | os.PathLike | None = None,
               local_cache_bytes: int | None = None) -> CacheReader:
    """Open a finished cache for reading, in any format (:func:`detect_format`): a zarr folder, an object
    store URL (``s3://bucket/prefix.zarr``; :mod:`cache.stores`) or a store object (zarr's ``ObjectStore``,
    an obstore store), an HDF5 file, an FFCV folder. ``storage_options``: the store's settings
    (endpoint, region, credentials, ``allow_http``, ...) where the environment does not give them; kept in
    memory only. ``local_cache``: a local folder for node-local copies of a store cache's shard objects
    (:mod:`cache.nodecache`: each downloaded once, checked, shared by the node's processes), at most
    ``local_cache_bytes`` bytes (None: the folder's free disk space). Every format offers
    :class:`cache.reader.CacheReader`."""
    fmt = detect_format(url)
    extra: dict[str, Any] = {}
    if storage_options:
        extra["storage_options"] = storage_options
    if local_cache is not None:
        extra.update(local_cache=local_cache, local_cache_bytes=local_cache_bytes)
    elif local_cache_bytes is not None:
        raise CacheError("local_cache_bytes bounds a local_cache folder: name the folder too")
    if extra and not fmt.remote:
        what = "storage options" if storage_options else "a node-local copy (local_cache)"
        raise CacheError(f"{stores.location(url)} is a {fmt.name} cache: {what} apply to store URLs",
                         url=stores.location(url))
    return fmt.open(url, allow_incomplete=allow_incomplete, **extra)
