"""Training loop: cache-only steps, resume (in-process and after SIGKILL), ranks, accumulation, errors."""

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
import torch
from common.formats import as_format
from common.synthetic import synthetic_cache
from conftest import ROOT, _env, run_build
from safetensors.torch import load_file

import cache
from trainer.metrics import read_metrics
from trainer.run import LatentTransform, load_run_model
from trainer.train import (
    PRESETS,
    SetupError,
    TrainConfig,
    main,
    step_noise,
    step_seed,
    train,
)

TINY = dict(model="tiny", batch_size=8, precision="fp32", device="cpu", log_every=1, ckpt_every=2,
            loader_workers=2, tensorboard=False, lr=1e-3)
TINY_ARGS = ["--model", "tiny", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--log-every", "1",
             "--ckpt-every", "2", "--loader-workers", "2", "--no-tensorboard", "--lr", "1e-3"]


def run(cache_path: Path, out: Path, **kw) -> dict:
    return train(TrainConfig(cache=str(cache_path), out=str(out), **{**TINY, **kw}))


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["loss_v"], r["loss_align"], r["loss_manifold"], r["grad_norm"])
            for r in read_metrics(str(out / "metrics.jsonl"))]


def weights(out: Path, kind: str = "model") -> dict[str, torch.Tensor]:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    return load_file(str(ckpts[-1] / f"{kind}.safetensors"))


def test_step_noise_is_a_pure_function_of_seed_and_step():
    a = step_noise(0, 5, 6, (4, 2, 2), torch.device("cpu"))
    b = step_noise(0, 5, 6, (4, 2, 2), torch.device("cpu"))
    c = step_noise(0, 6, 6, (4, 2, 2), torch.device("cpu"))
    for k in a:
        assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])
    assert step_seed(0, 1) != step_seed(1, 0) and 0 <= step_seed(3, 4) < 2**63
    assert ((a["t"] >= 0) & (a["t"] < 1)).all()


def test_latent_transform_samples_against_formula():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)
    moments[:, 4:] = moments[:, 4:].abs()
    noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    x = LatentTransform(scale=0.18215, shift=0.1).encode(moments.half(), noise.float())
    m = moments.half().double()
    ref = (m[:, :4] + m[:, 4:] * noise - 0.1) * 0.18215
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve(preset, capsys):
    assert main(["--preset", preset, "--cache", "c.zarr", "--out", "r", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == PRESETS[preset]["model"]
    if preset == "urepa-xl-256":
        assert (printed["align_weight"], printed["manifold_weight"], printed["lr"], printed["ema_decay"],
                printed["batch_size"], printed["class_dropout"], printed["grad_clip"]) == (0.5, 3.0, 1e-4, 0.9999,
                                                                                          256, 0.1, 1.0)


def test_bad_settings_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        main(["--cache", "c", "--out", "o", "--batch-size", "10", "--grad-accum", "3"])
    assert "not divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cache", "c", "--out", "o", "--model", "nope"])


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "ffcv"])
def test_mismatched_cache_is_a_clear_error(tmp_path, fmt):
    zarr_path = tmp_path / "s.zarr"
    synthetic_cache(zarr_path, n=40, variants=1, skipped=())  # teachers: t_a 6 tokens, t_b 4 tokens; latents 2x2
    synth = as_format(zarr_path, fmt, tmp_path).url
    with pytest.raises(SetupError, match="choose one with --teacher"):
        run(synth, tmp_path / "r0")
    with pytest.raises(SetupError, match="not a square grid"):
        run(synth, tmp_path / "r1", teacher="t_a")
    with pytest.raises(SetupError, match="does not fit the cache"):  # 2x2 latents: no room for a 2x down stage
        run(synth, tmp_path / "r2", teacher="t_b")
    with pytest.raises(SetupError, match="--flip needs"):
        run(synth, tmp_path / "r3", teacher="t_b", flip=True)
    with pytest.raises(SetupError, match="not in the cache"):
        run(synth, tmp_path / "r4", teacher="dinov2")
    assert main(["--cache", str(synth), "--out", str(tmp_path / "r5"), *TINY_ARGS, "--teacher", "t_a"]) == 2


