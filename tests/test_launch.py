"""Several processes: a launcher's world is joined or refused (never N copies of one process), and concurrent
writers of one output folder are refused, not raced. Real processes throughout: torchrun on loopback, env
variables as SLURM sets them, two entry points started at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_BUILD, _env

import cache

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
    assert {r["shard"] % 2 for r in cache.open_cache(out).progress_records()} == {0, 1}
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
