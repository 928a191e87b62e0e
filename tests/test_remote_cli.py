"""The entry points on a cache in the real S3 server, as a user runs them with the store's settings in the
environment: `pipeline.build SRC s3://...` writes the same shard bytes as a local build and a rerun finds
it complete; `cache.inspect s3://... --verify` passes; `trainer.train --cache s3://...` gives the losses
of the same run from the local copy; no file either writes, local or in the bucket, holds the secret."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from common.s3 import server_store
from conftest import ROOT, _env, run_build

from trainer.metrics import read_metrics

pytestmark = [pytest.mark.remote, pytest.mark.slow]
obstore = pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")

TRAIN = ["--model", "tiny", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--log-every", "1",
         "--ckpt-every", "2", "--loader-workers", "2", "--no-tensorboard", "--lr", "1e-3", "--steps", "3"]


def _run(module: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=_env(env), timeout=600)
    assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["loss_v"], r["loss_align"]) for r in read_metrics(str(out / "metrics.jsonl"))]


def test_build_inspect_train_on_s3(image_folder, built_cache, s3_server, tmp_path):
    env = s3_server.env
    url = s3_server.url("e2e/c.zarr")
    first = run_build(image_folder, url, "--flip", "both", env=env)
    again = run_build(image_folder, url, "--flip", "both", env=env)
    assert "complete" in (again.stdout + again.stderr).lower()
    store = server_store(s3_server)
    objects = {o["path"].removeprefix("e2e/c.zarr/"): o for batch in obstore.list(store, prefix="e2e/c.zarr/")
               for o in batch}
    local = {p.relative_to(built_cache).as_posix(): p for p in built_cache.rglob("*") if p.is_file()}
    data = [k for k in local if k.startswith(("latents/c/", "features/", "labels/c/")) and "/c/" in k]
    assert data and set(data) <= set(objects)
    for key in data:  # the same encoders and sources: the same bytes, written to the store
        assert bytes(obstore.get(store, f"e2e/c.zarr/{key}").bytes()) == local[key].read_bytes(), key

    inspected = _run("cache.inspect", url, "--verify", env=env)
    assert "s3://" in inspected.stdout

    remote_run, local_run = tmp_path / "remote-run", tmp_path / "local-run"
    _run("trainer.train", "--cache", url, "--out", str(remote_run), *TRAIN, env=env)
    _run("trainer.train", "--cache", str(built_cache), "--out", str(local_run), *TRAIN, env=env)
    assert _losses(remote_run) == _losses(local_run) and len(_losses(remote_run)) == 3
    assert json.loads((remote_run / "config.json").read_text())["train"]["cache"] == url

    secret = s3_server.secret.encode()
    outputs = [first.stdout, first.stderr, again.stdout, again.stderr, inspected.stdout, inspected.stderr]
    assert not any(s3_server.secret in text for text in outputs)
    for path in [p for p in remote_run.rglob("*") if p.is_file()] + list(tmp_path.glob("*.log")):
        assert secret not in path.read_bytes(), path
    for key in objects:
        assert secret not in bytes(obstore.get(store, f"e2e/c.zarr/{key}").bytes()), key
