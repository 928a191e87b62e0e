"""Our cache formats against the loaders people use for the same job, on the same rows, side by side.

    python -m tools.bench.peers [--rows 2048] [--warm 5] [--cold 2] [--int8] [--peers-python .venv-peers/bin/python]

Contenders: our loader on zarr, HDF5 and FFCV (and FFCV's own ``Loader`` on the same file, the
format's fallback path); mosaicml-streaming (``StreamingDataset`` + DataLoader);
LitData (``StreamingDataset`` + ``StreamingDataLoader``); one .npy per sample + DataLoader (the fast-DiT /
REPA way); and the limit, a raw sequential read of the rows' files (one thread). The rows: a synthetic
cache of DINOv2-B shape (256 x 768 float16 tokens, 8 x 32 x 32 float16 latents, a label; random values),
written as zarr, converted to HDF5 and FFCV (``cache.convert``), and exported as plain arrays from which
each peer writes its own copy. With ``--int8`` the same again with int8 tokens and their float32
per-token scales.

Each measurement is one contender in its own process (``tools.bench.peer_run``); the contenders take
turns, round after round. Warm: one untimed epoch, then the timed one (the files in the page cache). Cold:
the page cache dropped first (``sync; echo 3 > /proc/sys/vm/drop_caches``, root only; skipped otherwise),
then one timed epoch. Every epoch: batch 256, shuffled, 4 workers (our loader: reader threads; the peers:
DataLoader processes), every batch converted to the same torch tensors and checked to hold the rows its
index names and, over the epoch, every row once. Reported: the median samples/s, MB/s of useful bytes
(tokens, latents, label), CPU seconds per epoch (the process and its workers), and the ratios against
the raw read and against the best peer. The peers are not this project's dependencies: ``make
bench-peers`` installs them into a venv of their own (``.venv-peers``); contenders whose package is
missing are skipped, and said so. Prints a table and writes ``OUT/bench_peers.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache import open_cache
from cache.cli.config import check_fields, config_to_dict, parse_config
from cache.convert import convert
from tools.bench.cache import machine_info, synthetic_cache
from tools.bench.peer_run import OURS, PEERS

ROOT = Path(__file__).resolve().parents[2]
PEER_MODULE = {"streaming": "streaming", "litdata": "litdata", "npy": None}
LABELS = {"raw": "raw sequential read of the row files, 1 thread",
          "zarr": "our loader, zarr", "hdf5": "our loader, HDF5", "ffcv": "our loader, FFCV",
          "ffcv-library": "FFCV's own Loader (our FFCV format, UREPA_IO=library)",
          "streaming": "mosaicml-streaming StreamingDataset + DataLoader",
          "litdata": "LitData StreamingDataset + StreamingDataLoader",
          "npy": "one .npy per sample + DataLoader (fast-DiT / REPA)"}


@dataclass(frozen=True)
class BenchPeersConfig:
    """Our formats against mosaicml-streaming, LitData and one .npy per sample, and the raw read."""

    out: str = field(default="bench-out", metadata={"help": "folder of the data copies and the JSON"})
    rows: int = field(default=2048, metadata={"min": 2, "max": 1_000_000, "help": "rows (DINOv2-B: 400 KiB a row)"})
    tokens: int = field(default=256, metadata={"min": 1, "max": 1 << 16, "help": "teacher tokens per row"})
    dim: int = field(default=768, metadata={"min": 1, "max": 1 << 16, "help": "teacher token width"})
    batch: int = field(default=256, metadata={"min": 1, "max": 1 << 16, "help": "batch size"})
    workers: int = field(default=4, metadata={"min": 1, "max": 64, "help": "loader workers (ours: threads)"})
    warm: int = field(default=5, metadata={"min": 0, "max": 100, "help": "warm rounds (median counts)"})
    cold: int = field(default=2, metadata={"min": 0, "max": 100, "help": "cold rounds (root only)"})
    int8: bool = field(default=False, metadata={"help": "also int8 tokens (+ float32 per-token scales)"})
    contenders: str = field(default="raw,zarr,hdf5,ffcv,ffcv-library,streaming,litdata,npy", metadata={
        "help": "comma-separated contenders to run (of raw, zarr, hdf5, ffcv, ffcv-library: FFCV's own loader, "
                "streaming, litdata, npy)"})
    peers_python: str = field(default="", metadata={
        "help": "the python that has the peers installed (default: .venv-peers/bin/python if present, else this one)"})
    timeout: int = field(default=900, metadata={"min": 10, "max": 86400, "help": "seconds per contender process"})

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = set(self.contenders.split(",")) - {"raw", *OURS, *PEERS}
        if unknown:
            from cache.cli.config import ConfigError

            raise ConfigError(f"--contenders: unknown {sorted(unknown)}; choose among raw, {', '.join(OURS + PEERS)}")


def peers_python(bc: BenchPeersConfig) -> str:
    if bc.peers_python:
        return bc.peers_python
    venv = ROOT / ".venv-peers" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def has_module(python: str, module: str | None) -> bool:
    if module is None:
        return True
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, env=_env()).returncode == 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def prepare(bc: BenchPeersConfig, data: Path, dtype: str, contenders: list[str], python: str) -> None:
    """The rows as a zarr cache, its HDF5 and FFCV copies, plain arrays, and each peer's copy."""
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    synthetic_cache(data / "c.zarr", bc.rows, bc.tokens, bc.dim, teacher="dinov2_b", feature_dtype=dtype)
    z = open_cache(data / "c.zarr")
    for fmt, name in (("hdf5", "c.h5"), ("ffcv", "c.ffcv")):
        if any(c.startswith(fmt) for c in contenders):
            convert(data / "c.zarr", data / name, format=fmt, progress=False)
    export_rows(z, data)
    for peer in PEERS:
        if peer in contenders:
            write_peer(sys.executable if peer == "npy" else python, peer, data, timeout=bc.timeout)
    os.sync()


