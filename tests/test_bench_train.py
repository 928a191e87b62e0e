"""tools.bench.train: the four variants run the trainer's step and their throughput ratios (no timing asserted)."""

import json

import pytest


def test_throughput_ratios_are_throughput_over_throughput():
    from tools.bench.train import throughput_ratios

    row = {"loop_s": 2.0, "limit_s": 1.0, "online_s": 8.0, "repa_s": 4.0}
    r = throughput_ratios(row, 4)
    assert r["loop_img_s"] == 2.0 and r["repa_img_s"] == 1.0
    assert r["loop_vs_limit"] == 0.5 and r["online_vs_loop"] == 0.25 and r["repa_vs_loop"] == 0.5
    assert "repa_vs_loop" not in throughput_ratios({"loop_s": 1.0, "limit_s": 1.0}, 1)


@pytest.mark.slow
def test_bench_train_runs_repas_arrangement_as_variant_d(tmp_path, capsys):
    from tools.bench import train

    assert train.main(["--out", str(tmp_path), "--models", "tiny", "--batch-sizes", "4", "--steps", "1", "--warmup",
                       "1", "--rounds", "1", "--resolution", "64", "--device", "cpu", "--loader-workers", "1"]) == 0
    row = json.loads((tmp_path / "bench_train.json").read_text())["results"][0]
    assert row["repa_img_s"] > 0 and row["online_img_s"] > 0
    assert row["repa_vs_loop"] == pytest.approx(row["repa_img_s"] / row["loop_img_s"])
    assert row["online_vs_loop"] == pytest.approx(row["online_img_s"] / row["loop_img_s"])
    out = capsys.readouterr().out
    assert "(d) repa" in out and "(c)/(a)" in out and "(d)/(a)" in out
