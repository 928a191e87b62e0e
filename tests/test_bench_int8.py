"""tools/bench/int8.py: its figures come from the data (cosines of known perturbations, loss errors of
identical tokens, the rules against cache.quant, the synthetic teacher's construction, the storage table
from the layout), and the whole bench runs on tiny shapes. No timing is asserted."""

import json
import math

import numpy as np
import pytest
import torch

import cache
from cache import zarr_layout
from cache.quant import channel_scales, dequantize_tokens, quantize_tokens
from tools.bench import int8 as b

TINY = b.BenchInt8Config(tokens=16, dim=64, rank=8, outliers=2, group=32, synthetic_images=6, calibration_images=4,
                         loss_batch=4)


def test_token_cosines_of_known_perturbations():
    e1, e2 = torch.eye(4, dtype=torch.float64)[0], torch.eye(4, dtype=torch.float64)[1]
    a = torch.stack([e1, e1, 3 * e1, torch.zeros(4)])
    t = 0.01
    ref = torch.stack([e1, e1 + t * e2, e1, torch.zeros(4)])
    cos = b.token_cosines(a.view(1, 4, 4), ref.view(1, 4, 4))
    assert cos.dtype == torch.float64
    assert cos.tolist() == pytest.approx([1.0, 1 / math.sqrt(1 + t * t), 1.0, 1.0], abs=1e-15)
    stats = b.cosine_stats(ref[:3].view(1, 3, 4), a[:3].view(1, 3, 4))
    assert stats["cos_min"] == pytest.approx(1 / math.sqrt(1 + t * t)) and stats["tokens"] == 3


def test_loss_errors_are_zero_for_identical_tokens_and_follow_a_perturbation():
    ref = torch.randn(6, 16, 32, generator=torch.Generator().manual_seed(0)).half()
    students = b.make_students(ref, cos=0.6, noise=0.5, seed=0)
    same = b.loss_errors(students, ref.float(), ref, batch=4)
    for s in same.values():
        assert s["align_rel_err"] == 0 and s["manifold_rel_err"] == 0
    # the aligned student is aligned, the random one is not: losses of the size the goals are about
    align, manifold = b.urepa_losses(students["aligned"], ref, batch=4)
    assert -0.7 < align < -0.4 and manifold > 0
    assert abs(b.urepa_losses(students["random"], ref, batch=6)[0]) < 0.05
    # the batch size of the evaluation does not change the losses (means per image)
    assert b.urepa_losses(students["aligned"], ref, batch=5) == pytest.approx((align, manifold), rel=1e-12)
    moved = b.loss_errors(students, ref.float() * 1.5 + 0.1, ref, batch=4)
    assert moved["aligned"]["align_rel_err"] > 0 and moved["aligned"]["manifold_rel_err"] > 0


def test_rules_against_cache_quant():
    x = torch.from_numpy(b.SyntheticTeacher(tokens=16, dim=64, rank=8, outliers=2, outlier_scale=30).sample(4, seed=1))
    q, s = quantize_tokens(x)
    assert torch.equal(b.absmax(x, x, TINY), dequantize_tokens(q, s))
    whole = b.BenchInt8Config(tokens=16, dim=64, rank=8, outliers=2, group=64)
    assert torch.equal(b.grouped(x, x, whole), b.absmax(x, x, whole))  # one group = one scale per token
    # clipping far above the largest value changes nothing; the per-channel pre-scaling with unit channel
    # scales is absmax again
    assert torch.allclose(b.clipped(x, x, b.BenchInt8Config(clip=1e6)), b.absmax(x, x, TINY))
    assert torch.allclose(b.prescale(x, torch.ones(1, 1, 64), TINY), b.absmax(x, x, TINY))
    # the outlier rule keeps exactly the heavy channels in float16
    kept = b.outlier_fp16(x, x, TINY)
    channels = b.SyntheticTeacher(tokens=16, dim=64, rank=8, outliers=2, outlier_scale=30).outlier_channels
    assert torch.equal(kept[..., channels], x[..., channels].half().float())
    # on an outlier-heavy set, pre-scaling and fp16 outliers beat absmax
    cos = {name: b.cosine_stats(rule(x, x, TINY), x)["cos_mean"] for name, (rule, _, _) in b.RULES.items()}
    assert cos["prescale"] > cos["absmax"] and cos["outlier-fp16"] > cos["absmax"] and cos["cache"] > cos["absmax"]
    c = channel_scales(x)  # the cache's rule is cache.quant with the calibration's channel scales
    assert torch.equal(b.cache_rule(x, x, TINY), dequantize_tokens(*quantize_tokens(x, c), c))
    assert b.bytes_ratio("absmax", 768, TINY) == pytest.approx(772 / 1536)
    assert b.bytes_ratio("group", 768, b.BenchInt8Config(group=128)) == pytest.approx((768 + 24) / 1536)