def export_rows(z: Any, data: Path, teacher: str = "dinov2_b") -> None:
    """The rows of cache ``z`` (variant 0) as the plain arrays every peer writes its copy from: ``DATA/rows``."""
    block = z.read_checked(0, z.layout.num_rows)
    (data / "rows").mkdir(parents=True)
    np.save(data / "rows" / "tokens.npy", block[f"features/{teacher}"][:, 0])
    np.save(data / "rows" / "latents.npy", block["latents"][:, 0])
    np.save(data / "rows" / "labels.npy", block["labels"])
    if f"feature_scales/{teacher}" in block:
        np.save(data / "rows" / "scales.npy", block[f"feature_scales/{teacher}"][:, 0])


def write_peer(python: str, peer: str, data: Path, *, timeout: float) -> None:
    """Write ``peer``'s own copy of ``DATA/rows`` into ``DATA/<peer>`` (in its own process, with ``python``)."""
    proc = subprocess.run([python, "-m", "tools.bench.peer_run", "write", peer, str(data)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"writing the {peer} copy failed:\n{proc.stderr[-3000:]}")


def run_peer(python: str, contender: str, data: Path, *, seed: int, batch: int, workers: int, timeout: float,
             warm: bool = False, remote: str | None = None) -> dict[str, Any]:
    """One timed epoch of ``contender`` in its own process (:mod:`tools.bench.peer_run`): its JSON line."""
    cmd = [python, "-m", "tools.bench.peer_run", "epochs", contender, str(data), "--seed", str(seed),
           "--batch", str(batch), "--workers", str(workers), *(["--warmup"] if warm else []),
           *(["--remote", remote] if remote else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{contender} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def drop_page_cache() -> bool:
    """Drop the page cache (root only): True if it was dropped."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure(bc: BenchPeersConfig, data: Path, contender: str, python: str, *, seed: int, warm: bool) -> dict[str, Any]:
    py = python if contender in ("streaming", "litdata") else sys.executable
    got = run_peer(py, contender, data, seed=seed, batch=bc.batch, workers=bc.workers, timeout=bc.timeout, warm=warm)
    print(f"bench-peers: {contender} {'warm' if warm else 'cold'} epoch {seed}: "
          f"{got['samples'] / got['seconds']:,.0f} samples/s", file=sys.stderr, flush=True)
    return got


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for c, rs in runs.items():
        if rs:
            out[c] = {"samples_s": statistics.median(r["samples"] / r["seconds"] for r in rs),
                      "MBps": statistics.median(r["bytes"] / r["seconds"] / 1e6 for r in rs),
                      "cpu_s": statistics.median(r["cpu_s"] for r in rs), "runs": len(rs)}
    return out


def bench(bc: BenchPeersConfig, dtype: str, python: str, contenders: list[str]) -> dict[str, Any]:
    data = Path(bc.out) / "peers" / dtype
    prepare(bc, data, dtype, contenders, python)
    runs: dict[str, dict[str, list]] = {"warm": {c: [] for c in contenders}, "cold": {c: [] for c in contenders}}
    for r in range(bc.warm):
        for c in contenders:
            runs["warm"][c].append(measure(bc, data, c, python, seed=r, warm=True))
    cold = bc.cold if drop_page_cache() else 0
    for r in range(cold):
        for c in contenders:
            drop_page_cache()
            runs["cold"][c].append(measure(bc, data, c, python, seed=100 + r, warm=False))
    return {"dtype": dtype, "cold_measured": cold > 0, "runs": runs,
            "warm": summarise(runs["warm"]), "cold": summarise(runs["cold"])}


def table(res: dict[str, Any]) -> list[str]:
    """The markdown table of one dtype's results."""
    warm, cold = res["warm"], res["cold"]
    lines = [f"| contender ({res['dtype']} tokens) | warm samples/s | warm MB/s | cold samples/s | CPU s / epoch "
             "(warm) | warm / raw | warm / best peer | cold / raw | cold / best peer |", "|---" * 9 + "|"]

    def cell(v: dict, c: str, key: str, spec: str) -> str:
        return format(v[c][key], spec) if c in v else "-"

    def ratio(v: dict, c: str, ref: float | None) -> str:
        return f"{v[c]['samples_s'] / ref:.2f}" if c in v and ref else "-"

    refs = {}
    for name, v in (("warm", warm), ("cold", cold)):
        refs[name] = (v["raw"]["samples_s"] if "raw" in v else None,
                      max((v[c]["samples_s"] for c in PEERS if c in v), default=None))
    for c in LABELS:
        if c in warm or c in cold:
            lines.append("| " + " | ".join([
                LABELS[c], cell(warm, c, "samples_s", ",.0f"), cell(warm, c, "MBps", ",.0f"),
                cell(cold, c, "samples_s", ",.0f"), cell(warm, c, "cpu_s", ".2f"),
                ratio(warm, c, refs["warm"][0]), ratio(warm, c, refs["warm"][1]),
                ratio(cold, c, refs["cold"][0]), ratio(cold, c, refs["cold"][1])]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchPeersConfig, argv)
    if dry:
        return 0
    python = peers_python(bc)
    wanted = bc.contenders.split(",")
    contenders, skipped = [], []
    for c in wanted:
        (contenders if c not in PEERS or has_module(python, PEER_MODULE[c]) else skipped).append(c)
    for c in skipped:
        print(f"bench-peers: {c} skipped: {python} cannot import {PEER_MODULE[c]} (`make bench-peers` installs it "
              "into .venv-peers)", file=sys.stderr)
    report: dict[str, Any] = {"config": config_to_dict(bc), "machine": machine_info(torch.device("cpu")),
                              "load_average": os.getloadavg(), "skipped": skipped, "results": []}
    for dtype in ("float16", *(("int8",) if bc.int8 else ())):
        report["results"].append(bench(bc, dtype, python, contenders))
    report["load_average_after"] = os.getloadavg()
    Path(bc.out).mkdir(parents=True, exist_ok=True)
    with open(Path(bc.out) / "bench_peers.json", "w") as f:
        json.dump(report, f, indent=2)
    m = report["machine"]
    print(f"\n{bc.rows} rows, batch {bc.batch}, {bc.workers} workers, shuffled; {m['cpus']} CPUs, torch {m['torch']}; "
          f"load average {report['load_average'][0]:.1f} before, {report['load_average_after'][0]:.1f} after; "
          f"medians of {bc.warm} warm and {bc.cold if report['results'][0]['cold_measured'] else 0} cold epochs")
    for res in report["results"]:
        print("\n".join(table(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
