"""`python -m tools.report`: one page from what training, sampling and evaluation wrote (tools.report)."""

import json

import numpy as np
from PIL import Image

from tools.report import main


def _run_folder(tmp_path, random_weights=True):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000020").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "train": {"model": "tiny", "cache": "/data/c.zarr", "batch_size": 8, "lr": 1e-4, "align_weight": 0.5,
                  "manifold_weight": 3.0},
        "model": {"width": 64, "blocks": [2, 2, 2]},
        "cache": {"rows": 24, "resolution": 64, "teacher": "tiny", "random_weights": random_weights}}))
    rows = [{"step": s, "epoch": s / 3, "loss": 2.0 / s, "loss_v": 1.0 / s, "loss_align": -0.1 * s, "loss_manifold": 0.3,
             "cos": 0.1 * s, "grad_norm": 1.0, "img_per_s": 50.0, "mem_gb": 0.1} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = run / "samples"
    samples.mkdir()
    (samples / "config.json").write_text(json.dumps({
        "samples": {"sampler": "sde", "steps": 250, "cfg": 1.65, "interval": [0.0, 0.7], "labels": "uniform", "seed": 0},
        "model": {"step": 20, "weights": "ema"}, "vae": {"spec": "tiny", "random_weights": True}}))
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(samples / "grid.png")
    return run, samples


def test_report_collects_losses_grids_and_metrics(tmp_path, capsys):
    run, samples = _run_folder(tmp_path)
    (samples / "metrics.json").write_text(json.dumps({
        "fid": 123.456789, "sfid": 45.6, "inception_score": None, "precision": 0.5, "recall": 0.25,
        "num_samples": 64, "reference_kind": "cache", "reference": "/data/c.zarr", "notes": ["no IS here"],
        "protocol": {"inception_score": {"splits": "adm"}, "precision_recall": {"distances": "float16"}}}))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"samples": {"sampler": "ode", "solver": "euler", "nfe": 50,
                                                               "steps": 50, "cfg": 1.0, "quantize": "truncate"}}))
    assert main([str(run), "--samples", str(other)]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    text = open(path).read()
    assert path == str(run / "report" / "report.md")
    assert "Random-weight encoders" in text and "![loss curves](losses.png)" in text
    assert (run / "report" / "losses.png").stat().st_size > 1000 and (run / "report" / "grid-0.png").exists()
    assert "| 123.5 | 45.6 | n/a | 0.5 | 0.25 | 64 |" in text and "- no IS here" in text
    assert "CFG 1.65 on t in [0.0, 0.7]" in text and "step-00000020" in text
    assert f"## Samples: {other}" in text and "Not evaluated" in text  # the extra folder, without metrics
    assert "ODE (euler), 50 steps (NFE 50), no guidance" in text and "uint8 by truncate" in text
    assert "IS splits: adm; precision/recall distances: float16." in text


def test_report_of_a_folder_without_a_run_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no config.json of a training run" in capsys.readouterr().err
