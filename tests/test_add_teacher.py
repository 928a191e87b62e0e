"""Adding a teacher to a finished cache (only its tokens are encoded, resumably) and dropping one (the other
arrays keep their bytes): end-to-end through `pipeline.build` and `cache.edit`, as a user runs them."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_BUILD, _env, run_build

import cache
from cache.manifest import manifest_diff
from tools.bench.cachefiles import progress_records

pytestmark = pytest.mark.slow

NEW = "tiny:vit_small_patch14_reg4_dinov2"  # a DINOv2-with-registers architecture, small and random
NEW_NAME = "tiny-vit_small_patch14_reg4_dinov2"
BASE = ("--limit", "16", "--shard-rows", "4")  # 4 shards


def files(path: Path, arrays) -> dict[str, bytes]:
    """Every stored object of the given arrays, by relative path (metadata and shard files)."""
    out = {}
    for name in arrays:
        for f in sorted((path / name).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(path))] = f.read_bytes()
    return out


def edit(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "cache.edit", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=_env())
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_added_teacher_changes_nothing_else_equals_a_build_with_both_and_can_be_dropped(tmp_path, image_folder):
    base, added, both = tmp_path / "base.zarr", tmp_path / "added.zarr", tmp_path / "both.zarr"
    run_build(image_folder, base, *BASE, "--flip", "both", "--feature-dtype", "int8")
    shutil.copytree(base, added)
    kept = ["latents", "labels", "features/tiny", "feature_scales/tiny"]
    before = files(added, kept)
    proc = run_build(image_folder, added, *BASE, "--flip", "both", "--feature-dtype", "int8",
                     "--teacher", f"tiny,{NEW}")
    assert f"teacher(s) {NEW_NAME} only" in proc.stderr and "added teacher(s)" in proc.stderr
    assert files(added, kept) == before  # every other array byte-identical
    run_build(image_folder, both, *BASE, "--flip", "both", "--feature-dtype", "int8", "--teacher", f"tiny,{NEW}")
    every = [*kept, f"features/{NEW_NAME}", f"feature_scales/{NEW_NAME}"]
    assert files(added, every) == files(both, every)  # as if built with both from the start
    a, b = cache.open_cache(added), cache.open_cache(both)
    assert manifest_diff(a.manifest.to_dict(), b.manifest.to_dict()) == []
    assert list(a.layout.teachers) == ["tiny", NEW_NAME] and "adding" not in a.manifest.extra
    assert a.manifest.teacher(NEW_NAME).extra["dtype"] == "int8"
    assert [r["checksums"] for r in progress_records(a)] == [r["checksums"] for r in progress_records(b)]
    assert a.verify_stored() == []
    assert "already complete" in run_build(image_folder, added, *BASE, "--flip", "both", "--feature-dtype", "int8",
                                           "--teacher", f"tiny,{NEW}").stderr
    # drop it again: the cache is the base cache, byte for byte in every array
    out = edit(added, "--drop-teacher", NEW_NAME).stdout
    assert f"dropped teacher {NEW_NAME}" in out
    assert not (added / "features" / NEW_NAME).exists() and not (added / "feature_scales" / NEW_NAME).exists()
    assert files(added, kept) == before
    d = cache.open_cache(added)
    assert manifest_diff(d.manifest.to_dict(), cache.open_cache(base).manifest.to_dict()) == []
    assert [r["checksums"] for r in progress_records(d)] == [r["checksums"] for r in progress_records(cache.open_cache(base))]
    unknown = edit(added, "--drop-teacher", "nope", check=False)
    assert unknown.returncode == 2 and "has no teacher 'nope'" in unknown.stderr


def test_an_added_teacher_keeps_its_own_dtype_and_settings(tmp_path, image_folder):
    out = tmp_path / "c.zarr"
    run_build(image_folder, out, *BASE)
    run_build(image_folder, out, *BASE, "--teacher", f"tiny,{NEW}", "--feature-dtype", "int8", "--batch-size", "2")
    c = cache.open_cache(out)
    assert c.layout.feature_dtype("tiny") == "float16" and c.layout.feature_dtype(NEW_NAME) == "int8"
    assert c.manifest.teacher("tiny").extra["encode"]["batch_size"] == 4
    assert c.manifest.teacher(NEW_NAME).extra["encode"]["batch_size"] == 2
    batch = next(iter(c.loader(4, pin_memory=False)))
    assert batch["features"][NEW_NAME].dtype.is_floating_point is False and set(batch["feature_scales"]) == {NEW_NAME}
    info = subprocess.run([sys.executable, "-m", "cache.inspect", str(out), "--verify"], cwd=ROOT, capture_output=True,
                          text=True, env=_env())
    assert info.returncode == 0, info.stdout + info.stderr
    assert f"teacher    {NEW_NAME}: 16 tokens x 96, int8 + float32 scale per token" in info.stdout
    assert "teacher    tiny: 16 tokens x 96, float16" in info.stdout


def test_addition_resumes_after_sigkill_and_refusals(tmp_path, image_folder):
    out = tmp_path / "c.zarr"
    run_build(image_folder, out, *BASE)
    base = files(out, ["latents", "labels", "features/tiny"])
    # naming the new teacher alone is not an addition: refused, with the command that adds it
    alone = run_build(image_folder, out, *BASE, "--teacher", NEW, check=False)
    assert alone.returncode == 2 and f"--teacher tiny,{NEW_NAME}" in alone.stderr
    # an addition that changes anything else is refused
    other = run_build(image_folder, out, *BASE, "--teacher", f"tiny,{NEW}", "--flip", "both", check=False)
    assert other.returncode == 2 and "more than its teachers" in other.stderr and "preprocessing.flip" in other.stderr
    # killed after its first shard, then finished by the same command
    cmd = [sys.executable, "-m", "pipeline.build", str(image_folder), str(out), *TINY_BUILD, *BASE,
           "--teacher", f"tiny,{NEW}"]
    records = out / "build" / "adding"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and len(os.listdir(records)) >= 1:
            break
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if killed and records.exists() and 0 < len(os.listdir(records)) < 4:
        c = cache.open_cache(out)  # the base cache stays readable while a teacher is added
        assert list(c.layout.teachers) == ["tiny"] and NEW_NAME in c.manifest.pending
        pending = run_build(image_folder, out, *BASE, check=False)  # the base command: finish or drop the addition
        assert pending.returncode == 2 and "unfinished addition" in pending.stderr
    resumed = run_build(image_folder, out, *BASE, "--teacher", f"tiny,{NEW}")
    ref = tmp_path / "ref.zarr"
    run_build(image_folder, ref, *BASE, "--teacher", f"tiny,{NEW}")
    arrays = ["latents", "labels", "features/tiny", f"features/{NEW_NAME}"]
    assert files(out, arrays) == files(ref, arrays)
    assert files(out, ["latents", "labels", "features/tiny"]) == base
    assert not records.exists() or not os.listdir(records)
    assert "already complete" in run_build(image_folder, out, *BASE, "--teacher", f"tiny,{NEW}").stderr
    del resumed


def test_an_unfinished_addition_can_be_dropped(tmp_path):
    """The writer's API: begin an addition, write one shard, drop the pending teacher; the cache is as before."""
    from common.synthetic import TEACHERS, synthetic_cache

    c = synthetic_cache(tmp_path / "c.zarr", n=40)
    before = files(tmp_path / "c.zarr", ["latents", "labels", *(f"features/{k}" for k in TEACHERS)])
    m = c.manifest.to_dict()
    m["layout"]["teachers"]["t_c"] = [2, 4]
    m["teachers"] = {"t_c": {"spec": "x"}}
    writer, resumed = cache.CacheWriter.create_or_resume(
        tmp_path / "c.zarr", layout=cache.Layout.from_dict(m["layout"]), manifest=m, sources=c.sources())
    assert writer.adding == ("t_c",) and not resumed and writer.completed_shards() == set()
    writer.write_shard(0, features={"t_c": np.ones((16, 2, 2, 4), np.float16)})
    assert writer.completed_shards() == {0}
    with pytest.raises(cache.CacheError, match="tokens alone"):
        writer.write_shard(1, latents=np.zeros((16, 2, 8, 2, 2), np.float16), features={"t_c": np.ones((16, 2, 2, 4))})
    again, resumed = cache.CacheWriter.create_or_resume(
        tmp_path / "c.zarr", layout=cache.Layout.from_dict(m["layout"]), manifest=m, sources=c.sources())
    assert resumed and again.completed_shards() == {0}
    assert cache.open_cache(tmp_path / "c.zarr").layout.teachers.keys() == TEACHERS.keys()
    from cache.convert import convert

    convert(tmp_path / "c.zarr", tmp_path / "copy.h5", format="hdf5")  # a copy leaves the unfinished addition out
    copy = cache.open_cache(tmp_path / "copy.h5")
    assert "adding" not in copy.manifest.extra and copy.layout.teachers.keys() == TEACHERS.keys()
    edit(tmp_path / "c.zarr", "--drop-teacher", "t_c")
    assert not (tmp_path / "c.zarr" / "features" / "t_c").exists() and not (tmp_path / "c.zarr" / "build" / "adding").exists() \
        or not os.listdir(tmp_path / "c.zarr" / "build" / "adding")
    after = cache.open_cache(tmp_path / "c.zarr")
    assert "adding" not in after.manifest.extra and after.manifest.to_dict() == c.manifest.to_dict()
    assert files(tmp_path / "c.zarr", ["latents", "labels", *(f"features/{k}" for k in TEACHERS)]) == before


