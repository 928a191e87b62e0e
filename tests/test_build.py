"""End-to-end builds in subprocesses: matched rows, bad files, SIGKILL resume, 2-process build, refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from common.bad_files import MAX_PIXELS, write_bad_files
from common.formats import direct_reads
from conftest import ROOT, TINY_BUILD, _env, run_build
from PIL import Image

import cache
from pipeline.decode import load_image
from pipeline.encoders import load_teacher, load_vae
from tools.bench.cachefiles import progress_records

pytestmark = pytest.mark.slow


def arrays(path):
    c = cache.open_cache(path)
    out = {"latents": c.latents[:], "labels": c.labels}
    out.update({f"features/{k}": v[:] for k, v in c.features.items()})
    return out, c.manifest.to_dict()


def assert_identical(a, b):
    (xa, ma), (xb, mb) = arrays(a), arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and xa[k].tobytes() == xb[k].tobytes(), k
    assert ma["skipped"] == mb["skipped"]
    assert cache.manifest.manifest_diff(ma, mb) == []


def test_rows_match_their_images_and_mirrors(built_cache, image_folder):
    c = cache.open_cache(built_cache)
    assert c.num_variants == 2 and len(c) == c.layout.num_rows == 24
    vae, teacher = load_vae("tiny").module, load_teacher("tiny", resolution=64).module
    enc_lat, enc_feat = [], []
    with torch.no_grad():
        for row in range(len(c)):
            img = torch.from_numpy(load_image(str(image_folder / c.source_path(row)), 64, max_pixels=1 << 28))[None]
            both = torch.cat([img, img.flip(2)])
            enc_lat.append(vae(both).half().float().numpy())
            enc_feat.append(teacher(both).half().float().numpy())
    enc_lat, enc_feat = np.stack(enc_lat), np.stack(enc_feat)
    lat, feat = c.latents[:].astype(np.float32), c.features["tiny"][:].astype(np.float32)
    np.testing.assert_allclose(lat, enc_lat, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(feat, enc_feat, rtol=2e-3, atol=2e-3)
    # each row is nearest to its own image, never to a neighbour's
    d = ((lat[:, None, 0] - enc_lat[None, :, 0]) ** 2).reshape(len(c), len(c), -1).sum(-1)
    np.testing.assert_array_equal(d.argmin(1), np.arange(len(c)))
    assert not np.allclose(lat[:, 0], lat[:, 1])  # the mirrored variant is a different encoding
    classes = sorted(p.name for p in image_folder.iterdir() if p.is_dir())
    labels = [classes.index(c.source_path(r).split("/")[0]) for r in range(len(c))]
    np.testing.assert_array_equal(c.labels, labels)


def test_inspect_verify_cli(built_cache):
    proc = subprocess.run([sys.executable, "-m", "cache.inspect", str(built_cache), "--verify"], cwd=ROOT,
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "verify: OK" in proc.stdout and "24 with data" in proc.stdout and "random weights" in proc.stdout
    info = json.loads(subprocess.run([sys.executable, "-m", "cache.inspect", str(built_cache), "--json"], cwd=ROOT,
                                     capture_output=True, text=True, env=_env()).stdout)
    assert info["features"]["tiny"] == [24, 2, 16, 96] and info["latents"] == [24, 2, 8, 8, 8]


def test_bad_files_are_skipped_and_recorded(tmp_path, image_folder):
    src = tmp_path / "src"
    shutil.copytree(image_folder, src)
    expected = write_bad_files(src / "zz_bad")
    run_build(src, tmp_path / "c.zarr", "--max-pixels", str(MAX_PIXELS))
    c = cache.open_cache(tmp_path / "c.zarr")
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in c.manifest.to_dict()["skipped"]}
    assert set(skipped) == {n for n, o in expected.items() if o == "skipped"}
    for row in c.rows:
        assert c.source_path(row).split("/")[-1] not in skipped
    encoded = {c.source_path(r).split("/")[-1] for r in c.rows}
    assert {n for n, o in expected.items() if o == "encoded"} <= encoded
    for s in c.manifest.to_dict()["skipped"]:
        assert c.labels[s["row"]] == -1 and s["reason"]
        assert not c.latents[s["row"]].any()


@pytest.mark.parametrize("rerun_io", ["direct", "zarr"])
def test_sigkill_then_rerun_is_bit_identical(tmp_path, image_folder, rerun_io):
    """Killed twice with direct shard writes, finished with direct writes or with zarr's own (as after a
    zarr upgrade that the direct path does not know): the same arrays as an uninterrupted build."""
    ref = tmp_path / "ref.zarr"
    run_build(image_folder, ref, "--resolution", "128", "--shard-rows", "4")
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "pipeline.build", str(image_folder), str(out), *TINY_BUILD,
           "--resolution", "128", "--shard-rows", "4"]
    progress = out / "build" / "progress"
    kills = 0
    for target in (1, 3):  # kill twice, at different points
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if progress.exists() and len(os.listdir(progress)) >= target:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the build finished before it could be killed"
    done = len(os.listdir(progress))
    assert 0 < done < 6
    assert cache.ZarrCache(out, allow_incomplete=True).manifest.to_dict()["complete"] is False
    run_build(image_folder, out, "--resolution", "128", "--shard-rows", "4",
              env={"UREPA_ZARR_IO": "zarr"} if rerun_io == "zarr" else None)
    assert_identical(ref, out)


def test_zarr_path_build_is_byte_identical(tmp_path, image_folder, built_cache, monkeypatch):
    """A build through zarr's own writes stores the same shard bytes as the direct writer, and the loader
    yields the same batches from either cache through either read path."""
    out = tmp_path / "zarr-path.zarr"
    proc = run_build(image_folder, out, "--flip", "both", env={"UREPA_ZARR_IO": "zarr"})
    assert "latents writes through zarr: forced by UREPA_ZARR_IO=zarr" in proc.stderr
    direct, via_zarr = cache.open_cache(built_cache), cache.open_cache(out)
    for name in ["latents", "labels", "features/tiny"]:
        for s in range(cache.ZarrStorage.of(direct.layout).num_shards(direct.layout)):
            key = cache.formats.zarr.shardfile.shard_key(direct.group[name], s)
            assert (built_cache / name / key).read_bytes() == (out / name / key).read_bytes(), (name, s)
    # the checksums read back after zarr's writes equal those of the bytes the direct writer wrote
    assert ([r["checksums"] for r in progress_records(direct)] == [r["checksums"] for r in progress_records(via_zarr)])
    batches = {}
    for mode in ("direct", "zarr"):
        if mode == "zarr":
            monkeypatch.setenv("UREPA_ZARR_IO", "zarr")
        for which, c in (("direct", direct), ("zarr", via_zarr)):
            loader = c.loader(5, seed=3, epoch=1, flip=True, drop_last=False)
            assert direct_reads(loader) == (mode == "direct")
            batches[mode, which] = list(loader)
    ref = batches["direct", "direct"]
    for got in batches.values():
        assert len(got) == len(ref) == 5
        for a, b in zip(ref, got):
            for key in ("index", "flip", "labels", "latents"):
                assert torch.equal(a[key], b[key])
            assert torch.equal(a["features"]["tiny"], b["features"]["tiny"])


def test_two_process_build_equals_one_process(tmp_path, image_folder):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    run_build(image_folder, one)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    proc = run_build(image_folder, two, launcher=launcher)
    assert "2 process(es)" in proc.stderr
    assert_identical(one, two)
    ranks = {r["shard"] % 2 for r in progress_records(cache.open_cache(two))}
    assert ranks == {0, 1}


def test_refuses_changed_source_or_encoder_then_overwrite(tmp_path, image_folder):
    src = tmp_path / "src"
    shutil.copytree(image_folder, src)
    out = tmp_path / "c.zarr"
    run_build(src, out)
    before = (out / "zarr.json").read_bytes()
    again = run_build(src, out)
    assert "already complete" in again.stderr
    moved = tmp_path / "moved"
    src.rename(moved)  # the same files elsewhere are the same source
    assert "already complete" in run_build(moved, out).stderr
    src = moved
    first_class = sorted(p for p in src.iterdir() if p.is_dir())[0]
    Image.open(next(first_class.iterdir())).convert("RGB").save(first_class / "new_one.png")
    refused = run_build(src, out, check=False)
    assert refused.returncode == 2 and "source.fingerprint" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "zarr.json").read_bytes() == before
    refused = run_build(src, out, "--seed", "1", check=False)
    assert refused.returncode == 2 and "weights_sha256" in refused.stderr
    run_build(src, out, "--overwrite")
    assert cache.open_cache(out).layout.num_rows == 25


def test_dry_run_writes_nothing(tmp_path, image_folder):
    proc = run_build(image_folder, tmp_path / "c.zarr", "--dry-run")
    assert json.loads(proc.stdout)["resolution"] == 64
    assert not (tmp_path / "c.zarr").exists()
    bad = run_build(image_folder, tmp_path / "c.zarr", "--flip", "sideways", check=False)
    assert bad.returncode == 2 and "--flip" in bad.stderr


def test_several_teachers_in_one_build(tmp_path, image_folder):
    run_build(image_folder, tmp_path / "c.zarr", "--teacher", "tiny,random:vit_small_patch14_dinov2.lvd142m", "--limit", "8")
    c = cache.open_cache(tmp_path / "c.zarr")
    assert c.features["tiny"].shape == (8, 1, 16, 96)
    assert c.features["vit_small_patch14_dinov2.lvd142m"].shape == (8, 1, 16, 384)
    assert c.manifest.to_dict()["teachers"]["vit_small_patch14_dinov2.lvd142m"]["random_weights"] is True
    b = next(iter(c.loader(4)))
    assert set(b["features"]) == {"tiny", "vit_small_patch14_dinov2.lvd142m"}


def test_position_table_choice_is_recorded_and_a_resume_with_the_other_is_refused(tmp_path, image_folder):
    out = tmp_path / "c.zarr"
    run_build(image_folder, out, "--limit", "8")
    m = cache.open_cache(out).manifest.to_dict()
    assert m["preprocessing"]["teacher_pos_embed"] == "repa" and m["teachers"]["tiny"]["pos_embed"] == "repa"
    before = (out / "zarr.json").read_bytes()
    refused = run_build(image_folder, out, "--limit", "8", "--pos-embed", "dinov2", check=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert "preprocessing.teacher_pos_embed" in refused.stderr and "teachers.tiny.pos_embed" in refused.stderr
    assert (out / "zarr.json").read_bytes() == before
    run_build(image_folder, out, "--limit", "8", "--pos-embed", "dinov2", "--overwrite")
    c = cache.open_cache(out)
    assert c.manifest.to_dict()["teachers"]["tiny"]["pos_embed"] == "dinov2"
    dino = load_teacher("tiny", resolution=64, pos_embed="dinov2").module
    image = torch.from_numpy(load_image(str(image_folder / c.source_path(0)), 64, max_pixels=1 << 28))[None]
    with torch.no_grad():
        np.testing.assert_allclose(c.features["tiny"][0, 0].astype(np.float32), dino(image)[0].half().float().numpy(),
                                   rtol=2e-3, atol=2e-3)


def test_teacher_precision_fp16_is_used_and_recorded_per_teacher(tmp_path, image_folder):
    """--teacher-precision fp16: the teacher's tokens are its float16-autocast output (checked against the module
    run under torch.autocast directly), the VAE keeps --precision, and the teacher's encode record says fp16."""
    out = tmp_path / "c.zarr"
    run_build(image_folder, out, "--limit", "4", "--precision", "fp32", "--teacher-precision", "fp16")
    c = cache.open_cache(out)
    m = c.manifest.to_dict()
    assert m["teachers"]["tiny"]["encode"]["precision"] == "fp16" and m["encode"]["precision"] == "fp32"
    teacher, vae = load_teacher("tiny", resolution=64).module, load_vae("tiny").module
    images = torch.from_numpy(np.stack([load_image(str(image_folder / c.source_path(i)), 64, max_pixels=1 << 28)
                                        for i in range(4)]))  # the build's one batch of 4
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            want = teacher(images).half().numpy()
        fp32 = teacher(images).half().numpy()
        lat = vae(images).half().numpy()
    assert c.features["tiny"][:4, 0].tobytes() == want.tobytes() != fp32.tobytes()
    assert c.latents[:4, 0].tobytes() == lat.tobytes()
