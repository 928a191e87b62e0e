"""Store and loader: order, ranks, resume, flips, byte-range reads, errors."""

import numpy as np
import pytest

import cache
from cache import CacheError, CacheMismatchError, CacheWriter, Layout, epoch_flips, epoch_order, rank_batches

TEACHERS = {"t_a": (6, 5), "t_b": (4, 3)}

pytestmark = pytest.mark.usefixtures("io_mode")  # every test with direct shard I/O and with zarr's forced


def synthetic_cache(path, *, n=100, variants=2, skipped=(3, 50, 51), compressor="none", shard_rows=16, chunk_rows=4):
    """A cache whose every value encodes (row, variant), written shard by shard like a build."""
    layout = Layout(num_rows=n, resolution=16, variants=variants, teachers=TEACHERS, shard_rows=shard_rows,
                    chunk_rows=chunk_rows, compressor=compressor)
    sources = [{"path": f"c{i % 3}/img{i:04d}.jpg", "size": 10 + i, "label": i % 3} for i in range(n)]
    manifest = {"classes": ["c0", "c1", "c2"], "source": {"fingerprint": "x"}, "vae": {}, "teachers": {}}
    writer, resumed = CacheWriter.create_or_resume(path, layout=layout, manifest=manifest, sources=sources)
    assert not resumed
    for s in range(layout.num_shards):
        lo, hi = layout.shard_rows_range(s)
        rows = np.arange(lo, hi)
        lat = np.zeros((hi - lo, variants, 8, 2, 2), np.float16)
        lat += (rows[:, None, None, None, None] + 1000 * np.arange(variants)[None, :, None, None, None]).astype(np.float16) / 8
        feats = {k: np.zeros((hi - lo, variants, t, d), np.float16) + lat[:, :, :1, :1, 0] + j
                 for j, (k, (t, d)) in enumerate(TEACHERS.items())}
        labels = np.array([sources[r]["label"] for r in rows], np.int32)
        skip = [{"row": int(r), "path": sources[r]["path"], "reason": "test"} for r in rows if r in skipped]
        for r in rows:
            if r in skipped:
                labels[r - lo] = -1
                lat[r - lo] = 0
                for f in feats.values():
                    f[r - lo] = 0
        writer.write_shard(s, latents=lat, features=feats, labels=labels, skipped=skip)
    writer.finalize({"seconds": 0})
    return cache.open_cache(path)


def expected_latent(row, variant):
    return np.float16((row + 1000 * variant) / 8)


@pytest.fixture(scope="module")
def synth(tmp_path_factory, io_mode):
    return synthetic_cache(tmp_path_factory.mktemp("s") / "c.zarr")


def test_open_cache_api(synth):
    assert len(synth) == 97 and synth.num_variants == 2
    assert synth.latents.shape == (100, 2, 8, 2, 2)
    assert set(synth.features) == {"t_a", "t_b"} and synth.features["t_a"].shape == (100, 2, 6, 5)
    assert synth.labels[3] == -1 and synth.labels[4] == 1
    assert 3 not in synth.rows and 50 not in synth.rows
    assert synth.source_path(7) == "c1/img0007.jpg"
    assert [s["row"] for s in synth.manifest.to_dict()["skipped"]] == [3, 50, 51]


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


def test_writer_refuses_mismatch_and_foreign_folders(tmp_path, synth):
    layout = Layout(num_rows=100, resolution=16, variants=2, teachers=TEACHERS, shard_rows=16, chunk_rows=4)
    manifest = synth.manifest.to_dict()
    writer, resumed = CacheWriter.create_or_resume(synth.url, layout=layout, manifest=manifest, sources=[])
    assert resumed
    changed = dict(manifest, source={"fingerprint": "y"})
    with pytest.raises(CacheMismatchError, match="source.fingerprint"):
        CacheWriter.create_or_resume(synth.url, layout=layout, manifest=changed, sources=[])
    other = tmp_path / "notacache"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(CacheError, match="refusing"):
        CacheWriter.create_or_resume(other, layout=layout, manifest=manifest, sources=[], overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_incomplete_cache_is_refused(tmp_path):
    layout = Layout(num_rows=10, resolution=16, variants=1, teachers=TEACHERS, shard_rows=4, chunk_rows=2)
    CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=layout, manifest={"classes": []}, sources=[])
    with pytest.raises(CacheError, match="incomplete"):
        cache.open_cache(tmp_path / "c.zarr")
    with pytest.raises(CacheError, match="no cache"):
        cache.open_cache(tmp_path / "missing.zarr")