def _alter_jpeg_in_place(path: Path) -> None:
    """Change one byte of the entropy-coded data of a JPEG: same name and size, still decodes, other pixels."""
    data = bytearray(path.read_bytes())
    start = data.rfind(b"\xff\xda") + 64  # inside the scan, past its header
    i = next(j for j in range(start, len(data) - 2) if data[j] not in (0xFF, 0x00, 0xFE) and data[j + 1] != 0xFF)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_addition_refuses_a_source_altered_in_place(tmp_path, image_folder):
    """A JPEG changed in place (same size, still decodes) after the build: adding a teacher refuses, naming the row
    and the file, before any token of it is written; without the change the same addition goes through."""
    source = tmp_path / "src"
    shutil.copytree(image_folder, source)
    base = tmp_path / "base.zarr"
    run_build(source, base, *BASE)
    rows = cache.open_cache(base)
    jpeg = next(r for r in range(len(rows.labels)) if rows.source_path(r).lower().endswith((".jpg", ".jpeg"))
                and rows.labels[r] >= 0)
    before = (source / rows.source_path(jpeg)).stat().st_size
    _alter_jpeg_in_place(source / rows.source_path(jpeg))
    assert (source / rows.source_path(jpeg)).stat().st_size == before
    refused = run_build(source, base, *BASE, "--teacher", f"tiny,{NEW}", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"rows {jpeg} ({rows.source_path(jpeg)})" in refused.stderr and "other bytes" in refused.stderr
    assert list(cache.open_cache(base).layout.teachers) == ["tiny"]
    shutil.copy(image_folder / rows.source_path(jpeg), source / rows.source_path(jpeg))  # restored
    run_build(source, base, *BASE, "--teacher", f"tiny,{NEW}")
    assert list(cache.open_cache(base).layout.teachers) == ["tiny", NEW_NAME]
