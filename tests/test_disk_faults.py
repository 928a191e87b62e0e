"""Full and read-only disks under the cache's commands, on real tmpfs mounts: one `error:` line naming the
path and what to do, exit non-zero, nothing half-written left as a cache, and a finished cache on a read-only
file system is still read (a rerun of its build writes nothing)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from common.mounts import remount, tmpfs
from common.synthetic import synthetic_cache
from conftest import ROOT, _env, run_build

import cache

pytestmark = pytest.mark.slow


def _cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=_env(), timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_a_finished_cache_on_a_read_only_disk_is_read_and_its_rerun_writes_nothing(tmp_path, built_cache,
                                                                                   image_folder):
    with tmpfs(tmp_path / "ro", "64m") as mnt:
        shutil.copytree(built_cache, mnt / "c.zarr")
        remount(mnt, readonly=True)
        rerun = run_build(image_folder, mnt / "c.zarr", "--flip", "both")
        assert "already complete" in rerun.stderr and "Traceback" not in rerun.stderr
        assert _cli("cache.inspect", mnt / "c.zarr", "--verify").returncode == 0
        assert len(list(cache.open_cache(mnt / "c.zarr").loader(4))) > 0
        # a write there (a conversion into it) is one line naming the read-only file system
        line = _one_error_line(_cli("cache.convert", mnt / "c.zarr", mnt / "c.h5", "--format", "hdf5"))
        assert "read-only" in line.lower()
        remount(mnt, readonly=False)


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_a_full_disk_during_a_conversion_is_one_line_and_a_rerun_cleans_up(tmp_path, fmt):
    src = tmp_path / "c.zarr"
    synthetic_cache(src, n=200, skipped=())
    with tmpfs(tmp_path / "full", "24k") as mnt:
        dst = mnt / f"c.{fmt}"
        line = _one_error_line(_cli("cache.convert", src, dst, "--format", fmt))
        assert "No space left on device" in line and "free space" in line
        assert not dst.exists()  # nothing that opens as a cache
    with tmpfs(tmp_path / "roomy", "64m") as mnt:
        dst = mnt / f"c.{fmt}"
        (mnt / f"c.{fmt}.partial").mkdir() if fmt == "zarr" else (mnt / f"c.{fmt}.partial").write_bytes(b"x" * 10)
        assert _cli("cache.convert", src, dst, "--format", fmt).returncode == 0
        assert not (mnt / f"c.{fmt}.partial").exists() and len(cache.open_cache(dst)) == 200
