"""Loader: order, ranks, resume, flips, byte-range reads, errors."""

import numpy as np
import pytest
from common.synthetic import expected_latent, synthetic_cache

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


def test_loader_batches_are_matched_rows(synth):
    seen = []
    for b in synth.loader(8, seed=1, epoch=2, flip=True, num_workers=3):
        idx, flip = b["index"].numpy(), b["flip"].numpy().astype(int)
        assert b["latents"].shape == (8, 8, 2, 2) and b["features"]["t_a"].shape == (8, 6, 5)
        np.testing.assert_array_equal(b["latents"][:, 0, 0, 0].numpy(), [expected_latent(r, v) for r, v in zip(idx, flip)])
        np.testing.assert_array_equal(b["features"]["t_b"][:, 0, 0].numpy(),
                                      [np.float16(expected_latent(r, v) + np.float16(1)) for r, v in zip(idx, flip)])
        np.testing.assert_array_equal(b["labels"].numpy(), idx % 3)
        seen += idx.tolist()
    assert len(seen) == 96 and len(set(seen)) == 96 and not {3, 50, 51} & set(seen)


def test_loader_is_deterministic_and_epoch_dependent(synth):
    def run(**kw):
        return [b["index"].tolist() for b in synth.loader(10, **kw)]
    assert run(seed=0, epoch=0) == run(seed=0, epoch=0, num_workers=1)
    assert run(seed=0, epoch=0) != run(seed=0, epoch=1)
    assert run(seed=0, epoch=0) != run(seed=1, epoch=0)


def test_start_resumes_exactly(synth):
    full = [b for b in synth.loader(6, seed=3, epoch=1, flip=True)]
    for consumed_batches in (0, 1, 7):
        rest = list(synth.loader(6, seed=3, epoch=1, flip=True, start=6 * consumed_batches))
        assert len(rest) == len(full) - consumed_batches
        for a, b in zip(full[consumed_batches:], rest):
            for key in ("index", "flip", "labels", "latents"):
                assert (a[key] == b[key]).all()


def test_ranks_split_each_global_batch(synth):
    one = list(synth.loader(12, seed=4, world_size=1))
    ranks = [list(synth.loader(4, seed=4, world_size=3, rank=r)) for r in range(3)]
    assert all(len(r) == len(one) for r in ranks)
    for k, b in enumerate(one):
        joined = np.concatenate([ranks[r][k]["index"].numpy() for r in range(3)])
        np.testing.assert_array_equal(joined, b["index"].numpy())
        joined_lat = np.concatenate([ranks[r][k]["latents"].numpy() for r in range(3)])
        np.testing.assert_array_equal(joined_lat, b["latents"].numpy())


def test_flip_selection(synth):
    b = next(iter(synth.loader(32, seed=0, flip=True)))
    flips = b["flip"].numpy()
    assert flips.any() and not flips.all()
    np.testing.assert_array_equal(flips, epoch_flips(97, seed=0, epoch=0)[:32].astype(bool))
    b0 = next(iter(synth.loader(32, seed=0, flip=False)))
    assert not b0["flip"].any()
    np.testing.assert_array_equal(b0["latents"][:, 0, 0, 0].numpy(), [expected_latent(r, 0) for r in b0["index"].numpy()])


def test_flip_needs_two_variants(tmp_path):
    c = synthetic_cache(tmp_path / "one.zarr", n=20, variants=1, skipped=())
    with pytest.raises(ValueError, match="--flip both"):
        c.loader(4, flip=True)


def test_zarr_fallback_reads_equal_direct_reads(tmp_path, synth, io_mode):
    z = synthetic_cache(tmp_path / "zstd.zarr", compressor="zstd")
    direct, fallback = synth.loader(8, seed=9, flip=True), z.loader(8, seed=9, flip=True)
    assert direct.direct_reads == (io_mode == "direct") and not fallback.direct_reads
    for a, b in zip(direct, fallback):
        assert (a["latents"] == b["latents"]).all() and (a["features"]["t_a"] == b["features"]["t_a"]).all()


def test_teacher_subset_and_errors(synth):
    b = next(iter(synth.loader(4, teachers=["t_b"])))
    assert list(b["features"]) == ["t_b"]
    with pytest.raises(ValueError, match="unknown teachers"):
        synth.loader(4, teachers=["nope"])
    with pytest.raises(ValueError, match="outside the epoch"):
        synth.loader(4, start=1000)
