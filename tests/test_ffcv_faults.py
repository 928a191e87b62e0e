"""A full disk during ``cache.convert --format ffcv`` (issue 21 item 11), on a real, small tmpfs mount.

FFCV's own writer waits forever when one of its worker processes dies (a full disk kills it with ENOSPC).
Each conversion here runs as a user runs it, ``python -m cache.convert`` in a subprocess with a timeout, so
that a hang fails the test instead of hanging the suite; each must end in one error line that names the
path and what to do, and leave no half-written .beton behind (the staged rows stay: a rerun resumes).
Skipped where mounting is not permitted (not root, or no tmpfs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from common.synthetic import synthetic_cache
from conftest import ROOT, _env

import cache

pytestmark = pytest.mark.slow

TIMEOUT = 180  # seconds: a conversion of 100 tiny rows takes a few; a hang takes forever


@pytest.fixture
def small_disk(tmp_path):
    """A function mounting a tmpfs of the given size at a fresh folder (unmounted at the end)."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounts.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounts:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def convert_cli(src: Path, dst: Path, *, no_precheck: bool = False) -> subprocess.CompletedProcess:
    """``python -m cache.convert SRC DST --format ffcv`` in its own process group, killed after TIMEOUT.
    ``no_precheck``: let the write start even though the disk is too small (the dead-writer path)."""
    patch = "import cache.formats.ffcv.writer as f; f._free_bytes = lambda path: 1 << 60; " if no_precheck else ""
    code = (f"{patch}from cache.convert import main; "
            f"raise SystemExit(main([{str(src)!r}, {str(dst)!r}, '--format', 'ffcv']))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"cache.convert --format ffcv hung for {TIMEOUT} s on a full disk")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return Path(synthetic_cache(tmp_path_factory.mktemp("ffcv-faults") / "c.zarr").url)


def no_shared_memory_left(before: set[str]) -> bool:
    return not ({p for p in os.listdir("/dev/shm") if p.startswith("psm_")} - before)


@pytest.mark.parametrize("precheck", [True, False], ids=["refused-up-front", "writer-dies"])
def test_full_disk_during_the_beton_write_fails_with_one_line_and_resumes(source, small_disk, precheck):
    disk = small_disk("4m")  # the staged rows (~30 KB) fit; the .beton (two 8 MiB pages at least) does not
    dst = disk / "c.ffcv"
    shm = {p for p in os.listdir("/dev/shm") if p.startswith("psm_")}
    line = error_line(convert_cli(source, dst, no_precheck=not precheck))
    partial = f"{dst}.partial"
    assert "No space left on device" in line and partial in line and "free space" in line, line
    assert ("needs at least" in line) == precheck, line  # which guard caught it
    assert not dst.exists()
    assert not (Path(partial) / "data.beton").exists()  # the half-written file gave its space back
    assert sorted(p.name for p in (Path(partial) / "stage").glob("block-*.done"))  # the staged rows stay
    assert no_shared_memory_left(shm)
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    proc = convert_cli(source, dst)  # the same command, with room: resumes from the staged rows, finishes
    assert proc.returncode == 0, proc.stderr
    assert not Path(partial).exists()
    copy, zarr_cache = cache.open_cache(dst), cache.open_cache(source)
    assert copy.verify_stored() == []
    a = next(iter(copy.loader(16, seed=3, num_workers=1)))
    b = next(iter(zarr_cache.loader(16, seed=3, num_workers=1)))
    assert np.array_equal(a["latents"].numpy(), b["latents"].numpy())


def test_full_disk_while_staging_rows_fails_with_one_line_and_leaves_nothing(source, small_disk):
    disk = small_disk("16k")  # not even the staged rows fit
    dst = disk / "c.ffcv"
    line = error_line(convert_cli(source, dst))
    assert "No space left on device" in line and f"{dst}.partial" in line and "free space" in line, line
    assert list(disk.iterdir()) == []


def test_a_file_system_that_cannot_reserve_blocks_still_converts(source, tmp_path, monkeypatch):
    import errno

    from cache.convert import convert

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    copy = convert(source, tmp_path / "c.ffcv", format="ffcv", progress=False)
    assert copy.verify_stored() == []
