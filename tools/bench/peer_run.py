"""One contender of ``tools.bench.peers``, in its own process: write its copy of the rows, or time its epochs.

    python -m tools.bench.peer_run write  CONTENDER DATA
    python -m tools.bench.peer_run epochs CONTENDER DATA --seed S [--warmup] [--batch 256] [--workers 4]
    python -m tools.bench.peer_run epochs CONTENDER DATA --seed S --remote URL   (a peer's copy in an object store)

``DATA`` is the folder ``tools.bench.peers`` prepared: ``rows/`` holds the rows as plain arrays
(``tokens.npy`` (N, T, D), ``latents.npy`` (N, 8, h, w), ``labels.npy`` (N,), and for int8 rows
``scales.npy`` (N, T)); each contender's copy goes to ``DATA/<contender>``. ``epochs`` reads one shuffled
epoch (after an untimed one with ``--warmup``), converts every batch to the same torch tensors (``tokens``,
``latents``, ``labels`` int64, ``index`` int64, and ``scales`` float32 for int8 rows), checks that the
epoch covers every row once and that each row's tokens are that row's, and prints one JSON line:
seconds, samples, useful bytes, CPU seconds (this process and its reaped workers).

With ``--remote URL`` a peer (streaming or litdata) reads its copy from an object store instead
(``tools.bench.remote`` uploads ``DATA/<contender>`` there): mosaicml-streaming through boto3, pointed at the
endpoint by ``S3_ENDPOINT_URL``; LitData through its boto3 client (``storage_options``: endpoint and keys from
the standard ``AWS_*`` variables) and obstore. Each epoch downloads into a fresh local folder of its own
(``DATA/<contender>-cache-*``, removed after), so every timed epoch reads the store. mosaicml-streaming
0.13.0 keeps the boto3 client that fetched ``index.json`` in the dataset; DataLoader workers forked from it
share that client's connections (seen here: responses read by the wrong worker, rows that are not the ones
their index names, 60 s stalls), so it is dropped before the workers start, as pickling the dataset for
spawned workers would (``CloudDownloader.clean_up``). mosaicml-streaming's
``clean_stale_shared_memory`` is not called there: it unlinks every StreamingDataset's shared memory on the
machine, other processes' too (a fresh local folder cannot meet a stale registration of its own).

Only numpy and torch are imported at the top: the peers (mosaicml-streaming, LitData) may live in a
venv of their own (``.venv-peers``, ``make bench-peers``) that lacks this project's dependencies; our
formats' contenders import ``cache`` (and run in the project's venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

OURS = ("zarr", "hdf5", "ffcv", "ffcv-library")  # ffcv-library: FFCV's own loader (UREPA_IO=library)
PEERS = ("streaming", "litdata", "npy")
CONTENDERS = ("raw", *OURS, *PEERS)


def rows_of(data: Path) -> dict[str, np.ndarray]:
    """The rows as plain arrays (memory-mapped)."""
    names = ("tokens", "latents", "labels", "scales")
    return {n: np.load(data / "rows" / f"{n}.npy", mmap_mode="r") for n in names if (data / "rows" / f"{n}.npy").exists()}


# ---- writing each peer's copy ---------------------------------------------------------------------------
def _sample(rows: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    out = {"tokens": np.ascontiguousarray(rows["tokens"][i]), "latents": np.ascontiguousarray(rows["latents"][i]),
           "label": int(rows["labels"][i]), "index": i}
    if "scales" in rows:
        out["scales"] = np.ascontiguousarray(rows["scales"][i])
    return out


def _litdata_sample(i: int) -> dict[str, Any]:
    return _sample(rows_of(Path(os.environ["PEER_DATA"])), i)


def write(contender: str, data: Path) -> None:
    rows = rows_of(data)
    n = len(rows["labels"])
    out = data / contender
    if contender == "npy":  # fast-DiT / REPA: one .npy per sample and array, the labels in one file
        for name in ("tokens", "latents", "scales"):
            if name in rows:
                (out / name).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    np.save(out / name / f"{i}.npy", np.ascontiguousarray(rows[name][i]))
        np.save(out / "labels.npy", np.asarray(rows["labels"]))
    elif contender == "streaming":
        from streaming import MDSWriter

        t, d = rows["tokens"].shape[1:]
        columns = {"tokens": f"ndarray:{rows['tokens'].dtype.name}:{t},{d}",
                   "latents": "ndarray:float16:" + ",".join(map(str, rows["latents"].shape[1:])),
                   "label": "int", "index": "int"}
        if "scales" in rows:
            columns["scales"] = f"ndarray:float32:{t}"
        with MDSWriter(out=str(out), columns=columns, size_limit="64mb") as w:
            for i in range(n):
                w.write(_sample(rows, i))
    elif contender == "litdata":
        import litdata

        os.environ["PEER_DATA"] = str(data)
        litdata.optimize(fn=_litdata_sample, inputs=list(range(n)), output_dir=str(out), chunk_bytes="64MB",
                         num_workers=1)
    else:
        raise SystemExit(f"peer_run write: unknown peer {contender!r}")


# ---- reading ----------------------------------------------------------------------------------------------
def _as_batch(tokens: Any, latents: Any, labels: Any, index: Any, scales: Any = None) -> dict[str, torch.Tensor]:
    """The one batch form every contender is converted to."""
    out = {"tokens": torch.as_tensor(tokens), "latents": torch.as_tensor(latents),
           "labels": torch.as_tensor(labels).to(torch.int64), "index": torch.as_tensor(index).to(torch.int64)}
    if scales is not None:
        out["scales"] = torch.as_tensor(scales).to(torch.float32)
    return out


class _NpyDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path) -> None:
        self.root, self.labels = root, np.load(root / "labels.npy")
        self.scaled = (root / "scales").is_dir()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        got = (np.load(self.root / "tokens" / f"{i}.npy"), np.load(self.root / "latents" / f"{i}.npy"),
               int(self.labels[i]), i)
        return got + ((np.load(self.root / "scales" / f"{i}.npy"),) if self.scaled else ())


def _s3_options() -> dict[str, str]:
    """LitData's S3 client settings (boto3 client arguments) from the standard environment."""
    names = {"endpoint_url": "AWS_ENDPOINT_URL", "aws_access_key_id": "AWS_ACCESS_KEY_ID",
             "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY", "region_name": "AWS_REGION"}
    return {k: os.environ[v] for k, v in names.items() if os.environ.get(v)}


