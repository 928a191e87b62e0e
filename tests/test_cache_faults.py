"""Fault injection: damaged shards, damaged manifests, a cache rebuilt while read, foreign stores at OUT.

Every fault must end in an error sentence that names the file and says what to do, or be repaired;
never in rows of zeros, rows of another cache, or a traceback from the command-line tools.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr
from common.synthetic import TEACHERS, synthetic_cache
from conftest import ROOT, _env, run_build

import cache
from cache import CacheChangedError, CacheError, CacheMismatchError, CacheWriter, ShardReadError, zarr_layout
from cache import inspect as cache_inspect
from cache.cli.advice import explain

DAMAGES = ["missing", "truncated", "index", "data"]


def damage_file(path, kind, at=None):
    """Damage one shard object the way a disk, a copy or a person does (``at``: the byte a data flip hits)."""
    data = bytearray(open(path, "rb").read())
    if kind == "missing":
        os.remove(path)
        return
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "index":
        data[-10] ^= 0xFF  # inside the index, before its crc32c
    elif kind == "data":
        data[(len(data) // 3) & ~1 if at is None else at] ^= 0x01  # a low bit of one value: still finite
    with open(path, "wb") as f:
        f.write(data)


def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _layout(n=40, variants=1):
    return zarr_layout(num_rows=n, resolution=16, variants=variants, teachers=TEACHERS, shard_rows=16, chunk_rows=4)


# ---------------------------------------------------------------------------------------------
# Damaged shards


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_shard_is_an_error_or_found_by_verify(tmp_path, io_mode, kind, capsys):
    c = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())
    path = c.shard_object("latents", 1)
    damage_file(path, kind)
    c = cache.open_cache(tmp_path / "c.zarr")
    loader = c.loader(8, shuffle=False, num_workers=2)
    if kind == "data":  # the shard format cannot see it; the recorded checksum can (below)
        assert len(list(loader)) == 5
    else:
        with pytest.raises(ShardReadError) as err:
            list(loader)
        msg = str(err.value)
        assert "damaged" in msg and "cache.inspect" in msg and "--verify" in msg
        assert path in msg
    found = c.verify_stored()
    assert [(d.shard, d.array, d.where) for d in found] == [(1, "latents", path)]
    assert {"missing": "missing", "truncated": "checksum", "index": "checksum", "data": "checksum"}[kind] in found[0].problem
    assert cache_inspect.main([str(tmp_path / "c.zarr"), "--verify"]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 1 and "latents shard 1" in problems[0] and path in problems[0] and "--repair" in problems[0]


def test_damaged_index_without_checksum_record_is_found(tmp_path, capsys):
    """A cache built before checksums were recorded: the index crc32c still finds a damaged index."""
    c = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())
    record_path = tmp_path / "c.zarr" / "build" / "progress" / "shard-000002.json"
    record = json.loads(record_path.read_text())
    del record["checksums"]
    record_path.write_text(json.dumps(record))
    damage_file(c.shard_object("features/t_a", 2), "index")
    found = c.verify_stored()
    assert [(d.shard, d.array) for d in found] == [(2, "features/t_a")] and "crc32c" in found[0].problem
    assert cache_inspect.main([str(tmp_path / "c.zarr"), "--verify"]) == 1
    assert "PROBLEM: features/t_a shard 2" in capsys.readouterr().out


def test_forget_damaged_then_rewrite_restores_the_cache(tmp_path):
    """The repair mechanism in-process: damaged shards lose their record and objects, the cache turns
    incomplete, and writing those shards again gives back the original bytes."""
    c = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())
    original = snapshot(tmp_path / "c.zarr" / "latents") | snapshot(tmp_path / "c.zarr" / "features")
    damage_file(c.shard_object("latents", 0), "data")
    damage_file(c.shard_object("features/t_b", 2), "missing")
    writer = CacheWriter.open(tmp_path / "c.zarr")
    damage = writer.forget_damaged()
    assert sorted((d.shard, d.array) for d in damage) == [(0, "latents"), (2, "features/t_b")]
    assert writer.completed_shards() == {1} and not writer.manifest.to_dict()["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        cache.open_cache(tmp_path / "c.zarr")
    shutil.rmtree(tmp_path / "c.zarr")
    synthetic_cache(tmp_path / "c.zarr", n=40, skipped=())  # the same content, written again
    again = snapshot(tmp_path / "c.zarr" / "latents") | snapshot(tmp_path / "c.zarr" / "features")
    assert again == original


# ---------------------------------------------------------------------------------------------
# Damaged manifest


def test_garbage_zarr_json_is_a_sentence(tmp_path, capsys):
    synthetic_cache(tmp_path / "c.zarr", n=20, skipped=())
    (tmp_path / "c.zarr" / "zarr.json").write_text("{ not json")
    with pytest.raises(CacheError) as err:
        cache.open_cache(tmp_path / "c.zarr")
    msg = explain(err.value)  # the facts from the library, the advice from the entry point
    assert "not a readable cache" in msg and str(tmp_path / "c.zarr" / "zarr.json") in msg
    assert "--overwrite" in msg and "restore" in msg
    assert cache_inspect.main([str(tmp_path / "c.zarr"), "--verify"]) == 2
    assert "not a readable cache" in capsys.readouterr().err
    # our own damaged cache: a build refuses without --overwrite and rebuilds with it
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=_layout(20), manifest={"classes": []}, sources=[])
    assert re.search("damaged cache.*--overwrite", explain(err.value))
    writer, resumed = CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=_layout(20), manifest={"classes": []},
                                                   sources=[], overwrite=True)
    assert not resumed and writer.completed_shards() == set()


def test_manifest_missing_a_key_is_a_sentence(tmp_path):
    synthetic_cache(tmp_path / "c.zarr", n=20, skipped=())
    doc = json.loads((tmp_path / "c.zarr" / "zarr.json").read_text())
    del doc["attributes"]["urepa_cache"]["layout"]
    (tmp_path / "c.zarr" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError) as err:
        cache.open_cache(tmp_path / "c.zarr")
    msg = explain(err.value)
    assert "not a readable cache" in msg and "lacks 'layout'" in msg
    assert str(tmp_path / "c.zarr" / "zarr.json") in msg and "--overwrite" in msg


def test_refusal_shows_each_difference_in_full(tmp_path):
    classes = ["apple", "banana", "cherry", "damson"]
    long_root = "/data/" + "x" * 200
    CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=_layout(20),
                                 manifest={"classes": classes, "preprocessing": {"crop": long_root}}, sources=[])
    changed = {"classes": classes[:3] + ["cache.zarr"] + classes[3:], "preprocessing": {"crop": long_root + "y"}}
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=_layout(20), manifest=changed, sources=[])
    msg = str(err.value)
    assert 'classes: 4 items in the cache, 5 in this run: added "cache.zarr" at position 3' in msg
    assert json.dumps(long_root + "y") in msg and json.dumps(long_root) in msg


# ---------------------------------------------------------------------------------------------
# A cache rebuilt or removed while a loader reads it


def _rebuild(path):
    """Another build with --overwrite: other content, written shard by shard."""
    layout = _layout(40)
    writer, _ = CacheWriter.create_or_resume(path, layout=layout, manifest={"classes": ["other"], "source": {}},
                                             sources=[], overwrite=True)
    for s in range(cache.ZarrStorage.of(layout).num_shards(layout)):
        lo, hi = cache.ZarrStorage.of(layout).shard_range(layout, s)
        writer.write_shard(s, latents=np.full((hi - lo, 1, 8, 2, 2), 7, np.float16),
                           features={k: np.full((hi - lo, 1, t, d), 7, np.float16) for k, (t, d) in TEACHERS.items()},
                           labels=np.zeros(hi - lo, np.int32))
    writer.finalize({})


@pytest.mark.parametrize("how", ["rebuilt", "removed"])
def test_rebuild_while_reading_stops_the_loader(tmp_path, io_mode, how):
    c = synthetic_cache(tmp_path / "c.zarr", n=40, variants=1, skipped=())
    batches = iter(c.loader(4, seed=0, num_workers=2, prefetch=2))
    first = next(batches)
    assert first["latents"].shape[0] == 4
    if how == "rebuilt":
        _rebuild(tmp_path / "c.zarr")
    else:
        shutil.rmtree(tmp_path / "c.zarr")
    with pytest.raises(CacheChangedError) as err:
        next(batches)
    assert str(tmp_path / "c.zarr") in str(err.value) and "restart" in str(err.value)


def test_generation_is_kept_on_resume_and_renewed_on_overwrite(tmp_path):
    c = synthetic_cache(tmp_path / "c.zarr", n=20, variants=1, skipped=())
    writer, resumed = CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=c.layout, manifest=c.manifest, sources=[])
    assert resumed and writer.manifest.to_dict()["generation"] == c.generation
    c.check_unchanged()
    _rebuild(tmp_path / "c.zarr")
    assert cache.open_cache(tmp_path / "c.zarr").generation != c.generation
    with pytest.raises(CacheChangedError):
        c.check_unchanged()


# ---------------------------------------------------------------------------------------------
# Foreign stores at OUT


def _foreign_group(path):
    g = zarr.open_group(path, mode="w")
    g.attrs["owner"] = "someone else"
    g.create_array("latents", shape=(10, 3), dtype="float32", chunks=(5, 3))[:] = np.arange(30).reshape(10, 3)
    g.create_array("labels", shape=(10,), dtype="int32", chunks=(5,))[:] = np.arange(10)
    return snapshot(path)


def test_foreign_group_named_like_a_cache_survives(tmp_path):
    before = _foreign_group(tmp_path / "g.zarr")
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.create_or_resume(tmp_path / "g.zarr", layout=_layout(20), manifest={"classes": []}, sources=[])
    assert re.search("not a feature cache this program created.*--overwrite", explain(err.value))
    assert snapshot(tmp_path / "g.zarr") == before
    # a folder that is not even a zarr group is refused with --overwrite too
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("garbage")
    (tmp_path / "junk" / "notes.txt").write_text("keep")
    junk = snapshot(tmp_path / "junk")
    with pytest.raises(CacheError, match="refusing to write into it, even when told to replace it"):
        CacheWriter.create_or_resume(tmp_path / "junk", layout=_layout(20), manifest={"classes": []}, sources=[],
                                     overwrite=True)
    assert snapshot(tmp_path / "junk") == junk
    # with --overwrite a zarr group is replaced (the user said so)
    writer, resumed = CacheWriter.create_or_resume(tmp_path / "g.zarr", layout=_layout(20), manifest={"classes": []},
                                                   sources=[], overwrite=True)
    assert not resumed and "owner" not in writer.group.attrs


@pytest.mark.slow
def test_build_leaves_a_foreign_group_byte_for_byte(tmp_path, image_folder):
    before = _foreign_group(tmp_path / "g.zarr")
    proc = run_build(image_folder, tmp_path / "g.zarr", check=False)
    assert proc.returncode == 2 and "not a feature cache this program created" in proc.stderr
    assert snapshot(tmp_path / "g.zarr") == before


@pytest.mark.slow
def test_flipped_bytes_found_by_verify_and_repaired(tmp_path, image_folder, built_cache):
    """Damage three objects of two shards of a built cache; inspect --verify names each, build --repair
    re-encodes exactly those shards, and the arrays are byte-identical to the undamaged build again."""
    out = tmp_path / "c.zarr"
    shutil.copytree(built_cache, out)
    c = cache.open_cache(out)
    original = snapshot(out / "latents") | snapshot(out / "features") | snapshot(out / "labels")
    damaged = {("features/tiny", 1): "data", ("latents", 1): "index", ("labels", 0): "data"}
    for (name, shard), kind in damaged.items():
        damage_file(c.shard_object(name, shard), kind, at=8 if name == "labels" else None)  # row 2: label 0 -> 1
    proc = subprocess.run([sys.executable, "-m", "cache.inspect", str(out), "--verify"], cwd=ROOT,
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 3, proc.stdout
    for name, shard in damaged:
        assert any(f"{name} shard {shard} ({c.shard_object(name, shard)})" in p for p in problems), (name, shard)
    repair = run_build(image_folder, out, "--flip", "both", "--repair")
    assert "repair: 2 damaged shard(s) to encode again" in repair.stderr
    assert "2 of 3 shards to encode" in repair.stderr
    assert snapshot(out / "latents") | snapshot(out / "features") | snapshot(out / "labels") == original
    assert cache.open_cache(out).verify_stored() == []
