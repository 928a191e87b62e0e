"""tools.bench.remote end to end at a tiny size: it starts its own server, every contender reads the same
rows, and the report holds each contender's rate and the ratios (the figures themselves are in
docs/benchmarks.md; nothing here asserts a speed)."""

import json

import pytest

from tools.bench import remote

pytestmark = [pytest.mark.remote, pytest.mark.slow]
pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")


def test_bench_remote_runs_every_contender_on_the_same_rows(tmp_path, capsys):
    from common.s3 import weed_binary

    if weed_binary() is None:
        pytest.skip("no SeaweedFS `weed` binary")
    assert remote.main(["--rows", "48", "--batch", "8", "--rounds", "1", "--dtypes", "int8", "--chunk-rows", "4",
                        "--shard-rows", "16", "--window", "16", "--zarr-rows", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_remote.json").read_text())
    (res,) = report["results"]
    c = res["contenders"]
    assert len(c) == 7 and all(v["samples_s"] > 0 and v["MBps"] > 0 for v in c.values())
    full = {k: v["samples"] for k, v in c.items() if not k.startswith("(d)")}
    assert set(full.values()) == {48}  # one epoch of the same rows each
    assert c["(d) S3, zarr-python's own path"]["samples"] == 8
    assert "block order / raw chunks (a/b)" in res["ratios"]
    assert "| (a) S3, our loader, block order |" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["bench_remote.json"]  # the server and caches are gone
