"""The node-local read-through copy (cache/nodecache.py, cache/formats/zarr/localcopy.py) against the real S3
server: rows equal to the local cache's, each object downloaded once per node however many processes share
the folder, a second epoch asks the store nothing, the size bound evicts the least recently used copy, a
partial file of a killed download is removed at the next start (and one of a live download is not), bytes
that fail the recorded checksum are never kept or served, and a local disk that is full or read-only falls
back to ranged reads (both paths tested)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from common.mounts import remount, tmpfs
from common.s3 import server_store, upload
from common.synthetic import token_cache
from conftest import ROOT, _env

import cache
from cache import CacheDataset, CacheError, ShardReadError
from cache.formats.zarr.localcopy import LocalCopyRowReader
from cache.formats.zarr.remote import RemoteRowReader
from cache.nodecache import PARTIAL, NodeCache

pytestmark = pytest.mark.remote
obstore = pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")

OBJECTS = 4 * 3  # latents, features/t_a, feature_scales/t_a, features/t_b x 3 shards


@pytest.fixture(scope="module")
def pair(s3_server, tmp_path_factory):
    """(local int8 + float16 cache of 40 rows in 3 shards, its copy's URL in the bucket)."""
    local = tmp_path_factory.mktemp("node") / "c.zarr"
    token_cache(local, n=40, shard_rows=16, chunk_rows=4)
    return local, upload(s3_server, local, "node/c.zarr")


def _batches(c, epoch=0, **kw):
    loader = c.loader(6, seed=3, epoch=epoch, flip=True, num_workers=3, pin_memory=False, drop_last=False, **kw)
    return [{"latents": b["latents"].numpy().copy(), **{f"f/{k}": v.numpy().copy() for k, v in b["features"].items()},
             **{f"s/{k}": v.numpy().copy() for k, v in b["feature_scales"].items()}} for b in loader], loader


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode() + b[k].tobytes())
    return h.hexdigest()


def _copies(folder: Path) -> list[Path]:
    return [p for p in (folder / "objects").rglob("*") if p.is_file() and PARTIAL not in p.name]


def _partials(folder: Path) -> list[Path]:
    return [p for p in (folder / "objects").rglob("*") if p.is_file() and PARTIAL in p.name]


def test_rows_from_local_copies_and_a_second_epoch_asks_the_store_nothing(pair, s3_env, tmp_path):
    local, url = pair
    c = cache.open_cache(url, local_cache=tmp_path / "node")
    got, loader = _batches(c)
    want, _ = _batches(cache.open_cache(local))
    assert _digest(got) == _digest(want)
    readers = list(loader._readers.values())
    assert all(isinstance(r, LocalCopyRowReader) and r.local and r.direct for r in readers)
    assert c.local_cache.stats.downloads == OBJECTS == len(_copies(tmp_path / "node"))
    got, loader = _batches(c, epoch=1)  # another epoch: new readers, the copies found, no request
    assert _digest(got) == _digest(_batches(cache.open_cache(local), epoch=1)[0])
    assert c.local_cache.stats.downloads == OBJECTS
    assert all(r.remote.requests == 0 for r in loader._readers.values())
    blocks, _ = _batches(c, order="blocks", shuffle_window=8)  # the block order reads the copies too
    assert _digest(blocks) == _digest(_batches(cache.open_cache(local), order="blocks", shuffle_window=8)[0])
    again = pickle.loads(pickle.dumps(CacheDataset(c)))  # DataLoader workers reopen it with the same folder
    assert again.cache.local_cache.folder == c.local_cache.folder and again[0]["latents"].shape == (8, 2, 2)
    with pytest.raises(CacheError, match="applies to caches in an object store"):
        cache.open_cache(local, local_cache=tmp_path / "x")
    with pytest.raises(CacheError, match="name the folder too"):
        cache.open_cache(url, local_cache_bytes=10)


