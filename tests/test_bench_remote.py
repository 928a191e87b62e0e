"""tools.bench.remote end to end at a tiny size: it starts its own server, every contender reads the same
rows, and the report holds each contender's rate and the ratios (the figures themselves are in
docs/benchmarks.md; nothing here asserts a speed). The peers (mosaicml-streaming, LitData) run where their
venv exists (``UREPA_PEERS_PYTHON``, else ``.venv-peers/bin/python``: ``make bench-remote`` builds it);
without it the bench skips them and says so."""

import json
import os
from pathlib import Path

import pytest

from tools.bench import remote

pytestmark = [pytest.mark.remote, pytest.mark.slow]
pytest.importorskip("obstore", reason="obstore is not installed (the remote extra)")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--rows", "48", "--batch", "8", "--rounds", "1", "--chunk-rows", "4", "--shard-rows", "16", "--window", "16",
        "--zarr-rows", "8"]


@pytest.fixture
def weed():
    from common.s3 import weed_binary

    if weed_binary() is None:
        pytest.skip("no SeaweedFS `weed` binary")


def _peers_python() -> str | None:
    python = os.environ.get("UREPA_PEERS_PYTHON") or str(ROOT / ".venv-peers" / "bin" / "python")
    return python if Path(python).exists() else None


def test_bench_remote_runs_every_contender_on_the_same_rows(tmp_path, capsys, weed):
    assert remote.main([*ARGS, "--dtypes", "int8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_remote.json").read_text())
    (res,) = report["results"]
    c = res["contenders"]
    assert len(c) == 7 and all(v["samples_s"] > 0 and v["MBps"] > 0 for v in c.values())
    assert all(v["client_cpu_s"] >= 0 and v["server_cpu_s"] >= 0 for v in c.values())
    full = {k: v["samples"] for k, v in c.items() if not k.startswith("(d)")}
    assert set(full.values()) == {48}  # one epoch of the same rows each
    assert c["(d) S3, zarr-python's own path"]["samples"] == 8
    assert "block order / raw chunks (a/b)" in res["ratios"]
    assert report["peers_skipped"] and all("no --peers-python" in s for s in report["peers_skipped"])
    out = capsys.readouterr()
    assert "| (a) S3, our loader, block order |" in out.out
    assert "streaming: skipped, no --peers-python" in out.err
    assert [p.name for p in tmp_path.iterdir()] == ["bench_remote.json"]  # the server and caches are gone


def test_bench_remote_measures_the_peers_from_the_same_bucket(tmp_path, weed):
    """(e) mosaicml-streaming and (f) LitData, each written in its own format into the bucket and read back
    in its own process: every row once, each checked against its index (peer_run fails the run otherwise)."""
    python = _peers_python()
    if python is None:
        pytest.skip("no peers venv (UREPA_PEERS_PYTHON or .venv-peers: make bench-remote builds it)")
    assert remote.main([*ARGS, "--dtypes", "float16", "--workers", "2", "--peers-python", python,
                        "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_remote.json").read_text())
    assert report["peers_skipped"] == []
    (res,) = report["results"]
    c = res["contenders"]
    for name in ("(e) S3, mosaicml-streaming StreamingDataset", "(f) S3, LitData StreamingDataset"):
        assert c[name]["samples"] == 48 and c[name]["samples_s"] > 0 and c[name]["client_cpu_s"] > 0
    assert res["best_peer"] in c and "block order / best peer (a/e,f)" in res["ratios"]
    assert [p.name for p in tmp_path.iterdir()] == ["bench_remote.json"]
