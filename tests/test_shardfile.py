"""The shard byte format: the direct-I/O decision from serialised metadata (enum and string forms),
the index codec, and the fallback to zarr's own I/O when a direct read or write fails."""

import copy
import enum
import json
import logging

import numpy as np
import pytest
import zarr
from common.formats import direct_reads

import cache
from cache.formats.zarr import shardfile
from cache.formats.zarr.shardfile import (
    EMPTY_CHUNK,
    ShardIndexError,
    decode_index,
    direct_format,
    encode_index,
    metadata_document,
    write_shard_file,
)


def _array(tmp_path, name="a", **kw):
    args = dict(shape=(27, 2, 3, 5), dtype="float16", chunks=(4, 2, 3, 5), shards=(16, 2, 3, 5), compressors=None,
                fill_value=0)
    args.update(kw)
    return zarr.open_group(tmp_path / "g.zarr", mode="a").create_array(name, **args)


class Endian(enum.Enum):  # the form zarr 3.1 keeps codec attributes in
    little = "little"
    big = "big"


class IndexLocation(enum.Enum):
    start = "start"
    end = "end"


def _with_enums(doc):
    """The same metadata with enum values where zarr 3.1 had them (3.4 keeps plain strings)."""
    d = copy.deepcopy(doc)
    conf = d["codecs"][0]["configuration"]
    conf["codecs"][0]["configuration"]["endian"] = Endian(conf["codecs"][0]["configuration"]["endian"])
    conf["index_codecs"][0]["configuration"]["endian"] = Endian(conf["index_codecs"][0]["configuration"]["endian"])
    conf["index_location"] = IndexLocation(conf["index_location"])
    d["shape"] = tuple(d["shape"])
    return d


def test_decision_reads_the_serialised_form_in_every_spelling(tmp_path):
    arr = _array(tmp_path)
    on_disk = json.loads((tmp_path / "g.zarr" / "a" / "zarr.json").read_text())
    forms = {"array": arr, "metadata": arr.metadata, "to_dict": arr.metadata.to_dict(), "zarr.json": on_disk,
             "enums": _with_enums(on_disk), "strings": json.loads(json.dumps(on_disk))}
    for name, form in forms.items():
        fmt, reason = direct_format(form)
        assert fmt is not None, (name, reason)
        assert (fmt.shard_rows, fmt.chunk_rows, fmt.row_nbytes, fmt.ndim) == (16, 4, 2 * 3 * 5 * 2, 4), name
        assert fmt.shard_key(1) == "c/1/0/0/0" == arr.metadata.encode_chunk_key((1, 0, 0, 0))
    assert metadata_document(_with_enums(on_disk)) == on_disk


