"""Several processes: a launcher's world is joined or refused (never N copies of one process), and concurrent
writers of one output folder are refused, not raced. Real processes throughout: torchrun on loopback, env
variables as SLURM sets them, two entry points started at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_BUILD, _env

import cache
from cache.cli.runtime import LOCK_FILE, FolderBusy, lock_folder
from tools.bench.cachefiles import progress_records

TRAIN = ["--model", "tiny", "--batch-size", "8", "--precision", "fp32", "--log-every", "1", "--ckpt-every", "2",
         "--loader-workers", "2", "--no-tensorboard", "--lr", "1e-3"]
SAMPLE = ["--num", "4", "--batch-size", "4", "--steps", "2", "--precision", "fp32", "--grid", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _proc(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _slurm_env() -> dict:
    env = _env({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def tiny_run(built_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch") / "run"
    proc = _proc([sys.executable, "-m", "trainer.train", "--cache", str(built_cache), "--out", str(out), *TRAIN,
                  "--device", "cpu", "--steps", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


@pytest.mark.parametrize("entry", ["pipeline.build", "trainer.train", "tools.sample", "tools.evaluate"])
def test_slurm_tasks_without_torchrun_are_refused_at_once(entry, image_folder, built_cache, tiny_run, tmp_path):
    """`srun --ntasks 2 python -m ...` gives each task SLURM_NTASKS=2 and its SLURM_PROCID but nothing to meet
    at: every entry point stops with one line naming the variables, and writes nothing."""
    out = tmp_path / "out"
    args = {"pipeline.build": [str(image_folder), str(out), *TINY_BUILD],
            "trainer.train": ["--cache", str(built_cache), "--out", str(out), *TRAIN, "--device", "auto"],
            "tools.sample": ["--run", str(tiny_run), "--out", str(out), *SAMPLE, "--device", "auto"],
            "tools.evaluate": [str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), "--json", str(out / "m.json")]}[entry]
    line = _one_error_line(_proc([sys.executable, "-m", entry, *args], env=_slurm_env(), timeout=300))
    assert "SLURM_NTASKS=2" in line or "started 2" in line, line
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto picks CUDA here")
def test_a_torchrun_build_with_device_auto_joins_on_the_cpu(image_folder, built_cache, tmp_path):
    """`torchrun --nproc_per_node 2 -m pipeline.build ... --device auto` without a GPU: two ranks of one group
    (gloo), each writing its own shards, and the same cache as one process (before: two copies of rank 0 of 1)."""
    out = tmp_path / "two.zarr"
    proc = _proc([*TORCHRUN, "--master_port", "29651", "-m", "pipeline.build", str(image_folder), str(out),
                  *TINY_BUILD, "--flip", "both", "--device", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr and "rank 0 of 1" not in proc.stderr
    assert {r["shard"] % 2 for r in progress_records(cache.open_cache(out))} == {0, 1}
    a, b = cache.open_cache(built_cache), cache.open_cache(out)
    assert (a.latents[:] == b.latents[:]).all() and (a.features["tiny"][:] == b.features["tiny"][:]).all()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto picks CUDA here")
def test_a_torchrun_training_with_device_auto_joins_on_the_cpu(built_cache, tmp_path):
    """The same launch of trainer.train: one run of 2 ranks (before: two rank-0 processes racing on one folder)."""
    out = tmp_path / "run"
    proc = _proc([*TORCHRUN, "--master_port", "29652", "-m", "trainer.train", "--cache", str(built_cache),
                  "--out", str(out), *TRAIN, "--device", "auto", "--steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_a_torchrun_evaluation_is_refused(tmp_path):
    """tools.evaluate runs as one process: under torchrun each copy stops with one line before writing its log."""
    proc = _proc([*TORCHRUN, "--master_port", "29653", "-m", "tools.evaluate", str(tmp_path / "s.npz"),
                  str(tmp_path / "r.npz"), "--json", str(tmp_path / "m.json")], timeout=300)
    assert proc.returncode != 0 and 'evaluate.py", line' not in proc.stderr  # torchrun's own traceback only
    assert proc.stderr.count("error: tools.evaluate runs as one process, but the launcher started 2") == 2
    assert not (tmp_path / "evaluate.log").exists() and not (tmp_path / "m.json").exists()


# ------------------------------------------------------------------------------------------
# Concurrent writers


def _wait_for_lock(folder: Path, proc: subprocess.Popen, timeout: float = 180) -> dict:
    """The lock record of ``folder`` once the process ``proc`` holds it."""
    deadline = time.time() + timeout
    path = folder / LOCK_FILE
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            record = json.loads(path.read_text())
            if record.get("pid") == proc.pid:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{proc.pid} never took {path}")


def test_a_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    """A holder in another process: the lock is refused naming its pid and host; SIGKILL the holder and the lock
    is free again (the kernel drops a flock with its process), though the stale file is still there."""
    code = ("import sys, time; from cache.cli.runtime import lock_folder; "
            "l = lock_folder(sys.argv[1], what='a test holder'); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"in use by a test holder \(pid {holder.pid} on {socket.gethostname()}"
                           ) as e:
            lock_folder(str(tmp_path), what="me")
        assert e.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()
    with lock_folder(str(tmp_path), what="me") as lock:
        assert json.loads(Path(lock.path).read_text())["pid"] == os.getpid()
    with lock_folder(str(tmp_path), what="me again"):  # released at the end of the block
        pass


@pytest.mark.slow
def test_a_second_training_into_a_running_run_is_refused_and_a_killed_one_frees_it(built_cache, tmp_path):
    """A training running in OUT; the same command again (a resume while the first still runs) stops at once with
    one line naming the first's pid and host, and changes nothing; after the first is SIGKILLed, the same command
    resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer.train", "--cache", str(built_cache), "--out", str(out), *TRAIN,
           "--device", "cpu"]
    first = subprocess.Popen([*cmd, "--steps", "100000"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        record = _wait_for_lock(out, first)
        second = _proc([*cmd, "--steps", "100000"], timeout=300)
        line = _one_error_line(second)
        assert f"pid {first.pid} on {record['host']}" in line and "training run" in line, line
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = _proc([*cmd, "--steps", "2"], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_two_samplings_into_one_folder_one_proceeds(tiny_run, tmp_path):
    """Two tools.sample into one OUT at once: the second stops with one line naming the first; the first finishes
    with every image."""
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "tools.sample", "--run", str(tiny_run), "--out", str(out), "--num", "48",
           "--batch-size", "4", "--steps", "10", "--precision", "fp32", "--grid", "0", "--device", "cpu"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(out, first)
        line = _one_error_line(_proc(cmd, timeout=300))
        assert f"pid {first.pid}" in line and "samples folder" in line, line
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape[0] == 48
