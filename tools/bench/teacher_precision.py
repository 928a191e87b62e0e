"""Measure the teacher's tokens under float16 (or bfloat16) autocast against float32/TF32, as the build encodes them.

    python -m tools.bench.teacher_precision [--images 32] [--test fp16|bf16] [--reference tf32|fp32]
        [--teacher random:vit_base_patch14_dinov2.lvd142m] [--resolution 256] [--out bench-out]
    make bench-teacher-precision

REPA runs DINOv2 inside its training's float16 autocast; ``pipeline.build`` encodes it in TF32 by default
and stores float16 (``--teacher-precision fp16`` does what REPA does). This encodes the same images
twice through the build's own ``Encoders`` (``teacher_precision`` = ``--reference`` and ``--test``), keeps
the tokens as the cache stores them (float16), and reports, in float64:

- the relative L2 error ``||test - ref||_F / ||ref||_F`` over all tokens (:func:`relative_l2`), the mean
  per-token relative L2 and the mean and min per-token cosine;
- the U-REPA alignment and manifold losses (``trainer.losses.urepa_alignment``) of the same projected
  student tokens against each token set, and their absolute and relative differences, for two fixed
  students (``tools.bench.int8.make_students``): ``aligned`` (cosine ``--student-cos`` to the
  reference tokens, plus noise: losses of the size training sees) and ``random`` (unrelated).

Images: the demo photos (``tools.demo_images``) ADM-cropped to ``--resolution``, or synthetic JPEGs
without scikit-image. The DINOv2-B architecture has seeded random weights (``random:`` spec): a real
DINOv2's tokens are not measured here. On a CPU, TF32 is float32. Writes ``OUT/bench_teacher_precision.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cache.cli.config import ConfigError, check_fields, config_to_dict, parse_config
from cache.cli.runtime import resolve_device
from pipeline.build import Encoders
from pipeline.decode import load_image
from pipeline.encoders import load_teacher
from tools.bench.cache import machine_info, synthetic_folder
from tools.bench.int8 import cosine_stats, loss_errors, make_students
from tools.demo_images import load_sources, make_demo_imagefolder
from tools.evaluate import list_images


@dataclass(frozen=True)
class BenchTeacherPrecisionConfig:
    """Teacher tokens under float16 autocast against float32/TF32, and the U-REPA loss difference."""

    out: str = field(default="bench-out", metadata={"help": "folder for the images and the JSON"})
    teacher: str = field(default="random:vit_base_patch14_dinov2.lvd142m", metadata={
        "help": "teacher spec (pipeline.build --teacher); random: seeded random weights"})
    test: Literal["fp16", "bf16"] = field(default="fp16", metadata={"help": "the precision measured"})
    reference: Literal["tf32", "fp32"] = field(default="tf32", metadata={
        "help": "the precision measured against (the build's default tf32; float32 on a CPU)"})
    images: int = field(default=32, metadata={"help": "images encoded", "min": 2, "max": 100_000})
    resolution: int = field(default=256, metadata={"help": "image side (teacher grid resolution / 16)", "min": 16, "max": 1024})
    batch_size: int = field(default=8, metadata={"help": "images per teacher forward", "min": 1, "max": 4096})
    student_cos: float = field(default=0.6, metadata={"help": "cosine of the aligned student to the tokens", "min": -1.0, "max": 1.0})
    student_noise: float = field(default=0.5, metadata={
        "help": "noise std of the aligned student, relative to the tokens' RMS", "min": 0.0, "max": 100.0})
    seed: int = field(default=0, metadata={"help": "random teacher weights and students", "min": 0, "max": 2**31 - 1})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not -1.0 <= self.student_cos <= 1.0:
            raise ConfigError(f"--student-cos must be in [-1, 1], got {self.student_cos}")


def relative_l2(test: torch.Tensor, ref: torch.Tensor) -> float:
    """``||test - ref||_F / ||ref||_F`` over every element, in float64."""
    ref64 = ref.double()
    return float((test.double() - ref64).norm() / ref64.norm())


def load_images(bc: BenchTeacherPrecisionConfig, out: Path) -> tuple[np.ndarray, str]:
    """uint8 (images, R, R, 3): the demo photos' crops (or synthetic JPEGs), ADM-cropped to the resolution."""
    photos = len(load_sources())
    if photos:
        folder = out / "teacher-precision-photos"
        make_demo_imagefolder(folder, per_class=-(-bc.images // photos), seed=0)
        source = "demo photos (tools.demo_images)"
    else:
        folder = synthetic_folder(out / "teacher-precision-jpegs", bc.images)
        source = "synthetic JPEGs (tools.bench.cache)"
    paths = list_images(str(folder))[:bc.images]
    return np.stack([load_image(p, bc.resolution, max_pixels=1 << 28) for p in paths]), source


@torch.no_grad()
def encode(teacher: torch.nn.Module, images: np.ndarray, precision: str, *, batch: int,
           device: torch.device) -> tuple[torch.Tensor, float]:
    """The teacher's tokens (n, T, D) as the build stores them (float16), encoded in ``precision``, and the
    seconds it took."""
    enc = Encoders(None, {"teacher": teacher}, flip=False, autocast=None, teacher_precision=precision)
    enc = enc.to(device).eval()
    parts = []
    t = time.perf_counter()
    for lo in range(0, len(images), batch):
        _, feats = enc(torch.from_numpy(images[lo:lo + batch]).to(device))
        parts.append(feats["teacher"][:, 0].cpu())
    return torch.cat(parts), time.perf_counter() - t


def measure(bc: BenchTeacherPrecisionConfig, out: Path) -> dict[str, Any]:
    device = resolve_device(bc.device)
    images, source = load_images(bc, out)
    teacher = load_teacher(bc.teacher, resolution=bc.resolution, seed=bc.seed)
    ref, ref_s = encode(teacher.module, images, bc.reference, batch=bc.batch_size, device=device)
    test, test_s = encode(teacher.module, images, bc.test, batch=bc.batch_size, device=device)
    if not bool(torch.isfinite(test).all()):
        raise SystemExit(f"error: the {bc.test} tokens hold NaN or infinite values")
    students = make_students(ref, cos=bc.student_cos, noise=bc.student_noise, seed=bc.seed)
    return {
        "teacher": bc.teacher, "random_weights": teacher.info.get("random_weights"), "images": len(images),
        "images_from": source, "resolution": bc.resolution, "token_shape": list(ref.shape[1:]),
        "reference": bc.reference, "test": bc.test, "encode_s": {bc.reference: ref_s, bc.test: test_s},
        "relative_l2": relative_l2(test, ref), **cosine_stats(test, ref),
        "losses": loss_errors(students, test, ref, batch=bc.batch_size),
    }


def report_lines(r: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    lines = [f"{r['teacher']} ({'random weights' if r['random_weights'] else 'pretrained'}), {r['images']} images "
             f"at {r['resolution']} px ({r['images_from']}), tokens {r['token_shape']} stored float16; "
             f"machine: {machine['device']}, {machine['cpus']} CPUs, torch {machine['torch']}",
             f"{r['test']} autocast against {r['reference']}: relative L2 {r['relative_l2']:.3e} (per token: mean "
             f"{r['rel_l2_mean']:.3e}); token cosine mean {r['cos_mean']:.7f}, min {r['cos_min']:.7f}"]
    for name, e in r["losses"].items():
        lines.append(f"student {name:8s}: L_align {e['align']:+.6f}, |diff| {e['align_abs_err']:.2e} "
                     f"(rel {e['align_rel_err']:.2e}); L_manifold {e['manifold']:.6f}, |diff| "
                     f"{e['manifold_abs_err']:.2e} (rel {e['manifold_rel_err']:.2e})")
    return lines


def main(argv: list[str] | None = None) -> int:
    bc, dry = parse_config(BenchTeacherPrecisionConfig, argv)
    if dry:
        return 0
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(bc.seed)
    result = measure(bc, out)
    machine = machine_info(resolve_device(bc.device))
    (out / "bench_teacher_precision.json").write_text(json.dumps(
        {"config": config_to_dict(bc), "machine": machine, "result": result}, indent=2))
    print("\n".join(report_lines(result, machine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