def test_training_never_constructs_an_encoder(built_cache, tmp_path, monkeypatch):
    import diffusers
    import timm
    import timm.models.vision_transformer as vit

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was constructed during training")

    monkeypatch.setattr(diffusers.AutoencoderKL, "__init__", refuse)
    monkeypatch.setattr(vit.VisionTransformer, "__init__", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    result = run(built_cache, tmp_path / "run", steps=2)
    assert result["step"] == 2 and result["metrics"]["loss"] > 0


def test_outputs_and_resume_extends_to_more_steps(built_cache, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run(built_cache, full, steps=6, tensorboard=True)
    run(built_cache, part, steps=3, tensorboard=True)
    assert [r[0] for r in losses(part)] == [1, 2, 3]
    run(built_cache, part, steps=6, tensorboard=True)  # continues from the checkpoint at step 3
    assert losses(part) == losses(full)
    for kind in ("model", "ema"):
        a, b = weights(full, kind), weights(part, kind)
        assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["train"]["steps"] == 6 and cfg["model"]["teacher_dim"] == 96 and cfg["cache"]["random_weights"]
    assert (full / "losses.png").stat().st_size > 1000 and (full / "log.txt").exists()
    assert any((full / "tensorboard").iterdir())
    row = read_metrics(str(full / "metrics.jsonl"))[-1]
    assert {"loss_v", "loss_align", "loss_manifold", "cos", "grad_norm", "img_per_s", "mem_gb"} <= set(row)
    assert len(list((full / "checkpoints").glob("step-*"))) == 2  # keep_ckpts
    model, run_cfg = load_run_model(str(full))
    ema = weights(full, "ema")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    v, proj = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 4]))
    assert v.shape == (2, 4, 8, 8) and proj.shape == (2, 16, 96) and run_cfg.to_dict()["train"]["steps"] == 6


def test_a_changed_setting_is_refused_by_name(built_cache, tmp_path):
    run(built_cache, tmp_path / "r", steps=2)
    with pytest.raises(SetupError, match=r"train\.lr: 0\.001 -> 0\.002"):
        run(built_cache, tmp_path / "r", steps=4, lr=2e-3)
    assert losses(tmp_path / "r")[-1][0] == 2  # nothing was touched


def test_gradient_accumulation_matches_one_big_batch(built_cache, tmp_path):
    run(built_cache, tmp_path / "a1", steps=2, grad_accum=1)
    run(built_cache, tmp_path / "a2", steps=2, grad_accum=2)
    a, b = weights(tmp_path / "a1"), weights(tmp_path / "a2")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r[1:] for r in losses(tmp_path / "a1")], [r[1:] for r in losses(tmp_path / "a2")],
                               rtol=1e-4)


def test_repa_setting_and_no_alignment(built_cache, tmp_path):
    r = run(built_cache, tmp_path / "repa", steps=1, manifold_weight=0.0, model="tiny")
    assert r["metrics"]["loss"] == pytest.approx(r["metrics"]["loss_v"] + 0.5 * r["metrics"]["loss_align"], rel=1e-5)
    r = run(built_cache, tmp_path / "plain", steps=1, align_weight=0.0)
    assert r["metrics"]["loss"] == pytest.approx(r["metrics"]["loss_v"]) and r["metrics"]["loss_align"] == 0


def test_flip_and_cross_sample_options(built_cache, tmp_path):
    r = run(built_cache, tmp_path / "f", steps=2, flip=True, cross_sample=True, upsample="nearest")
    assert r["step"] == 2 and np.isfinite(r["metrics"]["loss_manifold"])


