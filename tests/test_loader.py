"""The zarr loader: order functions, byte-range reads against zarr's own.

The reader contract every format keeps (matched rows, determinism, resume, ranks, flips, teacher subsets)
is tested in tests/test_formats.py, on the synthetic cache of tests/common/synthetic.py converted to each
format; the writer, Layout and refusals in tests/test_store.py."""

import numpy as np
import pytest
from common.formats import direct_reads
from common.synthetic import synthetic_cache

from cache import epoch_flips, epoch_order, rank_batches

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


def test_zarr_fallback_reads_equal_direct_reads(tmp_path, synth, io_mode):
    z = synthetic_cache(tmp_path / "zstd.zarr", compressor="zstd")
    direct, fallback = synth.loader(8, seed=9, flip=True), z.loader(8, seed=9, flip=True)
    assert direct_reads(direct) == (io_mode == "direct") and not direct_reads(fallback)
    for a, b in zip(direct, fallback):
        assert (a["latents"] == b["latents"]).all() and (a["features"]["t_a"] == b["features"]["t_a"]).all()
