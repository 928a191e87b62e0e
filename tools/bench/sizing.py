"""Sizing a cache and the storage and network behind it, computed from the cache's layout and measured rates.

    python -m tools.bench.sizing            # the tables of docs/sizing.md (tests/test_sizing.py holds them equal)

Bytes come from the layout the build writes (:meth:`cache.ZarrStorage.nbytes`: every inner chunk and
shard index, the shard and chunk rows of the build presets), never from a hand count. Rates are the
measured figures of :data:`STEP_RATES` and :data:`BUILD_RATES`, each with its machine and source; every
other figure is computed from those two by the functions below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cache import ZarrStorage, zarr_layout
from cache.layout import SCALES_GROUP, stored_dtype
from pipeline.encoders import teacher_grid

IMAGENET_TRAIN_IMAGES = 1_281_167
TEACHERS = {"DINOv2-B": ("vit_base_patch14_dinov2.lvd142m", 768), "DINOv2-L": ("vit_large_patch14_dinov2.lvd142m", 1024)}
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Rate:
    """One measured rate: what ran, images per second, on which machine, from where."""

    what: str
    img_s: float
    machine: str
    source: str


#: Training steps per GPU (random weights; B=256 global on one GPU, bf16 autocast).
STEP_RATES = (
    Rate("SiT-down-B step, compiled", 2488, "one H200, torch 2.11, 2026-11-27", "project measurements (measurements.md)"),
    Rate("SiT-down-B, trainer.train --compile, loader included", 2232, "one H200, torch 2.11, 2026-11-28",
         "project measurements (measurements.md)"),
    Rate("SiT-down-B step, eager", 1427, "one H200, torch 2.11, 2026-11-27", "project measurements (measurements.md)"),
    Rate("SiT-down-XL step, compiled", 624, "one H200, torch 2.11, 2026-11-27", "docs/benchmarks.md"),
    Rate("SiT-down-XL step, eager", 401, "one H200, torch 2.11, 2026-11-27", "docs/benchmarks.md"),
)

#: The build (decode, crop, SD-VAE encoder, DINOv2-B, writes) per GPU, one variant, and its parts.
BUILD_RATES = (
    Rate("pipeline.build, SD-VAE + DINOv2-B, bf16 compiled", 1071.6, "one H100 80GB, 16 CPUs, torch 2.11",
         "docs/benchmarks.md (bench/h100_build_compile.json)"),
    Rate("pipeline.build, SD-VAE + DINOv2-B, bf16 eager", 415.4, "one H100 80GB, 16 CPUs, torch 2.11",
         "docs/benchmarks.md (bench/h100_build_eager.json)"),
    Rate("DINOv2-L forward alone, bf16 eager", 2171, "one H200, torch 2.11, 2026-11-27",
         "project measurements (measurements.md)"),
    Rate("JPEG decode + crop to 256, 16 CPU processes", 1795, "the H200 machine's 16 CPUs, 2026-11-27",
         "docs/benchmarks.md"),
)

#: What the store has to answer, measured: the SeaweedFS server of the tests on the 2-core machine.
SMALL_GETS_PER_S = Rate("single-row range GETs, 32 in flight (GETs/s)", 395,
                        "SeaweedFS 4.48 `weed mini` on loopback, 2-core CPU (loaded)", "docs/remote.md")


def layout_of(teacher: str, dtype: str, *, resolution: int = 256, variants: int = 1, rows: int = IMAGENET_TRAIN_IMAGES):
    """The layout a build writes for one teacher: shards of 256 rows at 256 px (64 above), chunks of 16."""
    timm, dim = TEACHERS[teacher]
    return zarr_layout(num_rows=rows, resolution=resolution, variants=variants,
                       teachers={timm: (teacher_grid(resolution) ** 2, dim)},
                       shard_rows=256 if resolution <= 256 else 64, chunk_rows=16,
                       feature_dtypes={timm: stored_dtype(dtype)})


def stored_bytes(teacher: str, dtype: str, *, resolution: int = 256, variants: int = 1,
                 rows: int = IMAGENET_TRAIN_IMAGES) -> dict[str, int]:
    """Bytes of each part of the cache (``latents``, ``labels``, ``tokens``: the teacher's tokens and, int8, their
    scales), from :meth:`ZarrStorage.nbytes`."""
    layout = layout_of(teacher, dtype, resolution=resolution, variants=variants, rows=rows)
    nb = ZarrStorage.of(layout).nbytes(layout)
    timm = TEACHERS[teacher][0]
    return {"latents": nb["latents"], "labels": nb["labels"],
            "tokens": nb[f"features/{timm}"] + nb.get(f"{SCALES_GROUP}/{timm}", 0)}


def bytes_per_image(teacher: str, dtype: str, *, resolution: int = 256) -> dict[str, float]:
    """Stored bytes per image and variant (shard indexes and padding included): latents, the teacher's tokens,
    and a sample as the loader reads it (latents + tokens of one variant)."""
    b = stored_bytes(teacher, dtype, resolution=resolution, variants=1)
    n = IMAGENET_TRAIN_IMAGES
    return {"latents": b["latents"] / n, "tokens": b["tokens"] / n, "sample": (b["latents"] + b["tokens"]) / n}


def imagenet_totals(resolution: int = 256) -> list[dict[str, Any]]:
    """ImageNet-1k totals per teacher, dtype and variants."""
    out = []
    for teacher in TEACHERS:
        for dtype in ("fp16", "int8"):
            for variants in (1, 2):
                b = stored_bytes(teacher, dtype, resolution=resolution, variants=variants)
                out.append({"teacher": teacher, "dtype": dtype, "variants": variants, "bytes": sum(b.values())})
    return out


def read_bandwidth(rate: Rate, sample_bytes: float) -> dict[str, float]:
    """Bytes/s a GPU and a node of :data:`GPUS_PER_NODE` read at ``rate``."""
    per_gpu = rate.img_s * sample_bytes
    return {"gpu": per_gpu, "node": per_gpu * GPUS_PER_NODE}


def build_hours(rate: Rate, *, variants: int = 1, images: int = IMAGENET_TRAIN_IMAGES) -> float:
    """Hours on one GPU to build ImageNet-1k at ``rate`` (measured for one variant; the mirrored variant runs the
    encoders on twice the images, so the encoder-bound rate halves)."""
    return images * variants / rate.img_s / 3600


def team(gpus: int, rate: Rate, sample_bytes: float, *, arrays: int = 2, chunk_rows: int = 16,
         cache_bytes: int = 0) -> dict[str, float]:
    """What ``gpus`` GPUs training at ``rate`` ask of the store: bytes/s in all, GETs/s with the full permutation
    (one GET per sample per array read: latents and tokens, and int8 scales) and with the block order (one GET
    per chunk of ``chunk_rows`` per array), an epoch's seconds, per node the link in Gbit/s, and the bytes the
    first epoch fetches with ``--cache-local`` (the whole cache of ``cache_bytes`` per node)."""
    img_s = gpus * rate.img_s
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    return {"gpus": gpus, "nodes": nodes, "bytes_s": img_s * sample_bytes, "gets_permutation": img_s * arrays,
            "gets_blocks": img_s * arrays / chunk_rows, "epoch_s": IMAGENET_TRAIN_IMAGES / img_s,
            "node_gbit": min(gpus, GPUS_PER_NODE) * rate.img_s * sample_bytes * 8 / 1e9,
            "first_epoch_download_bytes": nodes * cache_bytes}


# ------------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def markdown() -> str:
    """Every table of docs/sizing.md, in order."""
    lines = ["### Bytes per image (256 px: 32x32x8 latents, 16x16 tokens; one variant; shard indexes included)", "",
             "| teacher | dtype | latents (bytes) | tokens (bytes) | a sample read (latents + tokens) |",
             "|---|---|---|---|---|"]
    for teacher in TEACHERS:
        for dtype in ("fp16", "int8"):
            b = bytes_per_image(teacher, dtype)
            lines.append(f"| {teacher} | {dtype} | {b['latents']:,.0f} | {b['tokens']:,.0f} | {b['sample']:,.0f} |")
    lines += ["", f"### ImageNet-1k totals ({IMAGENET_TRAIN_IMAGES:,} images, 256 px, GB = 1e9 bytes)", "",
              "| teacher | dtype | one variant | mirrored too (`--flip both`) |", "|---|---|---|---|"]
    totals = {(t["teacher"], t["dtype"], t["variants"]): t["bytes"] for t in imagenet_totals()}
    for teacher in TEACHERS:
        for dtype in ("fp16", "int8"):
            lines.append(f"| {teacher} | {dtype} | {_gb(totals[teacher, dtype, 1])} | {_gb(totals[teacher, dtype, 2])} |")
    lines += ["", "### Read bandwidth at measured step rates (DINOv2-B teacher; GB/s = 1e9 bytes/s)", "",
              "| step | img/s per GPU | machine, source | fp16: per GPU | per node of 8 | int8: per GPU | per node of 8 |",
              "|---|---|---|---|---|---|---|"]
    fp16, int8 = bytes_per_image("DINOv2-B", "fp16")["sample"], bytes_per_image("DINOv2-B", "int8")["sample"]
    for r in STEP_RATES:
        a, b = read_bandwidth(r, fp16), read_bandwidth(r, int8)
        lines.append(f"| {r.what} | {r.img_s:,.0f} | {r.machine}; {r.source} | {a['gpu'] / 1e9:.2f} | "
                     f"{a['node'] / 1e9:.1f} | {b['gpu'] / 1e9:.2f} | {b['node'] / 1e9:.1f} |")
    lines += ["", "### Build hours per GPU (ImageNet-1k, 256 px)", "",
              "| what | img/s | machine, source | one variant (h) | mirrored too (h) |", "|---|---|---|---|---|"]
    for r in BUILD_RATES[:2]:
        lines.append(f"| {r.what} | {r.img_s:,.1f} | {r.machine}; {r.source} | {build_hours(r):.2f} | "
                     f"{build_hours(r, variants=2):.2f} |")
    dino_l, decode = BUILD_RATES[2], BUILD_RATES[3]
    lines.append(f"| adding DINOv2-L (its forward alone) | {dino_l.img_s:,.0f} | {dino_l.machine}; {dino_l.source} | "
                 f"+{build_hours(dino_l):.2f} | +{build_hours(dino_l, variants=2):.2f} |")
    lines.append(f"| the CPU side's ceiling (decode + crop) | {decode.img_s:,.0f} | {decode.machine}; {decode.source} | "
                 f"{build_hours(decode):.2f} (floor) | {build_hours(decode):.2f} (decoded once) |")
    lines += ["", "### What a team needs (DINOv2-B; per GPU at the step rate named; a node of 8 GPUs)", "",
              "| step, img/s per GPU | tokens | GPUs | nodes | store read, GB/s | GETs/s, permutation | "
              "GETs/s, block order | per-node link, Gbit/s | epoch, s | `--cache-local` first epoch, TB fetched "
              "(mirrored cache) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rate, dtype in ((STEP_RATES[0], "fp16"), (STEP_RATES[0], "int8"), (STEP_RATES[3], "fp16")):
        sample = bytes_per_image("DINOv2-B", dtype)["sample"]
        arrays = 3 if dtype == "int8" else 2
        for gpus in (1, 8, 64):
            t = team(gpus, rate, sample, arrays=arrays, cache_bytes=totals["DINOv2-B", dtype, 2])
            lines.append(f"| {rate.what}, {rate.img_s:,.0f} | {dtype} | {gpus} | {t['nodes']} | "
                         f"{t['bytes_s'] / 1e9:.1f} | {t['gets_permutation']:,.0f} | {t['gets_blocks']:,.0f} | "
                         f"{t['node_gbit']:.0f} | {t['epoch_s']:,.0f} | {t['first_epoch_download_bytes'] / 1e12:.2f} |")
    lines += ["", f"For scale: the test server answered {SMALL_GETS_PER_S.img_s:,.0f} small GETs/s "
              f"({SMALL_GETS_PER_S.machine}; {SMALL_GETS_PER_S.source})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    del argv
    print(markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
