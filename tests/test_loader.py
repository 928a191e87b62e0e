"""The zarr loader: order functions, byte-range reads against zarr's own.

The reader contract every format keeps (matched rows, determinism, resume, ranks, flips, teacher subsets)
is tested in tests/test_formats.py, on the synthetic cache of tests/common/synthetic.py converted to each
format; the writer, Layout and refusals in tests/test_store.py."""

import numpy as np
import pytest
from common.formats import direct_reads
from common.synthetic import synthetic_cache

from cache import block_order, epoch_flips, epoch_order, rank_batches

pytestmark = pytest.mark.usefixtures("io_mode")  # every test with direct shard I/O and with zarr's forced


@pytest.fixture(scope="module")
def synth(tmp_path_factory, io_mode):
    return synthetic_cache(tmp_path_factory.mktemp("s") / "c.zarr")


@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 1), (5, 0)])
def test_epoch_order_is_a_pure_permutation(seed, epoch):
    rows = np.arange(1000) * 3
    a = epoch_order(rows, seed=seed, epoch=epoch)
    np.testing.assert_array_equal(a, epoch_order(rows, seed=seed, epoch=epoch))
    np.testing.assert_array_equal(np.sort(a), rows)
    assert not np.array_equal(a, epoch_order(rows, seed=seed, epoch=epoch + 1))
    assert not np.array_equal(a, rows)
    np.testing.assert_array_equal(epoch_order(rows, seed=seed, epoch=epoch, shuffle=False), rows)
    f = epoch_flips(1000, seed=seed, epoch=epoch)
    np.testing.assert_array_equal(f, epoch_flips(1000, seed=seed, epoch=epoch))
    assert 400 < f.sum() < 600


@pytest.mark.parametrize("n,batch,world,drop_last", [(97, 4, 1, True), (97, 4, 3, True), (97, 5, 4, False),
                                                     (10, 4, 4, False), (64, 8, 2, True), (3, 1, 4, False)])
