"""tools.sample end to end on a tiny trained run: outputs, resume, batch and rank independence, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, _env
from PIL import Image

from tools.sample import PRESETS, SampleConfig, image_grid, main, pending_chunks
from trainer.train import TrainConfig, train

ARGS = ["--num", "6", "--batch-size", "4", "--steps", "4", "--cfg", "1.5", "--device", "cpu", "--precision", "fp32",
        "--grid", "4"]


def run_sample(run: Path, out: Path, *extra: str) -> int:
    return main(["--run", str(run), "--out", str(out), *ARGS, *extra])


def arrays(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as f:
        return f["arr_0"], f["labels"]


def assert_same_images(images: np.ndarray, ref: np.ndarray) -> None:
    """Equal to float rounding: matmuls round differently for other batch sizes or thread counts (the
    subprocesses run one thread, pytest maybe more), which moves at most one level on a few values."""
    assert images.shape == ref.shape
    diff = np.abs(images.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def part_names(out: Path) -> list[str]:
    return sorted(os.listdir(out / "parts"))


@pytest.fixture(scope="module")
def trained_run(built_cache, tmp_path_factory) -> Path:
    """The tiny model, 2 steps on the 64 px tiny-encoder cache (4 classes, 8x8 latents)."""
    out = tmp_path_factory.mktemp("sample-run") / "run"
    train(TrainConfig(cache=str(built_cache), out=str(out), model="tiny", batch_size=8, steps=2, precision="fp32",
                      device="cpu", log_every=1, ckpt_every=2, loader_workers=2, tensorboard=False))
    return out


@pytest.fixture(scope="module")
def sampled(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples") / "out"
    assert run_sample(trained_run, out) == 0
    return out


def copy_of(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_outputs(sampled):
    images, labels = arrays(sampled)
    assert images.dtype == np.uint8 and images.shape == (6, 64, 64, 3)
    assert labels.dtype == np.int64 and labels.shape == (6,) and labels.min() >= 0 and labels.max() < 4
    assert part_names(sampled) == ["000000-000003.npz", "000004-000005.npz"]
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(sampled / "images" / f"{i:06d}.png")), images[i])
    assert np.array_equal(np.asarray(Image.open(sampled / "grid.png")), image_grid(images[:4]))
    record = json.loads((sampled / "config.json").read_text())
    assert record["samples"]["cfg"] == 1.5 and record["samples"]["steps"] == 4 and record["model"]["step"] == 2
    assert record["samples"]["quantize"] == "truncate" and "REPA" in record["vae"]["output"]
    assert record["vae"]["spec"] == "tiny" and record["vae"]["random_weights"]
    assert "random-weight" in (sampled / "log.txt").read_text()


def test_image_grid_layout():
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    grid = image_grid(images)
    assert grid.shape == (4, 6, 3)  # 3 columns, 2 rows (one black cell)
    assert np.array_equal(grid[2:4, 2:4], images[4]) and not grid[2:4, 4:6].any()


def test_pending_chunks():
    assert pending_chunks([], 10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert pending_chunks([(0, 3), (8, 9)], 10, 4) == [[4, 5, 6, 7]]
    # parts of batch size 3 on a rerun with batch size 4: only the gaps, never across a batch boundary
    assert pending_chunks([(0, 2), (6, 8)], 12, 4) == [[3], [4, 5], [9, 10, 11]]
    assert pending_chunks([(0, 11)], 6, 4) == []


def test_a_deleted_part_comes_back_bit_for_bit(sampled, tmp_path):
    out = copy_of(sampled, tmp_path)
    part = out / "parts" / "000004-000005.npz"
    before, npz_before = part.read_bytes(), (out / "samples.npz").read_bytes()
    kept = (out / "parts" / "000000-000003.npz").stat().st_mtime_ns
    part.unlink()
    (out / "samples.npz").unlink()
    assert run_sample(_run_of(sampled), out) == 0
    assert part.read_bytes() == before and (out / "samples.npz").read_bytes() == npz_before
    assert (out / "parts" / "000000-000003.npz").stat().st_mtime_ns == kept  # not sampled again


def _run_of(out: Path) -> Path:
    return Path(json.loads((out / "config.json").read_text())["model"]["run"])


def test_more_images_and_another_batch_size(sampled, tmp_path, capsys):
    # a rerun may ask for more images with another batch size: only the new ones are sampled
    out = copy_of(sampled, tmp_path)
    assert run_sample(_run_of(sampled), out, "--num", "8", "--batch-size", "3") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "samples.npz")
    assert part_names(out) == ["000000-000003.npz", "000004-000005.npz", "000006-000007.npz"]
    images, labels = arrays(out)
    ref, ref_labels = arrays(sampled)
    assert images.shape[0] == 8 and np.array_equal(images[:6], ref) and np.array_equal(labels[:6], ref_labels)
    # from scratch with batch size 3: every image is that of its index, to float rounding
    fresh = tmp_path / "fresh"
    assert run_sample(_run_of(sampled), fresh, "--batch-size", "3") == 0
    images, labels = arrays(fresh)
    assert np.array_equal(labels, ref_labels)
    assert_same_images(images, ref)


def test_a_changed_setting_is_refused_by_name(sampled, tmp_path, capsys):
    out = copy_of(sampled, tmp_path)
    before = part_names(out)
    assert run_sample(_run_of(sampled), out, "--cfg", "2.0") == 2
    err = capsys.readouterr().err
    assert "samples.cfg: 1.5 -> 2.0" in err and "Traceback" not in err
    assert run_sample(_run_of(sampled), out, "--weights", "raw", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "model.weights: 'ema' -> 'raw'" in err and "samples.seed: 0 -> 1" in err
    assert run_sample(_run_of(sampled), out, "--quantize", "round") == 2  # other uint8 images
    assert "samples.quantize: 'truncate' -> 'round'" in capsys.readouterr().err
    assert part_names(out) == before


def test_round_option_moves_pixels_by_at_most_one_level(sampled, tmp_path):
    out = tmp_path / "round"
    assert run_sample(_run_of(sampled), out, "--quantize", "round") == 0
    images, labels = arrays(out)
    ref, ref_labels = arrays(sampled)
    assert np.array_equal(labels, ref_labels)
    diff = images.astype(int) - ref  # truncate = floor(127.5 (x + 1)) <= round = floor(127.5 (x + 1) + 0.5)
    assert set(np.unique(diff).tolist()) == {0, 1} and (diff == 1).mean() > 0.3  # about half move one level up
    assert json.loads((out / "config.json").read_text())["samples"]["quantize"] == "round"


def test_dry_run_writes_nothing_and_presets_resolve(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["--run", "r", "--out", str(out), "--dry-run", "--interval", "0.1", "0.6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["interval"] == [0.1, 0.6] and printed["steps"] == 250 and not out.exists()
    assert printed["quantize"] == "truncate"  # REPA's generate.py
    for preset, expected in [("paper-cfg", ("sde", 250, 1.65, [0.0, 0.7], 50_000)),
                             ("paper-nocfg", ("sde", 250, 1.0, [0.0, 0.7], 50_000)),
                             ("ode", ("ode", 50, 1.8, [0.0, 0.7], 50_000))]:
        assert main(["--run", "r", "--out", str(out), "--preset", preset, "--dry-run"]) == 0
        p = json.loads(capsys.readouterr().out)
        assert (p["sampler"], p["steps"], p["cfg"], p["interval"], p["num"]) == expected and p["weights"] == "ema"
    assert SampleConfig(run="r", out="o", sampler="ode").steps == 50 and set(PRESETS) >= {"demo"}
    # the ode preset is REPA generate.py's default ODE: Euler, 50 steps, 50 evaluations; Heun is an option
    ode = SampleConfig(run="r", out="o", **PRESETS["ode"])
    assert (ode.solver, ode.steps, ode.nfe) == ("euler", 50, 50)
    assert SampleConfig(run="r", out="o", **{**PRESETS["ode"], "solver": "heun"}).nfe == 99
    assert main(["--run", "r", "--out", str(out), "--preset", "ode", "--solver", "heun", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["solver"] == "heun"
    assert SampleConfig(run="r", out="o").nfe == 250
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--interval", "0.8", "0.2"], "--interval"),
    (["--labels", "a,b"], "--labels"),
    (["--sampler", "ddim"], "--sampler"),
    (["--t-last", "0"], "--t-last"),
    (["--quantize", "nearest"], "--quantize"),
    (["--solver", "rk4"], "--solver"),
])
def test_bad_settings_are_refused_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["--run", "r", "--out", "o", *args])
    assert message in capsys.readouterr().err


def test_missing_run_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tools.sample", "--run", str(tmp_path / "nope"), "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: --run" in proc.stderr and "not a training run" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_bad_labels_and_a_missing_cache(trained_run, tmp_path, capsys):
    assert run_sample(trained_run, tmp_path / "l", "--labels", "1,7") == 2
    assert "class ids 7 are not in [0, 4)" in capsys.readouterr().err
    run = tmp_path / "moved-run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["cache"] = str(tmp_path / "gone.zarr")
    (run / "config.json").write_text(json.dumps(config))
    assert run_sample(run, tmp_path / "o", "--num", "2") == 2
    assert "--vae SPEC" in capsys.readouterr().err
    assert run_sample(run, tmp_path / "o", "--num", "2", "--vae", "tiny") == 0  # same weights as the cache's VAE
    assert "not the VAE the cache was encoded with" not in (tmp_path / "o" / "log.txt").read_text()


@pytest.mark.slow
def test_two_processes_give_the_same_images(sampled, tmp_path):
    out = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641"]
    # `-m --`: after torchrun's own options, or it takes --run for an abbreviation of its --run-path
    proc = subprocess.run([*torchrun, "-m", "--", "tools.sample", "--run", str(_run_of(sampled)), "--out", str(out),
                           *ARGS],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out / "samples.npz")]  # printed once, by rank 0
    images, labels = arrays(out)
    ref, ref_labels = arrays(sampled)
    assert np.array_equal(labels, ref_labels)
    assert_same_images(images, ref)  # the same batches on other ranks (one thread each there)


def _with_ema_tensor(run: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of ``run`` whose latest checkpoint's EMA tensor ``name`` is filled with ``value``, its recorded
    sha256 recomputed (the damage is not a checksum failure)."""
    import torch
    from safetensors.torch import load_file, save_file

    from cache.cli.runtime import file_sha256

    shutil.copytree(run, dst)
    ckpt = sorted((dst / "checkpoints").glob("step-*"))[-1]
    path = ckpt / "ema.safetensors"
    state = load_file(str(path))
    state[name] = torch.full_like(state[name], value)
    save_file(state, str(path), {"step": "2"})
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["ema.safetensors"] = {"sha256": file_sha256(str(path)), "bytes": path.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _sample_process(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.sample", "--run", str(run), "--out", str(out), *ARGS, *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_nonfinite_weights_are_refused_at_load(trained_run, tmp_path):
    """An infinity in one EMA tensor (checksums recomputed): one error line naming the file and the tensor, exit 2,
    no images."""
    run = _with_ema_tensor(trained_run, tmp_path / "run", "y_embedder.weight", float("inf"))
    proc = _sample_process(run, tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "ema.safetensors" in lines[-1] and "y_embedder.weight" in lines[-1]
    assert not list((tmp_path / "out").rglob("*.png")) and not list((tmp_path / "out").rglob("*.npz"))


def test_a_velocity_that_blows_up_is_refused_naming_the_step(trained_run, tmp_path):
    """Finite weights whose output overflows after a few steps (a final bias of 1e30): one error line naming the
    step, exit 2, no part, PNG or samples.npz for the batch."""
    run = _with_ema_tensor(trained_run, tmp_path / "run", "final_layer.linear.bias", 1e30)
    proc = _sample_process(run, tmp_path / "out", "--sampler", "ode", "--steps", "20")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: images 0..3: ") and "Traceback" not in proc.stderr, \
        proc.stderr
    assert "NaN or infinite" in lines[-1]
    assert not list((tmp_path / "out").rglob("*.png")) and not list((tmp_path / "out").rglob("*.npz"))
