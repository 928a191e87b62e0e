"""A copy checks what it copies (issue: convert blessed damage with fresh checksums): every source block is
checked against the source's own recorded checksums and for values that cannot be right before it is
written, a missing source object is an error, never zeros; the manifest's channel scales and the per-token
scales are validated wherever they are read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from common.synthetic import synthetic_cache, token_cache
from test_cache_faults import damage_file

import cache
from cache import CacheBatches, CacheError, ShardReadError
from cache import inspect as cache_inspect
from cache.convert import convert
from cache.convert import main as convert_main


def _shard_file(c, name, shard):
    return c.shard_object(name, shard)


@pytest.mark.parametrize("target", ["hdf5", "zarr", "ffcv"])
@pytest.mark.parametrize("kind", ["data", "missing"])
def test_damaged_zarr_source_is_refused_not_copied(tmp_path, target, kind, capsys):
    c = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())
    path = _shard_file(c, "features/t_b" if kind == "missing" else "latents", 1)
    damage_file(path, kind)
    dst = tmp_path / f"copy.{target}"
    with pytest.raises(ShardReadError) as err:
        convert(tmp_path / "c.zarr", dst, format=target, progress=False)
    msg = str(err.value)
    assert path in msg and "rows 16..32" in msg
    assert not dst.exists()
    assert convert_main([str(tmp_path / "c.zarr"), str(tmp_path / "again.h5"), "--format", "hdf5"]) == 2
    out = capsys.readouterr().err
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and path in last and "--repair" in last


def test_damaged_hdf5_source_is_refused(tmp_path):
    synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())
    h5 = convert(tmp_path / "c.zarr", tmp_path / "c.h5", format="hdf5", progress=False, block_rows=16)
    offset = h5._offsets["latents"] + 20 * h5.layout.row_shapes()["latents"][0][0] * 8 * 2 * 2 * 2  # row 20
    data = bytearray(open(h5.url, "rb").read())
    data[offset + 6] ^= 0x01
    open(h5.url, "wb").write(bytes(data))
    with pytest.raises(ShardReadError, match=r"rows 16\.\.32.*checksum"):
        convert(tmp_path / "c.h5", tmp_path / "back.zarr", format="zarr", progress=False)
    assert not (tmp_path / "back.zarr").exists()


def test_nonfinite_scales_are_refused_by_int8_to_fp16(tmp_path):
    token_cache(tmp_path / "q.zarr", n=40, skipped=())
    scales = zarr.open_array(str(tmp_path / "q.zarr" / "feature_scales" / "t_a"), mode="r+")
    block = np.asarray(scales[16:32])
    block[3, 0, 1] = np.nan
    scales.with_config({"write_empty_chunks": True})[16:32] = block  # the recorded checksum now fails as well
    with pytest.raises(CacheError):
        convert(tmp_path / "q.zarr", tmp_path / "f.h5", format="hdf5", feature_dtype="fp16", progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_impossible_values_are_refused_even_with_matching_checksums(tmp_path):
    """Values written by something that also recorded their checksums (a buggy writer): the value check refuses."""
    c = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())
    writer = cache.CacheWriter.open(tmp_path / "c.zarr")
    lo, hi = writer.shard_range(1)
    latents = np.asarray(c.latents[lo:hi]).copy()
    latents[2, 0, 0, 0, 0] = np.inf
    feats = {t: np.asarray(c.features[t][lo:hi]) for t in c.layout.teachers}
    writer.write_shard(1, latents=latents, features=feats, labels=c.labels[lo:hi].copy())
    with pytest.raises(CacheError, match=r"latents holds non-finite values \(first in row 18\)"):
        convert(tmp_path / "c.zarr", tmp_path / "x.h5", format="hdf5", progress=False)


@pytest.mark.parametrize("value", [1e38, 0.5])
def test_channel_scales_outside_what_a_build_writes_are_refused(tmp_path, value, capsys):
    token_cache(tmp_path / "q.zarr", n=40, skipped=(), channel_scales={"t_a": np.ones(5, np.float32)})
    doc_path = tmp_path / "q.zarr" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["urepa_cache"]["teachers"]["t_a"]["channel_scales"][2] = value
    doc_path.write_text(json.dumps(doc))
    c = cache.open_cache(tmp_path / "q.zarr")
    with pytest.raises(CacheError, match="channel scales .* numbers from 1 to 65504"):
        c.loader(8, dequantize=True)
    with pytest.raises(CacheError, match="channel scales"):
        convert(tmp_path / "q.zarr", tmp_path / "f.h5", format="hdf5", feature_dtype="fp16", progress=False)


def test_loader_refuses_nonfinite_scales_on_every_dequantising_path(tmp_path, capsys):
    token_cache(tmp_path / "q.zarr", n=40, skipped=())
    scales = zarr.open_array(str(tmp_path / "q.zarr" / "feature_scales" / "t_a"), mode="r+")
    block = np.asarray(scales[0:16])
    block[5, 0, 0] = np.inf
    scales.with_config({"write_empty_chunks": True})[0:16] = block
    c = cache.open_cache(tmp_path / "q.zarr")
    with pytest.raises(ShardReadError, match="non-finite or negative per-token scales in row 5"):
        list(c.loader(8, shuffle=False, dequantize=True, num_workers=1))
    with pytest.raises(ShardReadError, match="non-finite or negative"):
        cache.CacheDataset(c)[5]
    assert cache_inspect.main([str(tmp_path / "q.zarr"), "--verify"]) == 1
    assert "feature_scales/t_a" in capsys.readouterr().out


def test_cache_batches_refuses_a_batch_that_never_comes(tmp_path):
    c = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())
    with pytest.raises(ValueError, match="exceeds the 40 data rows"):
        CacheBatches(c, 32, rank=0, world_size=2)
    assert len(CacheBatches(c, 32, rank=0, world_size=2, drop_last=False)) == 1
