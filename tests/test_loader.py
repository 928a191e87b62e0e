"""The zarr store and its loader: order functions, byte-range reads against zarr's own, writer, stores.

The reader contract every format keeps (matched rows, determinism, resume, ranks, flips) is tested in
tests/test_formats.py, on this module's synthetic cache converted to each format."""

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
    assert direct.direct_reads == (io_mode == "direct") and not fallback.direct_reads
    for a, b in zip(direct, fallback):
        assert (a["latents"] == b["latents"]).all() and (a["features"]["t_a"] == b["features"]["t_a"]).all()


def test_writer_refuses_mismatch_and_foreign_folders(tmp_path, synth):
    layout = Layout(num_rows=100, resolution=16, variants=2, teachers=TEACHERS, shard_rows=16, chunk_rows=4)
    manifest = dict(synth.manifest)
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
