"""Store: the writer, Layout, refusals, create_or_resume, any store URL, direct shard files (the open_cache API of every format: tests/test_formats.py)."""

import numpy as np
import pytest
from common.formats import direct_reads
from common.synthetic import TEACHERS, synthetic_cache

import cache
from cache import CacheError, CacheMismatchError, CacheWriter, zarr_layout
from tools.bench.cachefiles import progress_records

pytestmark = pytest.mark.usefixtures("io_mode")  # every test with direct shard I/O and with zarr's forced


@pytest.fixture(scope="module")
def synth(tmp_path_factory, io_mode):
    return synthetic_cache(tmp_path_factory.mktemp("s") / "c.zarr")


def test_writer_refuses_mismatch_and_foreign_folders(tmp_path, synth):
    layout = zarr_layout(num_rows=100, resolution=16, variants=2, teachers=TEACHERS, shard_rows=16, chunk_rows=4)
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
    layout = zarr_layout(num_rows=10, resolution=16, variants=1, teachers=TEACHERS, shard_rows=4, chunk_rows=2)
    CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=layout, manifest={"classes": []}, sources=[])
    with pytest.raises(CacheError, match="incomplete"):
        cache.open_cache(tmp_path / "c.zarr")
    with pytest.raises(CacheError, match="no cache"):
        cache.open_cache(tmp_path / "missing.zarr")


def test_layout_validation():
    with pytest.raises(CacheError):
        zarr_layout(num_rows=10, resolution=16, variants=3, teachers={})
    with pytest.raises(CacheError):
        zarr_layout(num_rows=10, resolution=16, variants=1, teachers={}, shard_rows=10, chunk_rows=4)
    with pytest.raises(CacheError):
        zarr_layout(num_rows=10, resolution=16, variants=1, teachers={"a/b": (1, 1)})


@pytest.mark.parametrize("rows, variants", [(38, 2), (48, 1)])
def test_layout_nbytes_is_what_a_written_cache_stores(tmp_path, rows, variants):
    """Layout.nbytes (the storage tables of README and tools/bench/int8.py) against the files a written cache
    holds: a partial last shard and chunk (38 rows), an int8 teacher with its scales and a float16 one."""
    import os

    layout = zarr_layout(num_rows=rows, resolution=16, variants=variants, teachers=TEACHERS, shard_rows=16,
                    chunk_rows=4, feature_dtypes={"t_a": "int8"})
    writer, _ = CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=layout, sources=[], manifest={
        "classes": ["c0"], "source": {"fingerprint": "x"}, "vae": {}, "teachers": {}})
    rng = np.random.default_rng(0)
    for s in range(cache.ZarrStorage.of(layout).num_shards(layout)):
        lo, hi = cache.ZarrStorage.of(layout).shard_range(layout, s)
        n = hi - lo
        writer.write_shard(s, latents=np.ones((n, variants, 8, 2, 2), np.float16), labels=np.zeros(n, np.int32),
                           features={k: rng.standard_normal((n, variants, t, d)).astype(np.float32)
                                     for k, (t, d) in TEACHERS.items()})
    writer.finalize({})
    on_disk = {}
    for name in layout.array_names():
        folder = tmp_path / "c.zarr" / name
        on_disk[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs
                            if f != "zarr.json")
    assert cache.ZarrStorage.of(layout).nbytes(layout) == on_disk
    assert set(layout.row_shapes()) == set(layout.array_names())
    with pytest.raises(CacheError, match="compressed"):
        zl = zarr_layout(num_rows=4, resolution=16, variants=1, teachers=TEACHERS, compressor="zstd")
        cache.ZarrStorage.of(zl).nbytes(zl)


def test_interrupted_creation_is_finished(tmp_path, monkeypatch):
    """A creation killed before the manifest was written leaves its identity marker and a bare group; the
    rerun recognises it by the marker and recreates it."""
    import zarr

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed")

    layout = zarr_layout(num_rows=10, resolution=16, variants=1, teachers=TEACHERS, shard_rows=4, chunk_rows=2)
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

    from cache.formats.zarr.shardfile import direct_format, write_shard_file

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
    assert not direct_reads(far)
    for a, b in zip(local, far):
        assert (a["index"] == b["index"]).all() and (a["latents"] == b["latents"]).all()
        assert (a["features"]["t_b"] == b["features"]["t_b"]).all()
    assert remote.source_path(7) == synth.source_path(7) and len(progress_records(remote)) == 7
    layout = zarr_layout(num_rows=10, resolution=16, variants=1, teachers=TEACHERS, shard_rows=4, chunk_rows=2)
    writer, resumed = CacheWriter.create_or_resume(url, layout=layout,
                                                   manifest={"classes": []}, sources=[], overwrite=True)
    assert not resumed and writer.completed_shards() == set()