@pytest.mark.parametrize("change,why", [
    (lambda d: d["codecs"][0]["configuration"]["codecs"][0]["configuration"].update(endian="big"), "big-endian"),
    (lambda d: d["codecs"][0]["configuration"]["codecs"][0]["configuration"].update(endian=Endian.big), "big-endian"),
    (lambda d: d["codecs"][0]["configuration"].update(index_location="start"), "index location"),
    (lambda d: d["codecs"][0]["configuration"].update(index_location=IndexLocation.start), "index location"),
    (lambda d: d["codecs"][0]["configuration"]["codecs"].append({"name": "zstd", "configuration": {"level": 3}}),
     "raw bytes alone"),
    (lambda d: d["codecs"][0]["configuration"]["index_codecs"].pop(), "index codecs"),
    (lambda d: d["codecs"][0]["configuration"].update(chunk_shape=[4, 1, 3, 5]), "whole rows"),
    (lambda d: d["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [0, 1, 2, 3]}}),
     "single sharding_indexed"),
    (lambda d: d.update(chunk_key_encoding={"name": "custom"}), "chunk key encoding"),
    (lambda d: d.update(storage_transformers=[{"name": "x"}]), "storage transformers"),
    (lambda d: d.update(zarr_format=2), "zarr_format"),
    (lambda d: d.update(data_type="string"), "data type"),
    (lambda d: d.pop("codecs"), "not understood"),
])
def test_decision_refuses_what_it_cannot_confirm(tmp_path, change, why):
    doc = metadata_document(_array(tmp_path))
    change(doc)
    fmt, reason = direct_format(doc)
    assert fmt is None and why in reason


def test_compressed_arrays_take_zarrs_path(tmp_path):
    fmt, reason = direct_format(_array(tmp_path, compressors=zarr.codecs.ZstdCodec(level=1)))
    assert fmt is None and "zstd" in reason


def test_index_round_trip_and_damage(tmp_path):
    fmt, _ = direct_format(_array(tmp_path))
    data = np.random.default_rng(0).standard_normal((11, 2, 3, 5)).astype(np.float16)
    path = tmp_path / "shard"
    write_shard_file(str(path), data, fmt)
    raw = path.read_bytes()
    index = decode_index(fmt, raw[-fmt.index_nbytes:], file_size=len(raw))
    assert index[:3, 1].tolist() == [fmt.chunk_nbytes] * 3 and (index[3:] == EMPTY_CHUNK).all()
    assert encode_index(fmt, 11) == raw[-fmt.index_nbytes:]
    chunk1 = np.frombuffer(raw[int(index[1, 0]):int(index[1, 0]) + fmt.chunk_nbytes], np.float16)
    np.testing.assert_array_equal(chunk1.reshape(4, 2, 3, 5), data[4:8])
    flipped = bytearray(raw)
    flipped[-fmt.index_nbytes + 3] ^= 0x10
    with pytest.raises(ShardIndexError, match="crc32c"):
        decode_index(fmt, bytes(flipped[-fmt.index_nbytes:]), file_size=len(raw))
    with pytest.raises(ShardIndexError, match="outside"):  # a truncated file with an intact index
        decode_index(fmt, raw[-fmt.index_nbytes:], file_size=len(raw) - fmt.chunk_nbytes)
    with pytest.raises(ShardIndexError, match="too short"):
        decode_index(fmt, raw[:10], file_size=10)


def test_forcing_zarrs_path(monkeypatch, tmp_path):
    arr = _array(tmp_path)
    monkeypatch.setenv(shardfile.ENV_IO, "zarr")
    assert shardfile.choose_io(str(tmp_path), arr) == (None, "forced by UREPA_ZARR_IO=zarr")
    monkeypatch.setenv(shardfile.ENV_IO, "fast")
    with pytest.raises(ValueError, match="UREPA_ZARR_IO"):
        shardfile.choose_io(str(tmp_path), arr)
    monkeypatch.delenv(shardfile.ENV_IO)
    assert shardfile.choose_io(str(tmp_path), arr)[0] is not None
    assert shardfile.choose_io(None, arr) == (None, "the store is neither a local folder nor an object store")
    assert shardfile.choose_io(None, arr, ranged=True)[0] is not None


def test_failed_direct_write_and_read_fall_back_to_zarr(tmp_path, monkeypatch, caplog):
    """A direct write or read that raises (as a library version difference would) is logged once and
    the array goes through zarr from then on: the cache and the batches are the same."""
    from common.synthetic import synthetic_cache

    monkeypatch.delenv(shardfile.ENV_IO, raising=False)
    ref = synthetic_cache(tmp_path / "ref.zarr")

    def broken(*args, **kwargs):
        raise AttributeError("'str' object has no attribute 'value'")

    caplog.set_level(logging.INFO)
    monkeypatch.setattr("cache.formats.zarr.writer.write_shard_file", broken)
    fell = synthetic_cache(tmp_path / "fell.zarr")
    monkeypatch.undo()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("latents writes through zarr from now on" in m for m in warnings) == 1
    for name in ["latents", "features/t_a", "features/t_b"]:
        for s in range(cache.ZarrStorage.of(ref.layout).num_shards(ref.layout)):
            key = shardfile.shard_key(ref.group[name], s)
            assert (tmp_path / "ref.zarr" / name / key).read_bytes() == (tmp_path / "fell.zarr" / name / key).read_bytes()

    loader = fell.loader(8, seed=1, flip=True)
    assert direct_reads(loader)
    monkeypatch.setattr("cache.formats.zarr.rows.os.preadv", broken)
    caplog.clear()
    got = list(loader)
    monkeypatch.undo()
    assert not direct_reads(loader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("reads through zarr from now on" in m for m in warnings)
    for a, b in zip(ref.loader(8, seed=1, flip=True), got):
        assert (a["index"] == b["index"]).all() and (a["latents"] == b["latents"]).all()
        assert (a["features"]["t_a"] == b["features"]["t_a"]).all()


def test_damage_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    from common.synthetic import synthetic_cache

    monkeypatch.delenv(shardfile.ENV_IO, raising=False)
    c = synthetic_cache(tmp_path / "c.zarr")
    key = shardfile.shard_key(c.latents, 2)
    path = tmp_path / "c.zarr" / "latents" / key
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # inside the index
    path.write_bytes(bytes(raw))
    with pytest.raises(cache.ShardReadError, match=r"crc32c.*cache.inspect"):
        list(c.loader(97, shuffle=False, drop_last=False))
    path.unlink()
    with pytest.raises(cache.ShardReadError, match="is missing"):
        list(cache.open_cache(tmp_path / "c.zarr").loader(97, shuffle=False, drop_last=False))
