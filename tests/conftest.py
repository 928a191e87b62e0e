"""Shared fixtures: a small photo-like image folder and tiny-encoder caches built from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.demo_images import make_demo_imagefolder  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from common.s3 import s3_env, s3_server  # noqa: E402,F401  (the real S3 server, tests/common/s3.py)

# Small and fast: 64 px crops, tiny encoders, shards of 8 rows.
TINY_BUILD = ["--vae", "tiny", "--teacher", "tiny", "--resolution", "64", "--batch-size", "4",
              "--shard-rows", "8", "--chunk-rows", "4", "--workers", "0", "--device", "cpu"]


def run_build(source: Path, out: Path, *extra: str, check: bool = True, env: dict | None = None,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline.build` in a subprocess, as a user runs it."""
    cmd = (launcher or [sys.executable]) + ["-m", "pipeline.build", str(source), str(out), *TINY_BUILD, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(env), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module", params=["direct", "zarr"])
def io_mode(request):
    """Run a module's tests twice: with direct byte-range shard I/O where it applies, and with zarr's
    own I/O forced everywhere (UREPA_ZARR_IO=zarr), so that neither path can rot."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "zarr":
            mp.setenv("UREPA_ZARR_IO", "zarr")
        else:
            mp.delenv("UREPA_ZARR_IO", raising=False)
        yield request.param


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """4 classes x 6 photo crops (JPEG, PNG, L, CMYK among them)."""
    root = tmp_path_factory.mktemp("images")
    make_demo_imagefolder(root, per_class=6, min_size=70, max_size=200, seed=3)
    # keep it small: drop all but the first 4 classes
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    for extra in classes[4:]:
        for f in extra.iterdir():
            f.unlink()
        extra.rmdir()
    return root


@pytest.fixture(scope="session")
def built_cache(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caches") / "c.zarr"
    run_build(image_folder, out, "--flip", "both")
    return out