def test_layout_validation():
    with pytest.raises(CacheError):
        Layout(num_rows=10, resolution=16, variants=3, teachers={})
    with pytest.raises(CacheError):
        Layout(num_rows=10, resolution=16, variants=1, teachers={}, shard_rows=10, chunk_rows=4)
    with pytest.raises(CacheError):
        Layout(num_rows=10, resolution=16, variants=1, teachers={"a/b": (1, 1)})


def test_interrupted_creation_is_finished(tmp_path, monkeypatch):
    """A creation killed before the manifest was written leaves its identity marker and a bare group; the
    rerun recognises it by the marker and recreates it."""
    import zarr

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed")

    layout = Layout(num_rows=10, resolution=16, variants=1, teachers=TEACHERS, shard_rows=4, chunk_rows=2)
    with monkeypatch.context() as m:
        m.setattr(zarr.Group, "create_group", killed)
        with pytest.raises(KeyboardInterrupt):
            CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=layout, manifest={"classes": []}, sources=[])
    assert (tmp_path / "c.zarr" / "build" / "urepa-cache.json").exists()
    assert "urepa_cache" not in zarr.open_group(tmp_path / "c.zarr", mode="r").attrs
    writer, resumed = CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=layout, manifest={"classes": []}, sources=[])
    assert not resumed and writer.group["latents"].shape == (10, 1, 8, 2, 2)
    assert set(writer.group["features"].array_keys()) == set(TEACHERS)


@pytest.mark.parametrize("rows", [32, 27, 5])
def test_direct_shard_file_is_what_zarr_writes(tmp_path, rows):
    """The build's direct shard writer produces zarr's own bytes (full, partial and tiny last shard)."""
    import zarr

    from cache.shardfile import direct_format, write_shard_file

    data = np.random.default_rng(rows).standard_normal((rows, 1, 3, 5)).astype(np.float16)
    data[:4] = 0  # an all-zero chunk is still written (write_empty_chunks=True)
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    kw = dict(shape=(rows, 1, 3, 5), dtype="float16", chunks=(4, 1, 3, 5), shards=(16, 1, 3, 5), compressors=None,
              fill_value=0, config={"write_empty_chunks": True})
    ref, mine = g.create_array("ref", **kw), g.create_array("mine", **kw)
    fmt, reason = direct_format(mine)
    assert fmt is not None, reason
    ref[:] = data
    for shard in range(-(-rows // 16)):
        key = fmt.shard_key(shard)
        write_shard_file(str(tmp_path / "g.zarr" / "mine" / key), data[shard * 16:(shard + 1) * 16], fmt)
        assert (tmp_path / "g.zarr" / "mine" / key).read_bytes() == (tmp_path / "g.zarr" / "ref" / key).read_bytes()
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "g.zarr" / "mine")[:], data)


def test_any_store_url_works(synth, io_mode):
    """An fsspec URL (here in memory) goes through zarr's store API end to end: create, write
    shards, progress records, finalize, open, and loader reads through zarr."""
    url = f"memory://bucket/urepa-test-{io_mode}.zarr"
    remote = synthetic_cache(url)
    local = synth.loader(8, seed=2, flip=True)
    far = remote.loader(8, seed=2, flip=True)
    assert not far.direct_reads
    for a, b in zip(local, far):
        assert (a["index"] == b["index"]).all() and (a["latents"] == b["latents"]).all()
        assert (a["features"]["t_b"] == b["features"]["t_b"]).all()
    assert remote.source_path(7) == synth.source_path(7) and len(remote.progress_records()) == 7
    layout = Layout(num_rows=10, resolution=16, variants=1, teachers=TEACHERS, shard_rows=4, chunk_rows=2)
    writer, resumed = CacheWriter.create_or_resume(url, layout=layout,
                                                   manifest={"classes": []}, sources=[], overwrite=True)
    assert not resumed and writer.completed_shards() == set()
