"""The keys of a zarr cache and the raw objects beside its arrays, read and written through the zarr store,
so that any store zarr supports works::

    <root>/zarr.json                  group; attributes["urepa_cache"] holds the manifest
    <root>/latents, features/<t>, feature_scales/<t>, labels     the arrays (:mod:`cache.layout`)
    <root>/build/                     group of build records (no sample data)
        urepa-cache.json              identity: written first at creation, removed first on deletion
        sources.json                  relative path, size and content hash of every source file, in row order
        progress/shard-000123.json    one record per finished shard, written after the shard's data,
                                      with the checksum of every object of the shard
        adding/shard-000123.json      the same for the tokens of teachers being added
        config.json, log.txt          resolved config and log of the builds (local stores)

Identity. Creation writes ``build/urepa-cache.json`` (who created it and a random id) before anything
else, and deletion removes it first: a build deletes only what this marker proves its own (or, when
told to replace it, a readable zarr group), never a folder it merely finds. The id is also the
manifest's ``generation``; a reader remembers it at open and notices a rebuild.

In an object store a prefix is no folder of ours: deleting a cache there removes the keys above alone
(:func:`cache_keys`: the group's and arrays' ``zarr.json``, the chunk objects each array's metadata
defines, the build records by name), the root ``zarr.json`` last, and leaves any other object under
the prefix where it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ... import stores
from ...files import local_root

__all__ = ["IDENTITY_KEY", "CREATED_BY", "SOURCES_KEY", "PROGRESS", "ADDING", "record_key", "record_shard",
           "put", "get", "keys", "delete", "delete_dir", "store_for", "where", "identity", "probe_group", "is_empty", "delete_cache",
           "store_get", "store_set", "store_delete", "write_identity", "cache_keys", "delete_array"]

_logger = logging.getLogger(__name__)

IDENTITY_KEY = "build/urepa-cache.json"  # the marker that proves a store is a cache this code created
CREATED_BY = "pipeline.build"
SOURCES_KEY = "build/sources.json"
PROGRESS = "build/progress/"  # one record per finished shard
ADDING = "build/adding/"  # one record per shard whose tokens of the teachers being added are written


def record_key(folder: str, shard: int) -> str:
    """The key of shard ``shard``'s record in ``folder`` (:data:`PROGRESS` or :data:`ADDING`)."""
    return f"{folder}shard-{shard:06d}.json"


def record_shard(key: str) -> int | None:
    """The shard a record key names ('.../shard-000123.json' -> 123), None for any other key."""
    name = key.rsplit("/", 1)[-1]
    if not (name.startswith("shard-") and name.endswith(".json")):
        return None
    digits = name[len("shard-"):-len(".json")]
    return int(digits) if digits.isdigit() else None


def _prefix(group: zarr.Group) -> str:
    return group.path + "/" if group.path else ""


