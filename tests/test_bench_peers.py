"""``make bench-peers`` (tools/bench/peers.py) at its smallest, for our formats, the .npy-per-sample peer and
the raw read (mosaicml-streaming and LitData only where their venv exists: the bench skips a peer it
cannot import), float16 and int8 rows, warm only (a cold epoch drops the machine's page cache): so the
bench cannot rot. No timing is asserted; every contender's epoch checks its own batches (each row once,
each row's own tokens and label) and fails the run otherwise."""

from __future__ import annotations

import json

import pytest

from tools.bench import peer_run, peers

pytestmark = pytest.mark.slow


def test_bench_peers_smallest_setting_runs_and_reports_every_contender(tmp_path, capsys):
    ours = ["raw", "zarr", "hdf5", "ffcv", "npy"]
    argv = ["--out", str(tmp_path), "--rows", "24", "--tokens", "4", "--dim", "8", "--batch", "8", "--workers", "2",
            "--warm", "1", "--cold", "0", "--int8", "--contenders", ",".join(ours)]
    assert peers.main(argv) == 0
    report = json.loads((tmp_path / "bench_peers.json").read_text())
    assert [r["dtype"] for r in report["results"]] == ["float16", "int8"]
    for res in report["results"]:
        for c in ours:
            (run,) = res["runs"]["warm"][c]
            assert run["samples"] == 24 and run["seconds"] > 0, (res["dtype"], c, run)
            if c != "raw":  # tokens, latents, scales (int8) and the label of every row
                per_row = 4 * 8 * (2 if res["dtype"] == "float16" else 1) + 8 * 32 * 32 * 2 + 8
                per_row += 4 * 4 if res["dtype"] == "int8" else 0
                assert run["bytes"] == 24 * per_row, (res["dtype"], c, run)
        assert res["cold"] == {}
    out = capsys.readouterr().out
    assert "| our loader, FFCV |" in out and "| one .npy per sample" in out


def test_a_contender_that_hands_out_wrong_rows_fails_the_run(tmp_path, monkeypatch):
    peers.main(["--out", str(tmp_path), "--rows", "8", "--tokens", "2", "--dim", "4", "--batch", "4", "--warm", "0",
                "--cold", "0", "--contenders", "zarr"])
    data = tmp_path / "peers" / "float16"
    rows = peer_run.rows_of(data)
    good = peer_run.batches

    def shifted(*a, **kw):
        for b in good(*a, **kw):
            yield {**b, "index": (b["index"] + 1) % 8}

    monkeypatch.setattr(peer_run, "batches", shifted)
    with pytest.raises(SystemExit, match="not the ones its index names"):
        peer_run.run_epoch("zarr", data, seed=0, batch=4, workers=1, rows=rows)
