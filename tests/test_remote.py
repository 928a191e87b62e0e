"""The loader from a cache in the real S3 server (cache/formats/zarr/remote.py): batches bit-identical to
the local loader's (full permutation, flips, int8 teachers), by byte range with each shard's index read
once, and through zarr's own path when that is forced (both paths tested); an object deleted or replaced
under a running loader, a server that stops and comes back, one that stays away: retried and counted,
or a clear error naming the object, never a wrong row."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from common.formats import direct_reads
from common.s3 import S3Server, server_store, upload
from common.synthetic import token_cache

import cache
from cache import stores
from cache.formats.zarr.remote import RemoteRowReader, coalesce

pytestmark = pytest.mark.remote
obstore = pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")


@pytest.fixture(scope="module")
def pair(s3_server, tmp_path_factory):
    """(local int8 + float16 cache, its copy's URL in the bucket)."""
    local = tmp_path_factory.mktemp("remote") / "c.zarr"
    token_cache(local, n=40, shard_rows=16, chunk_rows=4)
    return local, upload(s3_server, local, "remote/c.zarr")


def _batches(c, **kw):
    loader = c.loader(6, seed=3, epoch=1, flip=True, num_workers=2, pin_memory=False, drop_last=False, **kw)
    out = [{"latents": b["latents"].numpy().copy(), "index": b["index"].numpy().copy(),
            **{f"f/{k}": v.numpy().copy() for k, v in b["features"].items()},
            **{f"s/{k}": v.numpy().copy() for k, v in b["feature_scales"].items()}} for b in loader]
    return out, loader


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


@pytest.mark.parametrize("io", ["ranged", "zarr"])
def test_remote_batches_equal_local(pair, s3_env, monkeypatch, io):
    local, url = pair
    if io == "zarr":
        monkeypatch.setenv("UREPA_ZARR_IO", "zarr")
    expected, _ = _batches(cache.open_cache(local))
    got, loader = _batches(cache.open_cache(url))
    assert direct_reads(loader) == (io == "ranged")
    _equal(got, expected)
    if io == "ranged":
        readers = list(loader._readers.values())
        assert all(isinstance(r, RemoteRowReader) for r in readers)
        shards = -(-40 // 16)
        assert all(r.index_reads == shards for r in readers)  # each index once, kept
        assert all(r.retries == 0 for r in readers)
        deq, _ = _batches(cache.open_cache(url), dequantize=True)
        deq_local, _ = _batches(cache.open_cache(local), dequantize=True)
        _equal(deq, deq_local)


@pytest.mark.parametrize("io", ["ranged", "zarr"])
def test_block_order_fetches_each_chunk_once(pair, s3_env, monkeypatch, io):
    """order="blocks" from S3: the local loader's batches bit for bit; by range, each planned inner chunk
    fetched whole, once (one GET per chunk), and dropped when its rows were read."""
    local, url = pair
    if io == "zarr":
        monkeypatch.setenv("UREPA_ZARR_IO", "zarr")
    kw = dict(order="blocks", shuffle_window=8)
    expected, _ = _batches(cache.open_cache(local), **kw)
    got, loader = _batches(cache.open_cache(url), **kw)
    _equal(got, expected)
    permuted, _ = _batches(cache.open_cache(local))
    assert [b["index"].tolist() for b in got] != [b["index"].tolist() for b in permuted]
    if io == "ranged":
        chunks = len(np.unique(cache.open_cache(url).rows // 4))  # chunks of 4 rows holding data
        for r in loader._readers.values():
            assert r.chunk_reads == chunks and r.refetches == 0
            assert r.requests == chunks + r.index_reads  # one GET per chunk, one per shard index
            assert not r._kept and not r._planned  # every chunk dropped once its rows were read


def test_block_order_within_a_small_memory_bound(pair, s3_env):
    """Kept chunks past ``max_kept`` bytes are dropped and fetched again when needed: the same rows."""
    local, url = pair
    c = cache.open_cache(url)
    r = c.row_reader("latents")
    r.max_kept = 2 * 4 * r.row_nbytes  # two chunks
    order = cache.block_order(c.rows, block_rows=4, window=16, seed=0, epoch=0, batch_size=4)
    r.plan(order)
    ref = cache.open_cache(local).row_reader("latents")
    for lo in range(0, len(order), 4):
        rows = order[lo:lo + 4]
        np.testing.assert_array_equal(_read(r, rows), _read(ref, rows))
    assert r.refetches > 0 and r._kept_bytes <= r.max_kept


def test_block_order_fetches_ahead_of_the_reads(pair, s3_env):
    """Told the plan, the reader fetches up to ``ahead`` planned chunks no read asked for yet, in the plan's
    order (the next window's while this one is copied out), each still once; closing stops what is in flight."""
    import time

    local, url = pair
    c = cache.open_cache(url)
    r = c.row_reader("latents")
    r.ahead = 3
    order = cache.block_order(c.rows, block_rows=4, window=8, seed=0, epoch=0, batch_size=4)
    r.plan(order)
    ref = cache.open_cache(local).row_reader("latents")
    np.testing.assert_array_equal(_read(r, order[:4]), _read(ref, order[:4]))
    first = list(dict.fromkeys((order // 4).tolist()))  # the planned chunks in the order of first use
    needed = set((order[:4] // 4).tolist())
    ahead = [ch for ch in first if ch not in needed][:3]
    deadline = time.monotonic() + 60  # a loaded machine: wait for the fetches to land, nothing timed
    while not all(f.done() for f in r._kept.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r._untouched == set(ahead) and set(ahead) <= set(r._kept)
    assert r.chunk_reads == len(needed) + len(ahead)
    for lo in range(4, len(order), 4):  # the rest of the plan: one GET per chunk all the same
        np.testing.assert_array_equal(_read(r, order[lo:lo + 4]), _read(ref, order[lo:lo + 4]))
    assert r.chunk_reads == len(first) and r.refetches == 0 and not r._kept and not r._untouched
    r.plan(order)
    _read(r, order[:4])
    kept = list(r._kept.values())
    r.close()  # fetches ahead still in flight are cancelled on the event loop, not left running
    deadline = time.monotonic() + 60
    while (r._planned or not all(f.done() for f in kept)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(f.done() for f in kept) and not r._planned


def test_coalesce_merges_neighbours_and_keeps_each_range():
    starts = np.array([1000, 0, 100, 5000, 200])
    pieces = coalesce(starts, 100, max_gap=0, max_piece=250)
    assert [(lo, hi) for lo, hi, _ in pieces] == [(0, 200), (200, 300), (1000, 1100), (5000, 5100)]
    assert sorted(int(i) for _, _, m in pieces for i in m) == list(range(5))
    pieces = coalesce(starts, 100, max_gap=800, max_piece=10_000)
    assert [(lo, hi) for lo, hi, _ in pieces] == [(0, 1100), (5000, 5100)]


def _reader(url, name="latents"):
    c = cache.open_cache(url)
    r = c.row_reader(name)
    assert isinstance(r, RemoteRowReader)
    return c, r


def _read(r, rows):
    out = np.empty((len(rows), *r.variant_shape), r.dtype)
    r.read(np.asarray(rows), np.zeros(len(rows), np.int64), out)
    return out


def test_deleted_and_replaced_objects_are_never_served(pair, s3_server, s3_env, tmp_path):
    local, _ = pair
    url = upload(s3_server, local, "remote/faults.zarr")
    c, r = _reader(url)
    ref = cache.open_cache(local).row_reader("latents")
    np.testing.assert_array_equal(_read(r, [0, 17]), _read(ref, [0, 17]))  # indexes of shards 0 and 1 kept
    store = server_store(s3_server)
    shard2 = "remote/faults.zarr/latents/c/2/0/0/0/0"
    obstore.delete(store, shard2)
    with pytest.raises(cache.ShardReadError, match="latents/c/2/0/0/0/0 is missing") as info:
        _read(r, [33])
    assert info.value.where.endswith("latents/c/2/0/0/0/0")
    shard1 = "remote/faults.zarr/latents/c/1/0/0/0/0"
    data = bytes(obstore.get(store, shard1).bytes())
    obstore.put(store, shard1, data[:-1] + bytes([data[-1] ^ 1]))  # same size, another ETag
    with pytest.raises(cache.CacheChangedError, match="latents/c/1/0/0/0/0 changed"):
        _read(r, [17])
    c2, r2 = _reader(url)  # a fresh reader checks the index's crc32c
    with pytest.raises(cache.ShardReadError, match="crc32c"):
        _read(r2, [17])


def test_server_away_then_back(pair, tmp_path, monkeypatch):
    """A server that stops: each request retried with backoff and counted, then an error naming the
    object; one that comes back within the retries: the rows, right."""
    local, _ = pair
    with S3Server.start(tmp_path / "own") as server:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        stores._STORES.clear()
        url = upload(server, local, "c.zarr")
        c, r = _reader(url)
        r.backoff = 0.05
        want = _read(cache.open_cache(local).row_reader("latents"), [1, 20, 39])
        np.testing.assert_array_equal(_read(r, [1]), want[:1])
        server.stop()
        with pytest.raises(stores.StoreError, match=r"latents/c/\d/0/0/0/0: reading it failed 5 times"):
            _read(r, [20])
        assert r.retries == 4
        r.backoff, r.attempts = 0.5, 11  # up to ~17 min of backoff, ended by the restart (slow on a loaded machine)
        restart = threading.Thread(target=server.restart)
        restart.start()
        try:
            got = _read(r, [1, 20, 39])
        finally:
            restart.join()
        np.testing.assert_array_equal(got, want)
        assert r.retries > 4
    stores._STORES.clear()


def test_unknown_failure_falls_back_to_zarrs_path(pair, s3_env, monkeypatch):
    local, url = pair
    _, r = _reader(url)

    async def broken(*a, **k):
        raise TypeError("a layout this code does not know")

    monkeypatch.setattr(r, "_read", broken)
    got = _read(r, [2, 30, 39])
    assert not r.direct
    np.testing.assert_array_equal(got, _read(cache.open_cache(local).row_reader("latents"), [2, 30, 39]))