@pytest.fixture(scope="module")
def few_samples(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("few") / "c.zarr"
    run_build(image_folder, out, "--limit", "8")
    assert len(cache.open_cache(out)) == 8
    return out


def test_tiny_model_overfits_a_few_samples(few_samples, tmp_path):
    """8 samples, 400 steps: the total and the velocity loss fall by more than 2x, the token cosine
    rises by more than 0.2. (The tiny model's 2x2 middle grid, bilinearly upsampled to the 4x4 teacher
    grid, cannot match every token: the cosine plateaus near 0.4 at this size.)"""
    run(few_samples, tmp_path / "o", steps=400, lr=2e-3, class_dropout=0.0, log_every=1, ckpt_every=400)
    rows = read_metrics(str(tmp_path / "o" / "metrics.jsonl"))

    def mean(key: str, part: slice) -> float:
        return float(np.mean([r[key] for r in rows[part]]))

    first, last = slice(0, 20), slice(-20, None)
    assert mean("loss", last) < mean("loss", first) / 2
    assert mean("loss_v", last) < mean("loss_v", first) / 2
    assert mean("cos", last) > mean("cos", first) + 0.2


def _cli(cache_path: Path, out: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
    return (launcher or [sys.executable]) + ["-m", "trainer.train", "--cache", str(cache_path), "--out", str(out),
                                              *TINY_ARGS, *extra]


@pytest.mark.slow
def test_sigkill_resume_repeats_the_same_losses(built_cache, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(built_cache, ref, "--steps", "12"), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=600)
    for kill_after in (3, 8):  # kill twice: between checkpoints, then again later
        proc = subprocess.Popen(_cli(built_cache, killed, "--steps", "12"), cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and len(read_metrics(str(killed / "metrics.jsonl"))) < kill_after:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(losses(killed)) < 12
    subprocess.run(_cli(built_cache, killed, "--steps", "12"), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=600)
    assert losses(killed) == losses(ref) and len(losses(ref)) == 12
    a, b = weights(ref, "ema"), weights(killed, "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_at_the_same_global_batch(built_cache, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(built_cache, one, "--steps", "4"), cwd=ROOT, env=_env(), check=True, capture_output=True,
                   timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631"]
    proc = subprocess.run(_cli(built_cache, two, "--steps", "4", launcher=torchrun), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r[1:] for r in losses(one)], [r[1:] for r in losses(two)], rtol=1e-4)


@pytest.mark.slow
def test_compiled_step_matches_eager(built_cache, tmp_path):
    """--compile (inductor, CPU here) runs the same step: same losses and weights to float32 rounding."""
    run(built_cache, tmp_path / "eager", steps=2)
    run(built_cache, tmp_path / "compiled", steps=2, compile=True)
    np.testing.assert_allclose([r[1:] for r in losses(tmp_path / "eager")],
                               [r[1:] for r in losses(tmp_path / "compiled")], rtol=1e-3)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    # Adam divides by sqrt(v) + 1e-8: where a gradient is near that scale, float rounding moves the update by a
    # fraction of lr (1e-3). So: all but a few elements to rtol 1e-3 / atol 1e-5, and those few within 0.1 lr.
    for k in a:
        close = torch.isclose(a[k], b[k], rtol=1e-3, atol=1e-5)
        assert (~close).float().mean() < 1e-3, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def int8_cache(image_folder, tmp_path_factory) -> Path:
    """built_cache's settings with the teacher's tokens stored as int8 (one float32 scale per token)."""
    out = tmp_path_factory.mktemp("int8") / "c.zarr"
    run_build(image_folder, out, "--flip", "both", "--feature-dtype", "int8")
    return out


def test_int8_cache_trains_with_the_float16_losses(built_cache, int8_cache, tmp_path):
    """The tiny model trained from the int8 cache (dequantised inside the step) logs the float16 cache's losses
    to the stated tolerance: relative error <= 1e-3 for the total and manifold losses. The alignment loss
    (minus the mean token cosine) is near 0 at initialisation, where a relative error means nothing: its
    error is bounded absolutely, by 1e-3 of the cosine's unit scale (1e-4 at the first step, where both runs
    still have the same weights and only the tokens differ)."""
    assert cache.open_cache(int8_cache).features["tiny"].dtype == np.int8
    run(built_cache, tmp_path / "fp16", steps=6, flip=True)
    run(int8_cache, tmp_path / "int8", steps=6, flip=True)
    a, b = np.array(losses(tmp_path / "fp16")), np.array(losses(tmp_path / "int8"))
    assert a.shape == b.shape == (6, 6)
    for col, name in ((1, "loss"), (4, "loss_manifold")):
        rel = np.abs(b[:, col] - a[:, col]) / np.abs(a[:, col])
        assert rel.max() <= 1e-3, (name, rel)
    assert np.abs(b[:, 3] - a[:, 3]).max() <= 1e-3 and abs(b[0, 3] - a[0, 3]) <= 1e-4, np.abs(b[:, 3] - a[:, 3])
    assert not np.array_equal(a[:, 3], b[:, 3])  # the int8 tokens really were read


def test_int8_compiled_step_matches_eager(int8_cache, tmp_path):
    """The dequantisation inside the compiled step (inductor, CPU here) gives the eager step's losses."""
    run(int8_cache, tmp_path / "eager", steps=2)
    run(int8_cache, tmp_path / "compiled", steps=2, compile=True)
    np.testing.assert_allclose([r[1:] for r in losses(tmp_path / "eager")],
                               [r[1:] for r in losses(tmp_path / "compiled")], rtol=1e-3)


# ------------------------------------------------------------------------------------------
# fp16: float16 autocast with REPA's dynamic gradient scaler (CPU autocast runs float16 too)


def _scaler_with(monkeypatch, **kw) -> None:
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, **kw))


def test_fp16_resume_equals_an_uninterrupted_run_scaler_included(built_cache, tmp_path, monkeypatch):
    """The scale doubles after every clean step here (growth_interval 1), so a resume that lost the scaler's
    state would log another scale from step 3 on."""
    _scaler_with(monkeypatch, growth_interval=1)
    full, part = tmp_path / "full", tmp_path / "part"
    run(built_cache, full, steps=4, precision="fp16")
    run(built_cache, part, steps=2, precision="fp16")
    run(built_cache, part, steps=4, precision="fp16")
    def rows(out: Path) -> list[dict]:  # every logged number but the timings
        return [{k: v for k, v in r.items() if k not in ("img_per_s", "mem_gb")}
                for r in read_metrics(str(out / "metrics.jsonl"))]

    rows_full = rows(full)
    assert rows(part) == rows_full and len(rows_full) == 4
    assert len({r["loss_scale"] for r in rows_full}) > 2  # the scale moved at every step
    for kind in ("model", "ema"):
        a, b = weights(full, kind), weights(part, kind)
        assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((full / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] == rows_full[-1]["loss_scale"]
    assert state["skipped_overflow"] == rows_full[-1]["skipped_overflow"]


def test_fp16_overflow_steps_are_skipped_and_counted_not_failures(built_cache, tmp_path, monkeypatch):
    """At a loss scale of 2^100 every float16 gradient overflows: the steps are skipped (no update), counted and
    logged, the scale halves each time, and the run ends normally with a finite checkpoint."""
    _scaler_with(monkeypatch, init_scale=2.0 ** 100)
    out = tmp_path / "r"
    result = run(built_cache, out, steps=3, precision="fp16", ckpt_every=3)
    assert result["step"] == 3 and result["metrics"]["skipped_nonfinite"] == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["skipped_overflow"] for r in rows] == [1, 2, 3]
    assert [r["loss_scale"] for r in rows] == [2.0 ** 99, 2.0 ** 98, 2.0 ** 97]
    assert all("loss" not in r for r in rows)  # no applied step in any window
    ema, raw = weights(out, "ema"), weights(out, "model")
    assert all(torch.equal(ema[k], raw[k]) for k in raw)  # nothing was ever applied: EMA == raw == init
    log = (out / "log.txt").read_text()
    assert "skipped by the fp16 gradient scaler" in log and "not finite" not in log
    assert json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())["skipped_overflow"] == 3


