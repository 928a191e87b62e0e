"""Benchmark the loader from an S3 server against the limits of the same server, the same rows, the same run.

    python -m tools.bench.remote [--rows 1024] [--batch 128] [--workers 4] [--concurrency 128] [--rounds 2]
        [--dtypes float16,int8] [--zarr-rows 128] [--peers-python .venv-peers/bin/python] [--out bench-out]

Starts a SeaweedFS server on 127.0.0.1 (:mod:`tools.bench.s3server`, the one the tests start), writes a
synthetic cache of DINOv2-B shapes (256 x 768 tokens + 8 x 32 x 32 latents per row, random values) per token
dtype (float16; int8 with its per-token scales), uploads it, and measures in rounds, alternating the
contenders within each round (so that other load on the machine falls on all alike):

    (a) our loader from S3, full permutation      ``open_cache(s3://...).loader(...)``: a range GET per row and array
    (a) our loader from S3, block order           ``order="blocks"``: one GET per inner chunk, kept until used
    (a) our loader from S3 + node-local copy      ``local_cache=DIR``, after the epoch that downloaded the shards
    (b) raw range GETs, the rows                  obstore, the same byte ranges as the permutation reads
    (b) raw range GETs, whole chunks              obstore, the same byte ranges as the block order reads
    (c) the same rows on local disk, our loader   the local folder the upload came from (permutation)
    (d) zarr-python's own remote path             ``UREPA_ZARR_IO=zarr``: zarr over its ObjectStore, the first
                                                  ``--zarr-rows`` rows of the permutation only (it is slow)
    (e) mosaicml-streaming ``StreamingDataset``   its MDS copy of the same rows in the same bucket, + DataLoader
    (f) LitData ``StreamingDataset``              its own copy (``litdata.optimize``), + ``StreamingDataLoader``

The peers (e) and (f) are not this project's dependencies: they run with ``--peers-python`` (``make
bench-remote`` builds their venv, ``.venv-peers``, as ``make bench-peers`` does), each epoch in a process of
its own (:mod:`tools.bench.peer_run`: ``--workers`` DataLoader workers, shuffled, every batch converted to the
same torch tensors and checked to hold its rows and, over the epoch, every row once), downloading into a fresh
local folder so that every timed epoch reads the store. Each writes its copy of the rows (``DATA/rows``,
exported from the synthetic cache) in its own format (64 MB shards, as in ``make bench-peers``), uploaded
into the same bucket. Without ``--peers-python``, or where that Python cannot import a peer, the peer is
skipped, and said so.

Every contender reads the same epoch's rows (a shuffled permutation; the block order its own order of the
same rows) with ``--workers`` reader threads, batch ``--batch``; the raw GETs keep ``--concurrency``
requests in flight, what the loader's threads can have in flight together (``--workers`` x 32). Shard
indexes are read before the timing (our loader reads each once per epoch, inside its timing). samples/s
and MB/s (bytes of the rows delivered) of each, the median of the rounds, with the CPU seconds the
client (this process, or a peer's process and its workers) and the server spent on the epoch (what bounds a
contender when the machine's cores are the limit), and the ratios (a)/(b),
(a)/(c), (a)/(d) and (a) against the best peer. Prints a table and writes ``OUT/bench_remote.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache import epoch_order, open_cache
from cache.cli.config import ConfigError, check_fields, config_to_dict, parse_config
from cache.formats.zarr.shardfile import EMPTY_CHUNK, decode_index, direct_format
from cache.layout import SCALES_GROUP, stored_dtype
from tools.bench.cache import machine_info, synthetic_cache
from tools.bench.peers import export_rows, has_module, run_peer, write_peer
from tools.bench.s3server import S3Server, server_store, upload

TEACHER = "dinov2_b"
#: the peers measured from the store: peer_run's contender -> (its module, its row in the table)
PEERS = {"streaming": ("streaming", "(e) S3, mosaicml-streaming StreamingDataset"),
         "litdata": ("litdata", "(f) S3, LitData StreamingDataset")}


@dataclass(frozen=True)
class BenchRemoteConfig:
    """Benchmark the loader from an S3 server against raw GETs, local disk and zarr's own path."""

    out: str = field(default="bench-out", metadata={"help": "folder for the synthetic caches, the server and the JSON"})
    rows: int = field(default=1024, metadata={
        "min": 16, "max": 10_000_000, "help": "rows of each synthetic cache (DINOv2-B float16: 0.41 MB a row)"})
    tokens: int = field(default=256, metadata={"min": 1, "max": 1 << 16, "help": "teacher tokens per row"})
    dim: int = field(default=768, metadata={"min": 1, "max": 1 << 16, "help": "teacher token width"})
    shard_rows: int = field(default=256, metadata={"min": 1, "max": 1 << 20, "help": "rows per shard object"})
    chunk_rows: int = field(default=16, metadata={"min": 1, "max": 1 << 20, "help": "rows per inner chunk"})
    batch: int = field(default=128, metadata={"min": 1, "max": 1 << 16, "help": "loader batch size"})
    workers: int = field(default=4, metadata={"min": 1, "max": 256, "help": "loader reader threads"})
    concurrency: int = field(default=128, metadata={
        "min": 1, "max": 4096, "help": "raw GETs in flight (the loader's threads x 32 it allows per read)"})
    window: int = field(default=512, metadata={"min": 1, "max": 1 << 24, "help": "shuffle window of the block order"})
    rounds: int = field(default=2, metadata={"min": 1, "max": 100, "help": "rounds of all contenders (medians)"})
    zarr_rows: int = field(default=128, metadata={
        "min": 1, "max": 10_000_000, "help": "rows read through zarr's own path per round"})
    dtypes: str = field(default="float16,int8", metadata={"help": "teacher token dtypes, comma-separated"})
    peers_python: str = field(default="", metadata={
        "help": "the python that has mosaicml-streaming and LitData (make bench-remote: .venv-peers/bin/python); "
                "empty: the peers are skipped"})
    peer_timeout: int = field(default=900, metadata={"min": 10, "max": 86400, "help": "seconds per peer process"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.shard_rows % self.chunk_rows:
            raise ConfigError(f"--shard-rows {self.shard_rows} is not a multiple of --chunk-rows {self.chunk_rows}")
        for d in self.dtype_list:
            stored_dtype(d)
        if self.batch > self.rows:
            raise ConfigError(f"--batch {self.batch} exceeds --rows {self.rows}")

    @property
    def dtype_list(self) -> list[str]:
        return [d.strip() for d in self.dtypes.split(",") if d.strip()]


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def loader_rate(c: Any, bc: BenchRemoteConfig, *, epoch: int, limit: int | None = None,
                **kw: Any) -> tuple[float, int, int]:
    """(seconds, samples, bytes of the rows delivered) of one epoch through our loader (the first ``limit``
    rows only, if given)."""
    n = nbytes = 0
    t = time.perf_counter()
    loader = c.loader(bc.batch, seed=0, epoch=epoch, num_workers=bc.workers, prefetch=2, pin_memory=False, **kw)
    try:
        for batch in loader:
            n += len(batch["index"])
            nbytes += batch["latents"].nbytes + sum(f.nbytes for f in batch["features"].values())
            nbytes += sum(s.nbytes for s in batch["feature_scales"].values())
            if limit is not None and n >= limit:
                break
    finally:
        loader.close()
    return time.perf_counter() - t, n, nbytes


class RawRanges:
    """The byte ranges our loader reads, fetched by plain obstore range GETs (the server's limit)."""

    def __init__(self, store: Any, prefix: str, c: Any) -> None:
        import obstore

        self.store, self.arrays = store, {}
        names = ["latents", f"features/{TEACHER}"] + ([f"{SCALES_GROUP}/{TEACHER}"]
                                                       if c.layout.quantized(TEACHER) else [])
        for name in names:
            array = c.array(name)
            fmt, why = direct_format(array)
            if fmt is None:
                raise RuntimeError(f"{name}: not readable by range ({why})")
            indexes = []
            for s in range(-(-c.layout.num_rows // fmt.shard_rows)):
                key = f"{prefix}/{array.path}/{fmt.shard_key(s)}"
                result = obstore.get(store, key, options={"range": {"suffix": fmt.index_nbytes}})
                size = int(result.meta["size"])
                indexes.append((key, decode_index(fmt, bytes(result.bytes()), file_size=size, what=key)))
            self.arrays[name] = (fmt, indexes)

    def row_ranges(self, rows: np.ndarray) -> list[tuple[str, int, int]]:
        """(key, lo, hi) of every row of ``rows`` in every array: what the permutation reads."""
        out = []
        for fmt, indexes in self.arrays.values():
            for r in rows.tolist():
                key, index = indexes[r // fmt.shard_rows]
                chunk, k = divmod(r % fmt.shard_rows, fmt.chunk_rows)
                lo = int(index[chunk, 0]) + k * fmt.row_nbytes
                out.append((key, lo, lo + fmt.row_nbytes))
        return out

    def chunk_ranges(self, rows: np.ndarray) -> list[tuple[str, int, int]]:
        """(key, lo, hi) of every inner chunk holding ``rows``, each once: what the block order reads."""
        out = []
        for fmt, indexes in self.arrays.values():
            for g in np.unique(rows // fmt.chunk_rows).tolist():
                key, index = indexes[g * fmt.chunk_rows // fmt.shard_rows]
                lo, n = (int(v) for v in index[g % fmt.chunks_per_shard])
                if lo != EMPTY_CHUNK:
                    out.append((key, lo, lo + n))
        return out

    def fetch(self, ranges: list[tuple[str, int, int]], concurrency: int) -> tuple[float, int]:
        """(seconds, bytes) to GET every range, ``concurrency`` in flight."""
        import obstore

        async def run() -> int:
            limit = asyncio.Semaphore(concurrency)

            async def one(key: str, lo: int, hi: int) -> int:
                async with limit:
                    return len(await obstore.get_range_async(self.store, key, start=lo, end=hi))

            return sum(await asyncio.gather(*(one(*r) for r in ranges)))

        t = time.perf_counter()
        nbytes = asyncio.run(run())
        return time.perf_counter() - t, nbytes


def available_peers(bc: BenchRemoteConfig) -> tuple[list[str], list[str]]:
    """(the peers to measure, a line for each one skipped and why)."""
    if not bc.peers_python:
        return [], [f"{p}: skipped, no --peers-python (make bench-remote passes .venv-peers/bin/python)" for p in PEERS]
    ok, skipped = [], []
    for peer, (module, _) in PEERS.items():
        if has_module(bc.peers_python, module):
            ok.append(peer)
        else:
            skipped.append(f"{peer}: skipped, {bc.peers_python} cannot import {module}")
    return ok, skipped


def prepare_peers(bc: BenchRemoteConfig, server: S3Server, here: Any, data: Path, dtype: str,
                  peers: list[str]) -> dict[str, str]:
    """Each peer's copy of the rows of ``here``, in its own format, uploaded: peer -> its URL."""
    export_rows(here, data, TEACHER)
    urls = {}
    for peer in peers:
        write_peer(bc.peers_python, peer, data, timeout=bc.peer_timeout)
        urls[peer] = upload(server, data / peer, f"bench/{dtype}.{peer}")
    return urls


def _peer(bc: BenchRemoteConfig, peer: str, data: Path, url: str, epoch: int,
          row_nbytes: int) -> tuple[float, int, int, float]:
    """(seconds, samples, bytes, CPU seconds of the peer's process and its workers) of one epoch of a peer."""
    got = run_peer(bc.peers_python, peer, data, seed=epoch, batch=bc.batch, workers=bc.workers,
                   timeout=bc.peer_timeout, remote=url)
    return got["seconds"], got["samples"], got["samples"] * row_nbytes, got["cpu_s"]


def bench_dtype(bc: BenchRemoteConfig, server: S3Server, folder: Path, dtype: str,
                peers: Sequence[str] = ()) -> dict[str, Any]:
    """Every contender on the cache of one token dtype, ``bc.rounds`` rounds."""
    local = folder / f"remote-{dtype}.zarr"
    synthetic_cache(local, bc.rows, bc.tokens, bc.dim, shard_rows=bc.shard_rows, chunk_rows=bc.chunk_rows,
                    teacher=TEACHER, feature_dtype=stored_dtype(dtype))
    key = f"bench/{dtype}.zarr"
    t = time.perf_counter()
    url = upload(server, local, key)
    upload_s = time.perf_counter() - t
    remote, here = open_cache(url), open_cache(local)
    raw = RawRanges(server_store(server), key, here)
    rows = len(here)
    row_nbytes = sum(fmt.row_nbytes for fmt, _ in raw.arrays.values())
    node = Path(tempfile.mkdtemp(prefix="node-", dir=folder))
    copied = open_cache(url, local_cache=node)
    loader_rate(copied, bc, epoch=99)  # the epoch that downloads the shards (not timed)
    contenders: dict[str, Callable[[int], tuple[float, int, int]]] = {
        "(a) S3, our loader, permutation": lambda e: loader_rate(remote, bc, epoch=e),
        "(a) S3, our loader, block order": lambda e: loader_rate(remote, bc, epoch=e, order="blocks",
                                                                   shuffle_window=bc.window),
        "(a) S3 + node-local copy, our loader": lambda e: loader_rate(copied, bc, epoch=e),
        "(b) S3, raw range GETs of the rows": lambda e: _raw(raw, raw.row_ranges(_rows(here, bc, e)), bc, row_nbytes),
        "(b) S3, raw range GETs of whole chunks": lambda e: _raw(raw, raw.chunk_ranges(_rows(here, bc, e)), bc,
                                                                 row_nbytes, samples=len(_rows(here, bc, e))),
        "(c) local disk, our loader, permutation": lambda e: loader_rate(here, bc, epoch=e),
        "(d) S3, zarr-python's own path": lambda e: _zarr(url, bc, e),
    }
    data = folder / f"peers-{dtype}"
    for peer, peer_url in prepare_peers(bc, server, here, data, dtype, list(peers)).items():
        contenders[PEERS[peer][1]] = (lambda p, u: lambda e: _peer(bc, p, data, u, e, row_nbytes))(peer, peer_url)
    times: dict[str, list[tuple[float, int, int, float, float]]] = {k: [] for k in contenders}
    loader_rate(remote, bc, epoch=98, limit=bc.batch)  # warm-up: connections, threads
    for r in range(bc.rounds):
        for name, run in contenders.items():
            c0, s0 = os.times(), server.cpu_seconds()
            got = run(r)
            cpu = sum(os.times()[i] - c0[i] for i in range(2))  # this process' user + system seconds
            times[name].append((*got[:3], got[3] if len(got) > 3 else cpu, server.cpu_seconds() - s0))
            print(f"bench-remote: {dtype} round {r}: {name}: {got[1] / got[0]:,.0f} samples/s", file=sys.stderr,
                  flush=True)
    res: dict[str, Any] = {"dtype": dtype, "rows": rows, "row_bytes": row_nbytes, "upload_s": upload_s,
                           "upload_MBps": sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) / upload_s / 1e6,
                           "contenders": {}}
    for name, runs in times.items():
        rates = [n / s for s, n, *_ in runs]
        med = statistics.median(rates)
        bytes_per_sample = runs[0][2] / runs[0][1]
        res["contenders"][name] = {"samples_s": med, "MBps": med * bytes_per_sample / 1e6,
                                   "samples_s_runs": rates, "samples": runs[0][1],
                                   "client_cpu_s": statistics.median(r[3] for r in runs),
                                   "server_cpu_s": statistics.median(r[4] for r in runs),
                                   "seconds": statistics.median(r[0] for r in runs)}
    c = res["contenders"]

    def ratio(a: str, b: str) -> float:
        return c[a]["samples_s"] / c[b]["samples_s"]

    res["ratios"] = {
        "permutation / raw rows (a/b)": ratio("(a) S3, our loader, permutation", "(b) S3, raw range GETs of the rows"),
        "block order / raw chunks (a/b)": ratio("(a) S3, our loader, block order",
                                                "(b) S3, raw range GETs of whole chunks"),
        "block order / permutation": ratio("(a) S3, our loader, block order", "(a) S3, our loader, permutation"),
        "block order / local disk (a/c)": ratio("(a) S3, our loader, block order",
                                                "(c) local disk, our loader, permutation"),
        "permutation / zarr's path (a/d)": ratio("(a) S3, our loader, permutation", "(d) S3, zarr-python's own path"),
        "block order / zarr's path (a/d)": ratio("(a) S3, our loader, block order", "(d) S3, zarr-python's own path"),
    }
    measured = [label for _, label in PEERS.values() if label in c]
    if measured:
        best = max(measured, key=lambda k: c[k]["samples_s"])
        res["best_peer"] = best
        res["ratios"]["permutation / best peer (a/e,f)"] = ratio("(a) S3, our loader, permutation", best)
        res["ratios"]["block order / best peer (a/e,f)"] = ratio("(a) S3, our loader, block order", best)
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(node, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    return res


def _rows(c: Any, bc: BenchRemoteConfig, epoch: int) -> np.ndarray:
    """The rows of one epoch (drop_last), in the permutation's order."""
    order = epoch_order(c.rows, seed=0, epoch=epoch)
    return order[: len(order) // bc.batch * bc.batch]


def _raw(raw: RawRanges, ranges: list[tuple[str, int, int]], bc: BenchRemoteConfig, row_nbytes: int, *,
         samples: int | None = None) -> tuple[float, int, int]:
    s, nbytes = raw.fetch(ranges, bc.concurrency)
    n = samples if samples is not None else nbytes // row_nbytes
    return s, n, n * row_nbytes


def _zarr(url: str, bc: BenchRemoteConfig, epoch: int) -> tuple[float, int, int]:
    with _env(UREPA_ZARR_IO="zarr"):
        c = open_cache(url)
        return loader_rate(c, bc, epoch=epoch, limit=bc.zarr_rows)


def report_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['device']}, {m['cpus']} CPUs; load average {report['loadavg_start'][0]:.1f} at the start, "
             f"{report['loadavg_end'][0]:.1f} at the end; SeaweedFS `weed mini` on 127.0.0.1; "
             f"{report['config']['rows']} rows, batch {report['config']['batch']}, {report['config']['workers']} "
             f"threads, {report['config']['concurrency']} raw GETs in flight, median of {report['config']['rounds']} "
             "rounds."]
    lines += [f"Peers: {line}." for line in report.get("peers_skipped", [])]
    for res in report["results"]:
        lines += ["", f"Tokens {res['dtype']} ({res['row_bytes'] / 1e6:.2f} MB a row, tokens + latents"
                  f"{' + scales' if res['dtype'] == 'int8' else ''}):", "",
                  "| contender | samples/s | MB/s | s / epoch | client CPU s | server CPU s |",
                  "|---|---|---|---|---|---|"]
        for name, v in res["contenders"].items():
            lines.append(f"| {name} | {v['samples_s']:,.0f} | {v['MBps']:,.0f} | {v['seconds']:.2f} | "
                         f"{v['client_cpu_s']:.2f} | {v['server_cpu_s']:.2f} |")
        lines += ["", "| ratio | |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in res["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchRemoteConfig, argv)
    if dry:
        return 0
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=out))
    peers, skipped = available_peers(bc)
    for line in skipped:
        print(f"bench-remote: {line}", file=sys.stderr)
    report: dict[str, Any] = {"config": config_to_dict(bc), "machine": machine_info(torch.device("cpu")),
                              "loadavg_start": os.getloadavg(), "peers_skipped": skipped, "results": []}
    try:  # S3_ENDPOINT_URL: how mosaicml-streaming is pointed at an endpoint other than AWS
        with S3Server.start(work / "s3") as server, _env(**server.env, S3_ENDPOINT_URL=server.endpoint):
            for dtype in bc.dtype_list:
                report["results"].append(bench_dtype(bc, server, work, dtype, peers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    (out / "bench_remote.json").write_text(json.dumps(report, indent=2))
    print(report_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
