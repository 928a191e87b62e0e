"""Every entry point on a cache in the real S3 server (started by the tests), beyond the happy path of
tests/test_remote_cli.py: the store settings given as flags instead of the environment; a build killed
mid-upload and resumed with the same command; ``--overwrite`` deleting only the cache's own objects;
``cache.convert`` from and to a store; ``cache.edit`` on a store; a build writing each shard object with
one PUT; a teacher added to a cache in the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from common.s3 import server_store, upload
from common.synthetic import synthetic_cache
from conftest import ROOT, TINY_BUILD, _env, run_build

import cache

pytestmark = [pytest.mark.remote, pytest.mark.slow]  # subprocesses against the server
obstore = pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")

_DATA = ("latents/c/", "labels/c/", "features/")


def _cli(module: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    if check:
        assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _keys_only_env(server) -> dict:
    """The credentials alone in the environment, as a user who gives the endpoint by flag."""
    env = _env({"AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret})
    for k in ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
        env.pop(k, None)
    return env


def _objects(server, prefix: str) -> dict[str, bytes]:
    store = server_store(server)
    return {o["path"].removeprefix(prefix + "/"): bytes(obstore.get(store, o["path"]).bytes())
            for batch in obstore.list(store, prefix=prefix + "/") for o in batch}


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _shards(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.startswith(_DATA) and "/c/" in k}


@pytest.fixture(scope="module")
def uploaded(s3_server, tmp_path_factory):
    """(local synthetic cache, its URL in the bucket)."""
    local = tmp_path_factory.mktemp("store-cli") / "c.zarr"
    synthetic_cache(local)
    return local, upload(s3_server, local, "store-cli/c.zarr")


def test_store_settings_as_flags(uploaded, s3_server):
    local, url = uploaded
    env = _keys_only_env(s3_server)
    flags = ["--store-endpoint", s3_server.endpoint, "--store-allow-http", "--store-region", "us-east-1"]
    ok = _cli("cache.inspect", url, "--verify", *flags, env=env)
    assert "verify: OK" in ok.stdout and url in ok.stdout

    plain = _cli("cache.inspect", url, "--store-endpoint", s3_server.endpoint, env=env, check=False)
    assert plain.returncode == 2 and "--store-allow-http" in plain.stderr

    for without in ([], ["--store-endpoint", "http://127.0.0.1:9", "--store-allow-http"]):  # AWS itself; nothing there
        bad = _cli("cache.inspect", url, *without, env=env, check=False)
        lines = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr
        assert "store" in lines[0] and "damaged" not in bad.stderr and "rebuild" not in bad.stderr, lines[0]
        assert "Traceback" not in bad.stderr and s3_server.secret not in bad.stderr + bad.stdout

    malformed = _cli("cache.inspect", url, "--store-endpoint", "127.0.0.1:8333", env=env, check=False)
    assert malformed.returncode == 2 and "--store-endpoint must be an http:// or https:// URL" in malformed.stderr
    on_local = _cli("cache.inspect", str(local), "--store-region", "us-east-1", env=env, check=False)
    assert on_local.returncode == 2 and "--store-region applies to a cache in an object store" in on_local.stderr
    assert on_local.stderr.count("error:") == 1

    dry = _cli("trainer.train", "--cache", url, "--out", "unused", *flags, "--dry-run", env=env)
    resolved = json.loads(dry.stdout)
    assert resolved["store_endpoint"] == s3_server.endpoint and resolved["store_region"] == "us-east-1"
    assert s3_server.secret not in dry.stdout and s3_server.key not in dry.stdout


def _kill_when(proc: subprocess.Popen, server, prefix: str, first: str, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as an object whose key starts with ``prefix/first`` is in the bucket."""
    store = server_store(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(o["path"].startswith(f"{prefix}/{first}") for batch in obstore.list(store, prefix=prefix + "/")
               for o in batch):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_build_killed_mid_upload_resumes_to_the_same_bytes(image_folder, built_cache, s3_server):
    url, prefix = s3_server.url("killed/c.zarr"), "killed/c.zarr"
    cmd = [sys.executable, "-m", "pipeline.build", str(image_folder), url, *TINY_BUILD, "--flip", "both"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(s3_server.env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _kill_when(proc, s3_server, prefix, "latents/c/")
    assert proc.returncode == -signal.SIGKILL
    left = _objects(s3_server, prefix)
    done = [k for k in left if k.startswith("build/progress/")]
    manifest = json.loads(left["zarr.json"])["attributes"]["urepa_cache"]
    assert not manifest["complete"] and len(done) < 3, "the kill came after the build finished"

    resumed = run_build(image_folder, url, "--flip", "both", env=s3_server.env)
    assert "resuming" in resumed.stderr
    objects = _objects(s3_server, prefix)
    local = _shards(_local_files(built_cache))
    assert local and _shards(objects) == local
    _cli("cache.inspect", url, "--verify", env=_env(s3_server.env))


def test_overwrite_on_a_store_deletes_only_the_caches_objects(image_folder, s3_server):
    url, prefix = s3_server.url("over/c.zarr"), "over/c.zarr"
    run_build(image_folder, url, env=s3_server.env)
    first = _objects(s3_server, prefix)
    store = server_store(s3_server)
    foreign = {"notes/readme.txt": b"mine", "latents/extra.bin": b"also mine", "latents/c/99/0/0/0/0": b"not a chunk",
               "build/progress/notes.json": b"{}", "features/zarr.json.bak": b"x"}
    for key, data in foreign.items():
        obstore.put(store, f"{prefix}/{key}", data)

    refused = run_build(image_folder, url, "--shard-rows", "12", "--chunk-rows", "4", env=s3_server.env, check=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    rebuilt = run_build(image_folder, url, "--shard-rows", "12", "--chunk-rows", "4", "--overwrite", env=s3_server.env)
    assert rebuilt.returncode == 0
    now = _objects(s3_server, prefix)
    assert all(now.get(k) == v for k, v in foreign.items()), "a foreign object was deleted or changed"
    gone = set(first) - set(now)
    assert any(k.startswith("latents/c/2/") for k in gone)  # 3 shards of 8 rows became 2 of 12: shard 2 went
    assert {k for k in now if k.startswith("build/progress/shard-")} == {
        "build/progress/shard-000000.json", "build/progress/shard-000001.json"}
    _cli("cache.inspect", url, "--verify", env=_env(s3_server.env))

    # a prefix holding data but no marker of ours: refused, even with --overwrite, and left as it is
    alien = "alien/c.zarr"
    obstore.put(store, f"{alien}/data.bin", b"someone's")
    obstore.put(store, f"{alien}/latents/c/0/0/0/0/0", b"someone else's")
    before = _objects(s3_server, alien)
    for extra in ((), ("--overwrite",)):
        proc = run_build(image_folder, s3_server.url(alien), *extra, env=s3_server.env, check=False)
        assert proc.returncode == 2 and "refusing to write into it" in proc.stderr, proc.stderr
    assert _objects(s3_server, alien) == before


def _same(a, b) -> None:
    assert a.manifest.layout.to_dict() == b.manifest.layout.to_dict()
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(np.asarray(a.latents[:]), np.asarray(b.latents[:]))
    for name in a.layout.teachers:
        np.testing.assert_array_equal(np.asarray(a.features[name][:]), np.asarray(b.features[name][:]))


def test_convert_from_and_into_a_store(uploaded, s3_server, tmp_path, monkeypatch):
    local, url = uploaded
    env = _keys_only_env(s3_server)
    flags = ["--store-endpoint", s3_server.endpoint, "--store-allow-http"]
    h5 = tmp_path / "c.h5"
    _cli("cache.convert", url, str(h5), "--format", "hdf5", *flags, env=env)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    _same(cache.open_cache(h5), cache.open_cache(local))
    assert cache.open_cache(h5).verify() == []

    into, prefix = s3_server.url("converted/c.zarr"), "converted/c.zarr"
    hdf5_there = _cli("cache.convert", str(local), into, "--format", "hdf5", *flags, env=env, check=False)
    assert hdf5_there.returncode == 2 and "use --format zarr" in hdf5_there.stderr
    _cli("cache.convert", str(local), into, "--format", "zarr", *flags, env=env)
    here = tmp_path / "copy.zarr"
    _cli("cache.convert", str(local), str(here), "--format", "zarr", env=env)
    assert _shards(_objects(s3_server, prefix)) == _shards(_local_files(here)) != {}
    _same(cache.open_cache(into), cache.open_cache(local))
    again = _cli("cache.convert", str(local), into, "--format", "zarr", *flags, env=env, check=False)
    assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
    _cli("cache.convert", str(local), into, "--format", "zarr", "--overwrite", *flags, env=env)
    _same(cache.open_cache(into), cache.open_cache(local))


def test_edit_drops_a_teacher_in_a_store(s3_server, tmp_path, monkeypatch):
    local = tmp_path / "c.zarr"
    synthetic_cache(local)
    url, prefix = upload(s3_server, local, "edit/c.zarr"), "edit/c.zarr"
    obstore.put(server_store(s3_server), f"{prefix}/features/t_b/readme.txt", b"foreign")
    _cli("cache.edit", url, "--drop-teacher", "t_b", "--store-endpoint", s3_server.endpoint, "--store-allow-http",
         env=_keys_only_env(s3_server))
    _cli("cache.edit", str(local), "--drop-teacher", "t_b", env=_env(s3_server.env))
    now = _objects(s3_server, prefix)
    assert now.pop("features/t_b/readme.txt") == b"foreign"
    assert now == _local_files(local)  # the same objects as the local edit, byte for byte
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    remote = cache.open_cache(url)
    assert list(remote.layout.teachers) == ["t_a"] and remote.verify() == []
    _same(remote, cache.open_cache(local))


_COUNT_PUTS = """
import collections, json, sys
import obstore
counts = collections.Counter()
put = obstore.put_async
async def counted(store, path, *args, **kwargs):
    counts[path] += 1
    return await put(store, path, *args, **kwargs)
obstore.put_async = counted
from pipeline.build import main
rc = main(sys.argv[2:])
json.dump(counts, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def test_a_build_puts_each_shard_object_once(image_folder, s3_server, tmp_path):
    url, prefix = s3_server.url("puts/c.zarr"), "puts/c.zarr"
    counts = tmp_path / "puts.json"
    flags = ["--store-endpoint", s3_server.endpoint, "--store-allow-http"]  # the settings as flags, keys in the env
    subprocess.run([sys.executable, "-c", _COUNT_PUTS, str(counts), str(image_folder), url, *TINY_BUILD, "--flip",
                    "both", *flags], cwd=ROOT, env=_keys_only_env(s3_server), check=True, capture_output=True,
                   timeout=300)
    puts = json.loads(counts.read_text())
    shards = [k for k in _objects(s3_server, prefix) if k.startswith(_DATA) and "/c/" in k]
    assert len(shards) == 3 * 3  # latents, labels and one teacher; 3 shards of 8 rows each
    assert {k: puts.get(k) for k in shards} == {k: 1 for k in shards}  # one PUT per shard object, whole
    assert all(n == 1 for k, n in puts.items() if "/c/" in k), puts


def test_training_with_the_store_settings_as_flags(built_cache, s3_server, tmp_path):
    url = upload(s3_server, built_cache, "train-flags/c.zarr")
    train = ["--model", "tiny", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--log-every", "1",
             "--loader-workers", "2", "--no-tensorboard", "--steps", "2"]
    flags = ["--store-endpoint", s3_server.endpoint, "--store-allow-http"]
    _cli("trainer.train", "--cache", url, "--out", str(tmp_path / "remote"), *train, *flags,
         env=_keys_only_env(s3_server))
    _cli("trainer.train", "--cache", str(built_cache), "--out", str(tmp_path / "local"), *train, env=_env())
    rows = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("remote", "local")]
    assert [json.loads(x)["loss"] for x in rows[0]] == [json.loads(x)["loss"] for x in rows[1]] and len(rows[0]) == 2
    record = json.loads((tmp_path / "remote" / "config.json").read_text())["train"]
    assert record["store_endpoint"] == s3_server.endpoint and record["store_allow_http"]
    written = b"".join(p.read_bytes() for p in (tmp_path / "remote").rglob("*") if p.is_file())
    assert s3_server.secret.encode() not in written and s3_server.key.encode() not in written


def test_adding_a_teacher_to_a_store_cache_equals_a_build_with_both(image_folder, s3_server, tmp_path):
    """The build run again on a finished cache in the bucket with ``--teacher OLD,NEW`` encodes NEW only, keeps
    every other object's bytes, and ends equal to a local build that had both teachers from the start."""
    new, new_name = "tiny:vit_small_patch14_reg4_dinov2", "tiny-vit_small_patch14_reg4_dinov2"
    base = ("--limit", "16", "--shard-rows", "4")
    url, prefix = s3_server.url("added/c.zarr"), "added/c.zarr"
    run_build(image_folder, url, *base, env=s3_server.env)
    before = _shards(_objects(s3_server, prefix))
    added = run_build(image_folder, url, *base, "--teacher", f"tiny,{new}", env=s3_server.env)
    assert f"teacher(s) {new_name} only" in added.stderr and "added teacher(s)" in added.stderr
    after = _shards(_objects(s3_server, prefix))
    assert {k: after[k] for k in before} == before  # latents, labels and the old teacher: the same bytes
    assert any(k.startswith(f"features/{new_name}/") for k in after)
    both = tmp_path / "both.zarr"
    run_build(image_folder, both, *base, "--teacher", f"tiny,{new}")
    assert after == _shards(_local_files(both))
    _cli("cache.inspect", url, "--verify", env=_env(s3_server.env))