def test_processes_of_a_node_share_the_folder(pair, s3_env, tmp_path):
    """Three processes read the whole cache at once through one folder: each object downloaded once."""
    local, url = pair
    script = textwrap.dedent(f"""
        import hashlib, json, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import cache
        from test_nodecache import _batches, _digest
        c = cache.open_cache({url!r}, local_cache={str(tmp_path / "node")!r})
        got, _ = _batches(c)
        print(json.dumps({{"digest": _digest(got), "downloads": c.local_cache.stats.downloads}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    want = _digest(_batches(cache.open_cache(local))[0])
    assert all(r["digest"] == want for r in results)
    assert sum(r["downloads"] for r in results) == OBJECTS == len(_copies(tmp_path / "node"))
    assert not _partials(tmp_path / "node")


def test_size_bound_evicts_the_least_recently_used_copy(pair, s3_env, tmp_path):
    local, url = pair
    probe = cache.open_cache(url, local_cache=tmp_path / "probe")
    r = probe.row_reader("latents")
    ref = cache.open_cache(local).row_reader("latents")

    def read(reader, rows):
        out = np.empty((len(rows), *reader.variant_shape), reader.dtype)
        reader.read(np.asarray(rows), np.zeros(len(rows), np.int64), out)
        return out

    read(r, [0])
    size = probe.local_cache.held_bytes()  # one latents shard object
    c = cache.open_cache(url, local_cache=tmp_path / "node", local_cache_bytes=2 * size + size // 2)
    r = c.row_reader("latents")
    for rows in ([0, 1], [17], [0], [33, 34]):  # shard 0, 1, 0 again (now the most recent), 2: shard 1 goes
        np.testing.assert_array_equal(read(r, rows), read(ref, rows))
        time.sleep(0.02)  # distinct modification times
    node = c.local_cache
    assert node.stats.downloads == 3 and node.stats.evictions == 1 and node.held_bytes() <= node.max_bytes
    left = {p.relative_to(tmp_path / "node" / "objects").parts[3] for p in _copies(tmp_path / "node")}
    assert left == {"0", "2"}  # latents/c/<shard>/...: shard 1 was the least recently used
    small = cache.open_cache(url, local_cache=tmp_path / "small", local_cache_bytes=size // 2)
    rs = small.row_reader("latents")  # every object is larger than the bound: read by range
    np.testing.assert_array_equal(read(rs, [5, 30]), read(ref, [5, 30]))
    assert small.local_cache.stats.too_large >= 1 and not _copies(tmp_path / "small") and rs.local


KILLED = """
import os, sys, time
sys.path.insert(0, {tests!r})
import cache
import cache.formats.zarr.localcopy as lc
real = lc._write

def half_then_wait(fd, data, at):
    real(fd, data[: len(data) // 2], at)
    open({ready!r}, "w").close()
    time.sleep(600)

lc._write = half_then_wait
c = cache.open_cache({url!r}, local_cache={folder!r})
out = __import__("numpy").empty((1, *c.row_reader("latents").variant_shape), "float16")
c.row_reader("latents").read(__import__("numpy").array([0]), __import__("numpy").array([0]), out)
"""


def test_a_killed_download_is_cleaned_at_the_next_start(pair, s3_env, tmp_path):
    local, url = pair
    folder, ready = tmp_path / "node", tmp_path / "ready"
    code = KILLED.format(tests=str(ROOT / "tests"), ready=str(ready), url=url, folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        assert len(_partials(folder)) == 1
        live = NodeCache(folder)  # a download in progress (its lock held) is left alone
        assert live.stats.stale_partials == 0 and len(_partials(folder)) == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    node = NodeCache(folder)
    assert node.stats.stale_partials == 1 and not _partials(folder) and not _copies(folder)
    c = cache.open_cache(url, local_cache=folder)
    got, _ = _batches(c)
    assert _digest(got) == _digest(_batches(cache.open_cache(local))[0])
    assert c.local_cache.stats.downloads == OBJECTS


def test_bytes_failing_the_recorded_checksum_are_never_kept(pair, s3_server, s3_env, tmp_path):
    local, _ = pair
    url = upload(s3_server, local, "node/damaged.zarr")
    store = server_store(s3_server)
    key = "node/damaged.zarr/latents/c/1/0/0/0/0"
    data = bytearray(obstore.get(store, key).bytes())
    data[40] ^= 1  # a flipped byte in row data: the index (and so the ranged reader) cannot see it
    obstore.put(store, key, bytes(data))
    c = cache.open_cache(url, local_cache=tmp_path / "node")
    r = c.row_reader("latents")
    out = np.empty((1, *r.variant_shape), r.dtype)
    r.read(np.array([0]), np.array([0]), out)  # shard 0 is sound
    with pytest.raises(ShardReadError, match=r"latents/c/1/0/0/0/0: its \d+ bytes fail the checksum") as info:
        r.read(np.array([17]), np.array([0]), out)
    assert info.value.where.endswith("latents/c/1/0/0/0/0")
    assert len(_copies(tmp_path / "node")) == 1 and not _partials(tmp_path / "node")


def test_a_full_or_read_only_local_disk_falls_back_to_ranged_reads(pair, s3_env, tmp_path):
    local, url = pair
    with tmpfs(tmp_path / "full", size="8k") as folder:
        c = cache.open_cache(url, local_cache=folder, local_cache_bytes=1 << 30)  # the bound fits, the disk not
        got, loader = _batches(c)
        assert _digest(got) == _digest(_batches(cache.open_cache(local))[0])
        readers = list(loader._readers.values())
        assert any(not r.local for r in readers)  # the disk filled up: those arrays read by range
        assert all(r.broken is None or "No space left" in r.broken for r in readers)
        assert not _partials(folder)
    with tmpfs(tmp_path / "ro", size="1m") as folder:
        remount(folder, readonly=True)
        with pytest.raises(CacheError, match="the node-local copy folder cannot be used: Read-only file system"):
            cache.open_cache(url, local_cache=folder)
    assert isinstance(cache.open_cache(url).row_reader("latents"), RemoteRowReader)