def test_rank_batches_disjoint_and_covering(n, batch, world, drop_last):
    per_rank = [rank_batches(n, batch_size=batch, world_size=world, rank=r, drop_last=drop_last) for r in range(world)]
    positions = [p for rb in per_rank for lo, hi in rb for p in range(lo, hi)]
    assert len(positions) == len(set(positions))
    g = batch * world
    if drop_last:
        assert sorted(positions) == list(range(n // g * g))
        assert len({len(rb) for rb in per_rank}) == 1
    else:
        assert sorted(positions) == list(range(n))
    # the global batch k is the same set of positions whatever the world size
    if drop_last and world > 1:
        single = rank_batches(n, batch_size=g, world_size=1, rank=0)
        for k, (lo, hi) in enumerate(single):
            assert sorted(p for rb in per_rank for p in range(*rb[k])) == list(range(lo, hi))


BLOCK_CASES = [  # (rows, block, window, batch, world)
    (np.arange(1000), 16, 64, 8, 1), (np.arange(1000), 16, 64, 8, 3), (np.delete(np.arange(203), [0, 5, 6, 7, 150]), 4, 12, 5, 2),
    (np.arange(97) * 3, 8, 1, 4, 4), (np.arange(50), 64, 1000, 3, 2), (np.arange(10), 4, 8, 4, 4)]


def _rank_rows(order, batch, world, **kw):
    return [[order[lo:hi] for lo, hi in rank_batches(len(order), batch_size=batch, world_size=world, rank=r, **kw)]
            for r in range(world)]


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("rows,block,window,batch,world", BLOCK_CASES)
def test_block_order_is_a_pure_permutation_of_whole_blocks_per_rank(seed, rows, block, window, batch, world):
    kw = dict(block_rows=block, window=window, batch_size=batch, world_size=world)
    a = block_order(rows, seed=seed, epoch=0, **kw)
    np.testing.assert_array_equal(a, block_order(rows, seed=seed, epoch=0, **kw))  # (seed, epoch) alone
    np.testing.assert_array_equal(np.sort(a), np.sort(rows))
    if len(rows) // block > 2:
        assert not np.array_equal(a, block_order(rows, seed=seed, epoch=1, **kw))
        assert not np.array_equal(a, block_order(rows, seed=seed + 1, epoch=0, **kw))
    for drop_last in (True, False):
        per_rank = _rank_rows(a, batch, world, drop_last=drop_last)
        seen = np.concatenate([b for rb in per_rank for b in rb] or [np.zeros(0, np.int64)])
        assert len(seen) == len(set(seen.tolist()))  # ranks disjoint
        g = batch * world
        assert len(seen) == (len(rows) // g * g if drop_last else len(rows))  # and covering
    # each rank reads whole blocks of its own: a block is shared by two ranks only where their parts meet
    per_rank = _rank_rows(a, batch, world, drop_last=False)
    owners: dict[int, set[int]] = {}
    for r, rb in enumerate(per_rank):
        for b in rb:
            for row in b.tolist():
                owners.setdefault(row // block, set()).add(r)
    assert sum(len(o) > 1 for o in owners.values()) <= world - 1
    # the shuffle window: the rows of one block are read within two windows of their rank's stream
    for rb in per_rank:
        stream = np.concatenate(rb) if rb else np.zeros(0, np.int64)
        for b in np.unique(stream // block):
            at = np.flatnonzero(stream // block == b)
            assert at.max() - at.min() < 2 * max(window, block)


@pytest.mark.parametrize("seed", [0, 3, 99])
def test_block_order_resumes_at_any_global_batch(seed):
    rows = np.delete(np.arange(500), [7, 8, 300])
    batch, world = 6, 3
    order = block_order(rows, block_rows=8, window=40, seed=seed, epoch=2, batch_size=batch, world_size=world)
    for r in range(world):
        full = rank_batches(len(order), batch_size=batch, world_size=world, rank=r)
        for k in (0, 1, 5, len(full) - 1):
            rest = rank_batches(len(order), batch_size=batch, world_size=world, rank=r, start=k * batch * world)
            assert [order[lo:hi].tolist() for lo, hi in rest] == [order[lo:hi].tolist() for lo, hi in full[k:]]


def test_block_order_mixes_blocks_like_a_window_should():
    """With blocks of 16 and a window of 256, a batch of 32 draws from many blocks (a permutation: ~32)."""
    rows = np.arange(16384)
    order = block_order(rows, block_rows=16, window=256, seed=0, epoch=0, batch_size=32)
    blocks_per_batch = [len(np.unique(order[lo:lo + 32] // 16)) for lo in range(0, len(order), 32)]
    assert np.mean(blocks_per_batch) > 12
    assert not np.array_equal(order // 16, np.sort(order) // 16)


def test_zarr_fallback_reads_equal_direct_reads(tmp_path, synth, io_mode):
    z = synthetic_cache(tmp_path / "zstd.zarr", compressor="zstd")
    direct, fallback = synth.loader(8, seed=9, flip=True), z.loader(8, seed=9, flip=True)
    assert direct_reads(direct) == (io_mode == "direct") and not direct_reads(fallback)
    for a, b in zip(direct, fallback):
        assert (a["latents"] == b["latents"]).all() and (a["features"]["t_a"] == b["features"]["t_a"]).all()


def test_batch_buffers_are_reused_across_loaders_never_under_a_held_batch(synth):
    """A loader per epoch refills the buffers of the last one's batches (no fresh pages after the first epoch),
    but never a buffer that a batch still in use holds."""
    first = {b["features"]["t_a"].data_ptr() for b in synth.loader(4, seed=1, epoch=0, prefetch=2)}
    again = {b["features"]["t_a"].data_ptr() for b in synth.loader(4, seed=1, epoch=1, prefetch=2)}
    assert again <= first  # every buffer of epoch 1 is one of epoch 0's
    held = next(iter(synth.loader(4, seed=1, epoch=2, prefetch=2)))
    kept = {k: held[k].clone() for k in ("latents", "labels", "index")} | {"t_a": held["features"]["t_a"].clone()}
    later = {b["features"]["t_a"].data_ptr() for b in synth.loader(4, seed=1, epoch=3, prefetch=2)}
    assert held["features"]["t_a"].data_ptr() not in later
    assert all((held[k] == v).all() for k, v in kept.items() if k != "t_a") and (held["features"]["t_a"] == kept["t_a"]).all()


def test_a_fork_empties_the_buffer_pool_in_parent_and_child(synth):
    """Kept buffers shared with a forked child would be copied page by page at the parent's next write: after a
    fork, both start with no kept buffers (a new lock in the child)."""
    import os

    from cache.loader import _POOL, release_buffers

    for _ in synth.loader(4, seed=1, prefetch=2):
        pass
    assert _POOL.buffers
    pid = os.fork()
    if pid == 0:
        os._exit(0 if not _POOL.buffers and not _POOL._lock.locked() else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert not _POOL.buffers
    for _ in synth.loader(4, seed=1, prefetch=2):
        pass
    assert _POOL.buffers
    release_buffers()
    assert not _POOL.buffers
