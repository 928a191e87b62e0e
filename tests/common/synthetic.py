"""A tiny synthetic feature cache whose every value encodes (row, variant), for store and loader tests."""

import numpy as np

import cache
from cache import CacheWriter, zarr_layout

TEACHERS = {"t_a": (6, 5), "t_b": (4, 3)}


def _write_cache(path, layout, records, tokens, skipped):
    """Write ``layout`` shard by shard like a build: latents that encode (row, variant), labels row % 3,
    teacher tokens ``tokens(rows, variants)`` -> {name: (n, F, T, D)}; ``skipped`` rows get zeros and -1."""
    n, variants = layout.num_rows, layout.variants
    sources = [{"path": f"c{i % 3}/img{i:04d}.jpg", "size": 10 + i, "label": i % 3} for i in range(n)]
    manifest = {"classes": ["c0", "c1", "c2"], "source": {"fingerprint": "x"}, "vae": {}, "teachers": records}
    writer, resumed = CacheWriter.create_or_resume(path, layout=layout, manifest=manifest, sources=sources)
    assert not resumed
    for s in range(cache.ZarrStorage.of(layout).num_shards(layout)):
        lo, hi = cache.ZarrStorage.of(layout).shard_range(layout, s)
        rows = np.arange(lo, hi)
        lat = np.zeros((hi - lo, variants, 8, 2, 2), np.float16)
        lat += (rows[:, None, None, None, None] + 1000 * np.arange(variants)[None, :, None, None, None]).astype(np.float16) / 8
        feats = tokens(rows, variants, lat)
        labels = np.array([sources[r]["label"] for r in rows], np.int32)
        for r in rows:
            if r in skipped:
                labels[r - lo], lat[r - lo] = -1, 0
                for f in feats.values():
                    f[r - lo] = 0
        feats = {k: v if layout.quantized(k) else v.astype(np.float16) for k, v in feats.items()}
        skip = [{"row": int(r), "path": sources[r]["path"], "reason": "test"} for r in rows if r in skipped]
        writer.write_shard(s, latents=lat, features=feats, labels=labels, skipped=skip)
    writer.finalize({"seconds": 0})
    return cache.open_cache(path)


def synthetic_cache(path, *, n=100, variants=2, skipped=(3, 50, 51), compressor="none", shard_rows=16, chunk_rows=4):
    """A cache whose every value encodes (row, variant), written shard by shard like a build."""
    layout = zarr_layout(num_rows=n, resolution=16, variants=variants, teachers=TEACHERS, shard_rows=shard_rows,
                    chunk_rows=chunk_rows, compressor=compressor)

    def tokens(rows, variants, lat):
        return {k: np.zeros((len(rows), variants, t, d), np.float16) + lat[:, :, :1, :1, 0] + j
                for j, (k, (t, d)) in enumerate(TEACHERS.items())}

    return _write_cache(path, layout, {}, tokens, skipped)


def expected_latent(row, variant):
    """The latent value ``synthetic_cache`` writes at (row, variant)."""
    return np.float16((row + 1000 * variant) / 8)


def float_tokens(rows, variants, t, d, j):
    """Distinct float32 tokens (n, F, T, D) of teacher number ``j`` that depend on row and variant."""
    base = np.random.default_rng(j).standard_normal((t, d)).astype(np.float32)
    return (base[None, None] * (1 + np.asarray(rows)[:, None, None, None] / 10)
            + 3 * np.arange(variants)[None, :, None, None]).astype(np.float32)


def token_cache(path, *, n=40, variants=2, skipped=(5, 20), feature_dtypes=None, shard_rows=16, chunk_rows=4,
                channel_scales=None):
    """A cache of ``synthetic_cache``'s layout and latents whose teacher tokens vary along every axis
    (:func:`float_tokens`), stored as ``feature_dtypes`` says (default: t_a int8, quantised by the writer
    from the float32 tokens like a build; t_b float16), with teacher records like a build's (``dtype``,
    ``encode``, and ``channel_scales`` where given: name -> (D,))."""
    dtypes = {"t_a": "int8"} if feature_dtypes is None else dict(feature_dtypes)
    layout = zarr_layout(num_rows=n, resolution=16, variants=variants, teachers=TEACHERS, shard_rows=shard_rows,
                    chunk_rows=chunk_rows, feature_dtypes=dtypes)
    records = {k: {"spec": f"tiny:{k}", "tokens": t, "dim": d, "dtype": layout.feature_dtype(k),
                   "encode": {"precision": "fp32", "batch_size": 4, "compile": False},
                   **({"channel_scales": [float(v) for v in channel_scales[k]]} if k in (channel_scales or {}) else {})}
               for k, (t, d) in TEACHERS.items()}

    def tokens(rows, variants, lat):
        return {k: float_tokens(rows, variants, t, d, j) for j, (k, (t, d)) in enumerate(TEACHERS.items())}

    return _write_cache(path, layout, records, tokens, skipped)