def test_synthetic_teacher_is_built_as_documented():
    t = b.SyntheticTeacher(tokens=32, dim=64, rank=6, outliers=0, noise=0.0, gain_std=0.0, bias_std=0.0)
    x = t.sample(5, seed=3)
    assert x.shape == (5, 32, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(-1), 0, atol=1e-5)  # per-token standardisation
    np.testing.assert_allclose(x.std(-1), 1, atol=1e-4)
    sv = np.linalg.svd(x.reshape(-1, 64).astype(np.float64), compute_uv=False)
    assert sv[6] < 1e-4 * sv[0]  # rank 6 signal (centring keeps it within the span)
    np.testing.assert_array_equal(t.sample(5, seed=3), x)  # a pure function of the seeds
    assert not np.array_equal(t.sample(5, seed=4), x)
    heavy = b.SyntheticTeacher(tokens=32, dim=64, rank=6, outliers=2, outlier_scale=20).sample(5, seed=3)
    rms = np.sqrt((heavy.astype(np.float64) ** 2).mean((0, 1)))
    channels = b.SyntheticTeacher(tokens=32, dim=64, rank=6, outliers=2, outlier_scale=20).outlier_channels
    assert set(np.argsort(rms)[-2:]) == set(channels) and rms[channels].min() > 5 * np.median(rms)


def test_storage_table_follows_the_layout():
    table = b.storage_table(rows=1000, resolutions=(256,))
    cell = {(r["variants"], r["dtype"]): r["bytes"] for r in table}
    fp16, int8, mirrored = cell[(1, "fp16")], cell[(1, "int8")], cell[(2, "fp16")]
    index = 4 * (16 * 16 + 4)  # 4 shards of 256 rows, each with an index of 16 chunks
    assert fp16["DINOv2-B"] == 1008 * 256 * 768 * 2 + index  # rows padded to whole chunks of 16
    assert int8["DINOv2-B"] == 1008 * 256 * (768 + 4) + 2 * index  # values and scales
    assert fp16["SD-VAE moments"] == 1008 * 8 * 32 * 32 * 2 + index
    assert mirrored["DINOv2-L"] == 2 * 1008 * 256 * 1024 * 2 + index
    assert int8["DINOv2-B"] / fp16["DINOv2-B"] <= 0.52
    layout = zarr_layout(num_rows=1000, resolution=256, variants=1, teachers={"vit_base_patch14_dinov2.lvd142m": (256, 768)})
    assert fp16["DINOv2-B"] == cache.ZarrStorage.of(layout).nbytes(layout)["features/vit_base_patch14_dinov2.lvd142m"]
    assert "| DINOv2-B |" in b.storage_markdown(table)


def test_the_whole_bench_on_tiny_shapes(tmp_path, capsys):
    rc = b.main(["--out", str(tmp_path), "--teacher", "tiny", "--resolution", "32", "--images", "6",
                 "--build-batch", "3", "--device", "cpu", "--synthetic-images", "4", "--tokens", "8", "--dim", "32",
                 "--rank", "4", "--outliers", "2", "--outlier-scales", "0", "20", "--group", "16",
                 "--calibration-images", "2", "--loss-batch", "2", "--rows", "40", "--loader-batch", "8",
                 "--loader-workers", "2", "--rounds", "1"])
    assert rc == 0
    report = json.loads((tmp_path / "bench_int8.json").read_text())
    teacher = report["teacher"]
    assert teacher["built_int8_vs_requantised_fp16_max_steps"] <= 1  # both builds encoded the same tokens
    built = teacher["rules"]["cache (built)"]
    assert 0.99 < built["cos_min"] <= built["cos_mean"] <= 1
    assert 0.5 < teacher["bytes_on_disk"]["ratio"] < 1
    assert [r["teacher"]["outlier_scale"] for r in report["synthetic"]] == [0, 20]
    assert report["synthetic"][0]["fp16_vs_fp32"]["cos_min"] > 0.9999
    assert set(report["loader"]["variants"]) == {"fp16", "int8", "int8 dequantize"}
    assert 0.5 < report["loader"]["bytes_on_disk"]["features_ratio"] < 0.7  # zarr.json weighs in at 8 x 32
    printed = capsys.readouterr().out
    assert "| absmax |" in printed and "| cache |" in printed


def test_bench_train_reads_an_int8_cache(tmp_path):
    """tools.bench.train --feature-dtypes int8: the loop reads int8 values and scales, the in-memory step
    holds them resident, and both run the trainer's step (which dequantises)."""
    from tools.bench import train

    assert train.main(["--out", str(tmp_path), "--models", "tiny", "--batch-sizes", "4", "--feature-dtypes", "fp16",
                       "int8", "--steps", "1", "--warmup", "1", "--rounds", "1", "--resolution", "64",
                       "--skip-online", "--device", "cpu", "--loader-workers", "1"]) == 0
    rows = json.loads((tmp_path / "bench_train.json").read_text())["results"]
    assert [(r["feature_dtype"], r["tokens_read_as"]) for r in rows] == [("fp16", "float16"), ("int8", "int8")]
    assert all(r["loop_img_s"] > 0 and r["limit_img_s"] > 0 for r in rows)
    assert not list(tmp_path.glob("train-cache-*"))  # the synthetic caches are removed
