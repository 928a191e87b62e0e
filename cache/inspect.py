"""Print a cache's manifest summary, counts and sizes; ``--verify`` checks every shard.

    python -m cache.inspect PATH [--verify] [--json]

``--verify`` prints one ``PROBLEM: ...`` line per fault :meth:`cache.reader.CacheReader.verify` finds
(a damaged or missing stored object, bytes that fail the checksum recorded when they were written,
labels out of range, non-finite values, all-zero data rows), each with what to do, and exits 1: a zarr
cache's damaged shards are re-encoded by ``python -m pipeline.build SOURCE PATH --repair``, a converted
HDF5 or FFCV copy is converted again. PATH may be any format (:func:`cache.open_cache`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from .cli.advice import explain, problem_advice
from .cli.config import ConfigError, StoreSettings, check_fields, parse_config
from .errors import CacheError
from .formats import open_cache
from .layout import SCALES_GROUP
from .manifest import EncoderInfo
from .reader import CacheReader


@dataclass(frozen=True)
class InspectConfig(StoreSettings):
    """Print a cache's summary; optionally check every shard."""

    path: str = field(default="", metadata={"help": "cache location (pipeline.build OUT: a folder, a store URL, "
                                                    "an .h5 file or an FFCV folder)"})
    verify: bool = field(default=False, metadata={
        "help": "check every shard against its recorded checksum, its index, presence and finiteness"})
    json: bool = field(default=False, metadata={"help": "print the summary as JSON"})

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("give the cache PATH")
        check_fields(self)
        self.check_store(self.path)


def summary(cache: CacheReader) -> dict[str, Any]:
    m = cache.manifest
    lay = cache.layout
    sizes = cache.stored_bytes()
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
        "storage": cache.describe_storage(),
        **lay.storage,
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


def main(argv: list[str] | None = None) -> int:
    args, dry_run = parse_config(InspectConfig, argv, positional=("path",), description=__doc__.splitlines()[0])
    if dry_run:
        return 0
    try:
        cache = open_cache(args.path, allow_incomplete=True, storage_options=args.storage_options())
    except CacheError as e:
        print(f"error: {explain(e, out_flag='PATH')}", file=sys.stderr)
        return 2
    info = summary(cache)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print(info)
    if args.verify:
        problems = cache.verify()
        for prob in problems:
            advice = problem_advice(prob.remedy, cache.url)
            print(f"PROBLEM: {prob}" + (f"; {advice}" if advice else ""))
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
    print(f"storage    {info['storage']}, {gib:.3f} GiB")
    src = info["source"]
    print(f"source     {src['root']}  ({src['num_files']} files, fingerprint {str(src['fingerprint'])[:16]})")
    st = info["stats"]
    if st:
        print(f"build      {st.get('seconds', 0):.1f} s, {st.get('img_per_s', 0):.1f} img/s, "
              f"{st.get('world_size', 1)} process(es), device {st.get('device')}")


if __name__ == "__main__":
    raise SystemExit(main())