def test_fp16_nonfinite_loss_is_still_a_failure(built_cache, tmp_path, monkeypatch, capsys):
    """A NaN loss under fp16 is not an overflow: the guard stops the run as in every precision."""
    import trainer.train as tt

    real = tt.velocity_loss
    monkeypatch.setattr(tt, "velocity_loss", lambda v, target: real(v, target) * float("nan"))
    assert main(["--cache", str(built_cache), "--out", str(tmp_path / "r"), "--steps", "2",
                 *[a if a != "fp32" else "fp16" for a in TINY_ARGS]]) == 2
    assert "step 1: the loss or the gradient norm is not finite" in capsys.readouterr().err


def test_a_run_from_before_bias_free_resampling_resumes_and_samples(built_cache, tmp_path, monkeypatch, capsys):
    """A run recorded without ``resample_bias`` had biased down/up convolutions: it resumes and loads with them; a
    record that contradicts its weights is refused naming the field."""
    import dataclasses as dc

    from trainer import models
    from trainer.run import CheckpointError

    out = tmp_path / "old"
    with monkeypatch.context() as m:  # the code before this change: biased convolutions, no field in the record
        m.setitem(models.MODEL_PRESETS, "tiny", dc.replace(models.MODEL_PRESETS["tiny"], resample_bias=True))
        run(built_cache, out, steps=2)
    record = json.loads((out / "config.json").read_text())
    del record["model"]["resample_bias"]
    (out / "config.json").write_text(json.dumps(record))
    assert "down.conv.bias" in weights(out)
    run(built_cache, out, steps=4)  # resumes with the biases (no "changed setting" refusal)
    assert "down.conv.bias" in weights(out) and losses(out)[-1][0] == 4
    assert json.loads((out / "config.json").read_text())["model"]["resample_bias"] is True
    record["model"]["resample_bias"] = False  # a record contradicting its weights
    (out / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r'has down/up convolution biases .* "resample_bias": false: set it '
                                              r'to true'):
        load_run_model(str(out))
    del record["model"]["resample_bias"]
    (out / "config.json").write_text(json.dumps(record))
    model, _ = load_run_model(str(out))
    assert model.config.resample_bias and model.down.conv.bias is not None


