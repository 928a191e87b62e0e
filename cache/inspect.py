"""Print a cache's manifest summary, counts and sizes; ``--verify`` checks every shard.

    python -m cache.inspect PATH [--verify] [--json]

``--verify`` prints one ``PROBLEM: ...`` line per damaged shard object (missing, bytes that fail the
checksum recorded at build time, an index that fails its crc32c) and per other fault, and exits 1;
``python -m pipeline.build SOURCE PATH --repair`` re-encodes the damaged shards. PATH may be any format
(:func:`cache.open_cache`); an HDF5 or FFCV cache is checked against the checksums recorded when it was
converted (``python -m cache.convert``), and converting it again repairs it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ConfigError, check_fields, parse_config
from .manifest import EncoderInfo
from .quant import SCALES_GROUP
from .store import CacheError, CacheReader, open_cache


@dataclass(frozen=True)
class InspectConfig:
    """Print a cache's summary; optionally check every shard."""

    path: str = field(default="", metadata={"help": "cache location (pipeline.build OUT)"})
    verify: bool = field(default=False, metadata={
        "help": "check every shard against its recorded checksum, its index, presence and finiteness"})
    json: bool = field(default=False, metadata={"help": "print the summary as JSON"})

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("give the cache PATH")
        check_fields(self)


def summary(cache: CacheReader) -> dict[str, Any]:
    m = cache.manifest
    lay = cache.layout
    sizes = cache.nbytes_stored()
    return {
        "path": cache.url,
        "format": cache.format,
        "complete": m.is_complete,
        "rows": lay.num_rows,
        "data_rows": len(cache),
        "skipped": len(m.skipped_files),
        "classes": len(m.classes),
        "resolution": lay.resolution,
        "variants": lay.variants,
        "latents": list(cache.latents.shape),
        "features": {k: list(v.shape) for k, v in cache.features.items()},
        "vae": _encoder(m.vae),
        "teachers": {k: _teacher(cache, k, sizes) for k in lay.teachers},
        "shard_rows": lay.shard_rows,
        "chunk_rows": lay.chunk_rows,
        "compressor": lay.compressor,
        "bytes": sizes,
        "total_bytes": sum(sizes.values()),
        "source": {"root": m.source_root, "num_files": m.source.num_files if m.source else None,
                   "fingerprint": m.source.fingerprint if m.source else None},
        "stats": {k: v for k, v in m.stats.to_dict().items() if v is not None} if m.stats else {},
    }


def _encoder(info: EncoderInfo | None) -> dict[str, Any]:
    if info is None:
        return {"spec": None, "weights_sha256": None, "random_weights": None}
    return {"spec": info.spec, "weights_sha256": info.weights_sha256, "random_weights": info.random_weights}


def _teacher(cache: CacheReader, name: str, sizes: dict[str, int]) -> dict[str, Any]:
    """A teacher of the cache: its encoder record, tokens per image, width, stored dtype, bytes stored (tokens
    and, for int8, scales) and the settings of the run that encoded it."""
    tokens, dim = cache.layout.teachers[name]
    info = cache.manifest.teacher(name)
    return {**_encoder(info), "tokens": tokens, "dim": dim, "dtype": cache.layout.feature_dtype(name),
            "bytes": sizes.get(f"features/{name}", 0) + sizes.get(f"{SCALES_GROUP}/{name}", 0),
            "encode": None if info is None else info.extra.get("encode")}


def verify(cache: CacheReader) -> list[str]:
    """Problems of the cache, one sentence each (empty when sound): shards without a progress record;
    per damaged shard object (missing, bytes not matching the checksum recorded at build time, index
    failing its crc32c) one line naming the array, the shard and the file; labels out of range;
    non-finite values and all-zero data rows in the shards that pass those checks. An HDF5 or FFCV
    cache: its data against the checksums recorded at conversion, then the same label and value checks."""
    if cache.format != "zarr":
        return _verify_converted(cache)
    problems = []
    finished = cache.finished_shards()
    missing = sorted(set(range(cache.layout.num_shards)) - finished)
    if missing:
        problems.append(f"{len(missing)} shards have no progress record (first {missing[:5]}): the build has not "
                        "finished them; rerun the build command")
    damage = cache.verify_shards()
    problems += [f"{d}; rebuild it with `python -m pipeline.build SOURCE {cache.url} --repair`" for d in damage]
    damaged = {(d.shard, d.array) for d in damage} | {(d.shard, a) for d in damage if d.array == "progress"
                                                         for a in ("latents", "labels", *_feature_names(cache))}
    problems += _label_problems(cache)
    labels = cache.labels
    arrays = _data_arrays(cache)
    for shard in sorted(finished):
        lo, hi = cache.layout.shard_rows_range(shard)
        data_rows = labels[lo:hi] >= 0
        for name, arr in arrays.items():
            if (shard, name) in damaged:
                continue
            where = f"{name} shard {shard} ({cache.shard_object(name, shard)})"
            try:
                block = arr[lo:hi]
            except Exception as e:
                problems.append(f"{where}: cannot be read ({type(e).__name__}: {e})")
                continue
            if not np.isfinite(block).all():
                problems.append(f"{where}: non-finite values in rows {lo}..{hi}")
            flat = block.reshape(block.shape[0], -1)
            empty = ~flat.any(axis=1)
            if (empty & data_rows).any():
                row = lo + int(np.flatnonzero(empty & data_rows)[0])
                problems.append(f"{where}: row {row} is all zeros (missing chunk?)")
    return problems