def store_set(store: Any, key: str, data: bytes) -> None:
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def store_get(store: Any, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _store_list(store: Any, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(collect())


def store_delete(store: Any, key: str) -> None:
    if sync(store.exists(key)):
        sync(store.delete(key))


def put(group: zarr.Group, key: str, data: bytes) -> None:
    store_set(group.store, _prefix(group) + key, data)


def get(group: zarr.Group, key: str) -> bytes | None:
    return store_get(group.store, _prefix(group) + key)


def keys(group: zarr.Group, prefix_key: str) -> list[str]:
    prefix = _prefix(group)
    return [k[len(prefix):] for k in _store_list(group.store, prefix + prefix_key)]


def delete(group: zarr.Group, key: str) -> None:
    store_delete(group.store, _prefix(group) + key)


def delete_dir(group: zarr.Group, key: str) -> None:
    sync(group.store.delete_dir(_prefix(group) + key))


_GROUPS = ("", "features", "feature_scales", "build")  # the cache's groups (cache.layout.SCALES_GROUP among them)
_ARRAY_NAME = r"latents|labels|(?:features|feature_scales)/[^/]+"  # the cache's arrays, by key
_ARRAY = re.compile(_ARRAY_NAME)
_CHUNK = re.compile(rf"({_ARRAY_NAME})/c")  # the start of a chunk key of one of them
_RECORDS = (IDENTITY_KEY, SOURCES_KEY, "build/config.json", "build/log.txt")


def _chunk_grid(store: Any, array: str) -> tuple[str, list[int]] | None:
    """(separator, chunk grid) of the array at key ``array`` as its metadata defines its chunk keys (default
    encoding: ``c<sep>i<sep>j...``, one index per dimension), or None without readable metadata of that kind."""
    try:
        meta = json.loads(store_get(store, f"{array}/zarr.json") or b"null")
        shape = [int(n) for n in meta["shape"]]
        chunks = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        encoding = meta.get("chunk_key_encoding") or {}
        sep = (encoding.get("configuration") or {}).get("separator", "/")
        if meta.get("node_type") != "array" or encoding.get("name", "default") != "default" or len(shape) != len(chunks):
            return None
    except (ValueError, TypeError, KeyError, AttributeError, OSError):
        return None
    return sep, [max(1, math.ceil(n / c)) for n, c in zip(shape, chunks)]


def cache_keys(store: Any, listed: Iterable[str]) -> list[str]:
    """The keys among ``listed`` (keys of ``store``, a cache's root) that a cache of this code writes: group and
    array metadata, the chunk objects of its arrays (as each array's metadata defines them), its build
    records. Anything else (an object someone put under the prefix) is not the cache's."""
    grids: dict[str, tuple[str, list[int]] | None] = {}
    ours = []
    for key in listed:
        head, _, leaf = key.rpartition("/")
        if leaf == "zarr.json" and (head in _GROUPS or _ARRAY.fullmatch(head)):
            ours.append(key)
            continue
        if key in _RECORDS or (key.count("/") == 2 and key.startswith((PROGRESS, ADDING))
                               and record_shard(key) is not None):
            ours.append(key)
            continue
        m = _CHUNK.match(key)
        if m is None:
            continue
        if m.group(1) not in grids:
            grids[m.group(1)] = _chunk_grid(store, m.group(1))
        found = grids[m.group(1)]
        if found is None:
            continue
        sep, grid = found
        index = key[m.end():].split(sep)
        if (len(index) == len(grid) + 1 and index[0] == "" and all(i.isdigit() for i in index[1:])
                and all(int(i) < g for i, g in zip(index[1:], grid))):
            ours.append(key)
    return ours


def delete_array(group: zarr.Group, name: str) -> None:
    """Delete the array ``name`` of a cache's root group: in a local folder its folder, in an object store
    its metadata and chunk objects alone (:func:`cache_keys`)."""
    if isinstance(group.store, zarr.storage.LocalStore):
        delete_dir(group, name)
        return
    for key in cache_keys(group.store, _store_list(group.store, name + "/")):
        store_delete(group.store, key)


def store_for(url: str | os.PathLike | Any, options: dict[str, Any] | None = None) -> Any:
    """A writable zarr store at ``url`` (which need not exist yet; a store object as given), through the store
    layer (:func:`cache.stores.open_store`: settings from the environment and ``options``)."""
    return stores.open_store(url, options=options)


def where(url: str | os.PathLike | Any, key: str) -> str:
    """The file (local caches) or URL of the object ``key`` of the cache at ``url``, for messages."""
    text = stores.location(url)
    root = local_root(text)
    return os.path.join(root, *key.split("/")) if root is not None else f"{text.rstrip('/')}/{key}"


def identity(store: Any) -> dict[str, Any] | None:
    """The creation marker of a cache this code created, or None (absent, unreadable or someone else's)."""
    try:
        raw = store_get(store, IDENTITY_KEY)
        marker = json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("created_by") == CREATED_BY and isinstance(marker.get("id"), str):
        return marker
    return None


def write_identity(store: Any, marker: dict[str, Any]) -> None:
    store_set(store, IDENTITY_KEY, json.dumps(marker).encode())


def probe_group(url: str | os.PathLike | Any, store: Any = None) -> tuple[zarr.Group | None, str | None]:
    """(the zarr group at ``url``, None), (None, None) where there is none, or (None, why it is unreadable).
    ``store``: the store of ``url`` (default :func:`store_for`). A store that cannot be reached (endpoint,
    credentials, bucket) is a :class:`cache.stores.StoreError`, not an unreadable group."""
    try:
        return zarr.open_group(store if store is not None else store_for(url), mode="r"), None
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None, None
    except stores.StoreError:
        raise
    except Exception as e:  # garbage zarr.json and the like
        err = stores.store_error(stores.location(url), e)
        if err is not None:
            raise err from None
        return None, f"{where(url, 'zarr.json')} cannot be read: {type(e).__name__}: {e}"


def is_empty(url: str | os.PathLike | Any, store: Any) -> bool:
    root = None if stores.is_store(url) else local_root(url)
    if root is not None:
        return not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root))
    return not _store_list(store, "")


def delete_cache(url: str | os.PathLike, store: Any) -> None:
    """Delete a cache: its identity marker first, so that readers and builds see at once that it is gone. A
    local folder goes whole; in an object store only the cache's own keys (:func:`cache_keys`) go, the root
    ``zarr.json`` last (so a deletion killed halfway leaves a zarr group a build with ``--overwrite`` finishes
    deleting), and every other object under the prefix stays."""
    store_delete(store, IDENTITY_KEY)
    root = None if stores.is_store(url) else local_root(url)
    if root is not None:
        shutil.rmtree(root)
        return
    listed = _store_list(store, "")
    ours = cache_keys(store, listed)
    for key in sorted(set(ours) - {"zarr.json"}):
        store_delete(store, key)
    if "zarr.json" in ours:
        store_delete(store, "zarr.json")
    kept = sorted(set(listed) - set(ours) - {IDENTITY_KEY})
    if kept:
        _logger.info("%s: kept %d object(s) under the prefix that are not the cache's (%s%s)", stores.location(url),
                     len(kept), ", ".join(kept[:3]), ", ..." if len(kept) > 3 else "")