def _litdata_allow_http() -> None:
    """LitData fetches chunks through an obstore store it builds with client options of its own, which lack
    ``allow_http``: a plain ``http://`` endpoint (the bench's loopback server) fails with "builder error:
    BadScheme". Add that one option (what ``AWS_ALLOW_HTTP=true`` says) to LitData's options, before its
    DataLoader workers fork; LitData's own download path is otherwise unchanged."""
    from litdata.streaming import downloader

    if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}


def batches(contender: str, data: Path, *, seed: int, batch: int, workers: int, remote: str | None = None,
            cache: Path | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled epoch of ``contender`` (epoch ``seed``) as the common batch form; a peer reads its copy
    from ``remote`` (downloading into the empty folder ``cache``) when given."""
    if remote is not None and (contender not in ("streaming", "litdata") or cache is None):
        raise SystemExit(f"peer_run epochs: --remote is for streaming and litdata (with a cache folder), not {contender!r}")
    local = data / contender if remote is None else cache
    if contender in OURS:
        from cache import open_cache

        if contender == "ffcv-library":
            os.environ["UREPA_IO"] = "library"
        c = open_cache(data / {"zarr": "c.zarr", "hdf5": "c.h5", "ffcv": "c.ffcv", "ffcv-library": "c.ffcv"}[contender])
        teacher = next(iter(c.layout.teachers))
        for b in c.loader(batch, seed=0, epoch=seed, num_workers=workers, prefetch=4, drop_last=False):
            yield _as_batch(b["features"][teacher], b["latents"], b["labels"], b["index"],
                            b["feature_scales"].get(teacher))
    elif contender == "npy":
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(_NpyDataset(data / "npy"), batch_size=batch, shuffle=True, generator=g,
                                             num_workers=workers)
        for b in loader:
            yield _as_batch(*b)
    elif contender == "streaming":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        if remote is None:
            clean_stale_shared_memory()
        ds = StreamingDataset(remote=remote, local=str(local), shuffle=True, shuffle_seed=seed, batch_size=batch)
        if remote is not None:  # the boto3 client that fetched index.json must not reach the forked workers
            for stream in ds.streams:
                stream._downloader.clean_up()
        for b in torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers):
            yield _as_batch(b["tokens"], b["latents"], b["label"], b["index"], b.get("scales"))
    elif contender == "litdata":
        from litdata import StreamingDataLoader, StreamingDataset

        if remote is None:
            ds = StreamingDataset(input_dir=str(local), shuffle=True, seed=seed)
        else:
            _litdata_allow_http()
            ds = StreamingDataset(input_dir=remote, cache_dir=str(local), shuffle=True, seed=seed,
                                  storage_options=_s3_options())
        for b in StreamingDataLoader(ds, batch_size=batch, num_workers=workers):
            yield _as_batch(b["tokens"], b["latents"], b["label"], b["index"], b.get("scales"))
    else:
        raise SystemExit(f"peer_run epochs: unknown contender {contender!r}")


def raw_epoch(data: Path, batch: int) -> tuple[int, int]:
    """The limit: every row file read front to back, one thread, into one batch-sized buffer."""
    files = sorted((data / "rows").glob("*.npy"))
    rows = rows_of(data)
    view = memoryview(bytearray(batch * sum(a[0].nbytes for k, a in rows.items() if k != "labels")))
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return len(rows["labels"]), total


def useful_bytes(b: dict[str, torch.Tensor]) -> int:
    return sum(b[k].nbytes for k in ("tokens", "latents", "scales") if k in b) + 8 * len(b["labels"])


def preimport(contender: str) -> None:
    """Import what a contender's epoch uses before the clock starts (a cold page cache would otherwise time
    the loading of the libraries)."""
    if contender in OURS:
        import cache  # noqa: F401
        if contender.startswith("ffcv"):
            import ffcv.loader  # noqa: F401
            import ffcv.reader  # noqa: F401
    elif contender == "streaming":
        import streaming  # noqa: F401
    elif contender == "litdata":
        import litdata  # noqa: F401


def run_epoch(contender: str, data: Path, *, seed: int, batch: int, workers: int, rows: dict[str, np.ndarray],
              remote: str | None = None) -> dict:
    """One timed epoch, checked: every row once, each row's own tokens and label."""
    cache = None if remote is None else Path(tempfile.mkdtemp(prefix=f"{contender}-cache-", dir=data))
    try:
        return _timed_epoch(contender, data, seed=seed, batch=batch, workers=workers, rows=rows, remote=remote,
                            cache=cache)
    finally:
        if cache is not None:  # the peer's local copy of this epoch's downloads
            shutil.rmtree(cache, ignore_errors=True)