def _edit_channel_scales(src: Path, dst: Path, factor: float) -> None:
    """A copy of the int8 zarr cache ``src`` whose teacher's first channel scale is multiplied by ``factor``
    (still a scale the build could write: >= 1 and finite)."""
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "zarr.json").read_text())
    record = meta["attributes"]["urepa_cache"]["teachers"]["tiny"]
    record["channel_scales"][0] = record["channel_scales"][0] * factor
    (dst / "zarr.json").write_text(json.dumps(meta))


def test_resume_refuses_a_cache_whose_teacher_is_stored_otherwise(built_cache, int8_cache, tmp_path):
    """The run's record names the teacher's stored dtype and channel scales: a resume on the int8 copy of a
    float16 cache, or on an int8 cache whose channel scales differ, is refused by name; the same cache resumes."""
    run(int8_cache, tmp_path / "r", steps=2, flip=True)
    record = json.loads((tmp_path / "r" / "config.json").read_text())["cache"]
    assert record["teacher_dtype"] == "int8"
    np.testing.assert_array_equal(record["teacher_channel_scales"], cache.open_cache(int8_cache).channel_scales("tiny"))
    with pytest.raises(SetupError, match=r"cache\.teacher_dtype: 'int8' -> 'float16'"):
        run(built_cache, tmp_path / "r", steps=4, flip=True)
    _edit_channel_scales(int8_cache, tmp_path / "scaled.zarr", 2.0)
    with pytest.raises(SetupError, match=r"cache\.teacher_channel_scales: 96 -> 96 items: \S+ became \S+ at position 0"):
        run(tmp_path / "scaled.zarr", tmp_path / "r", steps=4, flip=True)
    assert run(int8_cache, tmp_path / "r", steps=4, flip=True)["step"] == 4


def test_an_older_run_record_without_the_teacher_storage_resumes_and_then_keeps_it(built_cache, int8_cache, tmp_path):
    """A record written before the teacher's dtype and channel scales were kept does not say what the run read: it
    resumes on its cache, and the rewritten record holds them, so the next resume on another storage is refused."""
    run(built_cache, tmp_path / "r", steps=2, flip=True)
    path = tmp_path / "r" / "config.json"
    old = json.loads(path.read_text())
    for key in ("teacher_dtype", "teacher_channel_scales"):
        del old["cache"][key]
    path.write_text(json.dumps(old))
    assert main(["--cache", str(built_cache), "--out", str(tmp_path / "r"), *TINY_ARGS, "--flip", "--steps", "4"]) == 0
    assert json.loads(path.read_text())["cache"]["teacher_dtype"] == "float16"
    with pytest.raises(SetupError, match="teacher_dtype: 'float16' -> 'int8'"):
        run(int8_cache, tmp_path / "r", steps=6, flip=True)


def test_block_order_resumes_exactly_and_its_settings_are_kept(built_cache, tmp_path):
    blocks = dict(order="blocks", shuffle_window=8)
    run(built_cache, tmp_path / "full", steps=5, **blocks)
    run(built_cache, tmp_path / "part", steps=2, **blocks)
    run(built_cache, tmp_path / "part", steps=5, **blocks)  # resumes at step 2, inside the first epoch
    assert losses(tmp_path / "part") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 5
    run(built_cache, tmp_path / "perm", steps=2)
    assert losses(tmp_path / "perm")[:2] != losses(tmp_path / "full")[:2]  # another order: other samples
    record = json.loads((tmp_path / "full" / "config.json").read_text())["train"]
    assert (record["order"], record["shuffle_window"], record["ranks"]) == ("blocks", 8, 1)

    with pytest.raises(SetupError, match=r"train\.shuffle_window: 8 -> 16"):
        run(built_cache, tmp_path / "part", steps=6, order="blocks", shuffle_window=16)
    with pytest.raises(SetupError, match=r"train\.order: 'blocks' -> 'permutation'"):
        run(built_cache, tmp_path / "part", steps=6)
    path = tmp_path / "part" / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "train": {**saved["train"], "ranks": 2}}))
    with pytest.raises(SetupError, match=r"--order blocks on 2 rank\(s\), and this run has 1"):
        run(built_cache, tmp_path / "part", steps=6, **blocks)
    assert losses(tmp_path / "part")[-1][0] == 5  # nothing was touched

    # the permutation ignores the window; a record from before these settings resumes as the permutation
    run(built_cache, tmp_path / "perm", steps=3, shuffle_window=16)
    path = tmp_path / "perm" / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "train": {k: v for k, v in saved["train"].items()
                                                   if k not in ("order", "shuffle_window")}}))
    run(built_cache, tmp_path / "perm", steps=4)
    with pytest.raises(SetupError, match=r"train\.order"):
        run(built_cache, tmp_path / "perm", steps=5, **blocks)
