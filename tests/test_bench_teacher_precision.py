"""tools.bench.teacher_precision: the relative L2 formula and a tiny run of the measurement (no timing asserted)."""

import json

import numpy as np
import pytest
import torch


def test_relative_l2_against_numpy():
    from tools.bench.teacher_precision import relative_l2

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5, 7)), rng.standard_normal((3, 5, 7))
    assert relative_l2(torch.from_numpy(a).half(), torch.from_numpy(b).half()) == pytest.approx(
        np.linalg.norm(a.astype(np.float16).astype(np.float64) - b.astype(np.float16).astype(np.float64))
        / np.linalg.norm(b.astype(np.float16).astype(np.float64)), rel=1e-12)
    assert relative_l2(torch.from_numpy(b), torch.from_numpy(b)) == 0.0


def test_bench_teacher_precision_measures_fp16_tokens_and_loss_differences(tmp_path, capsys):
    """The tiny teacher on 4 images: float16-autocast tokens differ from float32 ones by a small, non-zero
    relative L2, and the loss differences it reports are those of trainer.losses on the two token sets."""
    from tools.bench import teacher_precision as tp

    assert tp.main(["--out", str(tmp_path), "--teacher", "tiny", "--images", "4", "--resolution", "64"]) == 0
    r = json.loads((tmp_path / "bench_teacher_precision.json").read_text())["result"]
    assert 0 < r["relative_l2"] < 1e-2 and r["test"] == "fp16" and r["token_shape"] == [16, 96]
    e = r["losses"]["aligned"]
    assert e["align"] < -0.1 and 0 < e["align_abs_err"] < 1e-3 * abs(e["align"])
    assert "fp16 autocast against tf32: relative L2" in capsys.readouterr().out