def _timed_epoch(contender: str, data: Path, *, seed: int, batch: int, workers: int, rows: dict[str, np.ndarray],
                 remote: str | None, cache: Path | None) -> dict:
    t0, c0 = time.perf_counter(), os.times()
    if contender == "raw":
        n, nbytes = raw_epoch(data, batch)
    else:
        n = nbytes = 0
        seen = []
        for b in batches(contender, data, seed=seed, batch=batch, workers=workers, remote=remote, cache=cache):
            marker = b["tokens"][:, 0, 0]
            want = torch.from_numpy(np.asarray(rows["tokens"][:, 0, 0])[b["index"].numpy()])
            if not torch.equal(marker, want) or not torch.equal(b["labels"], torch.from_numpy(
                    np.asarray(rows["labels"])[b["index"].numpy()]).to(torch.int64)):
                raise SystemExit(f"{contender}: a batch holds rows that are not the ones its index names")
            n += len(b["index"])
            nbytes += useful_bytes(b)
            seen.append(b["index"])
        order = torch.cat(seen).sort().values if seen else torch.empty(0, dtype=torch.int64)
        if not torch.equal(order, torch.arange(len(rows["labels"]))):
            raise SystemExit(f"{contender}: the epoch does not cover every row once ({len(order)} samples)")
    s, c1 = time.perf_counter() - t0, os.times()
    cpu = sum(c1[i] - c0[i] for i in range(4))  # user, system, children's user, children's system
    return {"contender": contender, "seconds": s, "samples": n, "bytes": nbytes, "cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("write", "epochs"))
    ap.add_argument("contender", choices=CONTENDERS)
    ap.add_argument("data", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--warmup", action="store_true", help="read one untimed epoch first (a warm page cache)")
    ap.add_argument("--remote", help="read the peer's copy from this object store URL (a fresh local cache each epoch)")
    a = ap.parse_args(argv)
    if a.what == "write":
        write(a.contender, a.data)
        return 0
    rows = rows_of(a.data)
    preimport(a.contender)
    kw = dict(batch=a.batch, workers=a.workers, rows=rows, remote=a.remote)
    if a.warmup:
        run_epoch(a.contender, a.data, seed=a.seed + 1000, **kw)
    print(json.dumps(run_epoch(a.contender, a.data, seed=a.seed, **kw)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