def _label_problems(cache: CacheReader) -> list[str]:
    problems = []
    labels = cache.labels
    ncls = len(cache.manifest.classes)
    if labels.size and (labels.max() >= ncls or labels.min() < -1):
        problems.append(f"labels outside [-1, {ncls})")
    skipped_rows = {s.row for s in cache.manifest.skipped_files}
    if cache.complete and skipped_rows != set(np.flatnonzero(labels < 0).tolist()):
        problems.append("rows with label -1 differ from the manifest's skip list")
    return problems


def _verify_converted(cache: CacheReader, block: int = 1024) -> list[str]:
    """An HDF5 or FFCV cache: its checksums (:meth:`verify` of the format), labels, then non-finite values
    and all-zero data rows, read in blocks of ``block`` rows (when the checksums pass)."""
    problems = cache.verify() + _label_problems(cache)
    if problems:
        return problems
    arrays = _data_arrays(cache)
    for lo in range(0, cache.layout.num_rows, block):
        hi = min(lo + block, cache.layout.num_rows)
        data_rows = cache.labels[lo:hi] >= 0
        for name, arr in arrays.items():
            values = arr[lo:hi]
            if not np.isfinite(values).all():
                problems.append(f"{cache.url}: {name} has non-finite values in rows {lo}..{hi}")
            empty = ~values.reshape(len(values), -1).any(axis=1) & data_rows
            if empty.any():
                problems.append(f"{cache.url}: {name} row {lo + int(np.flatnonzero(empty)[0])} is all zeros")
    return problems


def _feature_names(cache: CacheReader) -> list[str]:
    return [name for name in cache.layout.array_names() if name not in ("latents", "labels")]


def _data_arrays(cache: CacheReader) -> dict[str, Any]:
    """Every per-row array but the labels: latents, each teacher's tokens and (int8 teachers) scales."""
    return {name: cache.array(name) for name in cache.layout.array_names() if name != "labels"}


def main(argv: list[str] | None = None) -> int:
    args, dry_run = parse_config(InspectConfig, argv, positional=("path",), description=__doc__.splitlines()[0])
    if dry_run:
        return 0
    try:
        cache = open_cache(args.path, allow_incomplete=True)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = summary(cache)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print(info)
    if args.verify:
        problems = verify(cache)
        for prob in problems:
            print(f"PROBLEM: {prob}")
        print("verify: OK" if not problems else f"verify: {len(problems)} problems")
        return 1 if problems else 0
    return 0


def _print(info: dict[str, Any]) -> None:
    gib = info["total_bytes"] / 2**30
    print(f"cache      {info['path']}  ({info['format']}, {'complete' if info['complete'] else 'INCOMPLETE'})")
    print(f"rows       {info['data_rows']} with data, {info['skipped']} skipped, {info['rows']} in all; "
          f"{info['classes']} classes")
    print(f"images     {info['resolution']} px, {info['variants']} variant(s)")
    print(f"latents    {info['latents']} float16  vae={info['vae']['spec']}"
          f"{'  (random weights)' if info['vae'].get('random_weights') else ''}")
    for name, t in info["teachers"].items():
        print(f"teacher    {name}: {t['tokens']} tokens x {t['dim']}, {t['dtype']}"
              f"{' + float32 scale per token' if t['dtype'] == 'int8' else ''}, {t['bytes'] / 2**30:.3f} GiB"
              f"{'  (random weights)' if t.get('random_weights') else ''}")
    if info["format"] == "zarr":
        print(f"storage    shards of {info['shard_rows']} rows, chunks of {info['chunk_rows']}, "
              f"compressor {info['compressor']}, {gib:.3f} GiB")
    else:
        print(f"storage    {info['format']}, {gib:.3f} GiB")
    src = info["source"]
    print(f"source     {src['root']}  ({src['num_files']} files, fingerprint {str(src['fingerprint'])[:16]})")
    st = info["stats"]
    if st:
        print(f"build      {st.get('seconds', 0):.1f} s, {st.get('img_per_s', 0):.1f} img/s, "
              f"{st.get('world_size', 1)} process(es), device {st.get('device')}")


if __name__ == "__main__":
    raise SystemExit(main())
