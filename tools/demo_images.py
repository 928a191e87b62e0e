"""Build a small ImageNet-style folder of real photos for demos and tests.

Usage: python -m tools.demo_images ROOT [--per-class N] [--seed S]

Each class is one sample photo shipped with scikit-image (plus scikit-learn's
china/flower photos when scikit-learn is installed); its images are random
crops saved as ``ROOT/<class>/<class>_<index>.JPEG``. A few crops are saved
as PNG, grayscale JPEG or CMYK JPEG so that readers exercise mode conversion.
The output depends only on the parameters, and ``ROOT/.demo.json`` records
them so that a rerun with the same parameters writes nothing.
"""

import json
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cache.cli.config import ConfigError, check_fields, parse_config

MARKER = ".demo.json"
FORMAT_VERSION = 1
JPEG_QUALITY = 90


def _skimage_photo(name: str) -> Callable[[], np.ndarray]:
    """Return a loader for the scikit-image sample photo ``name``."""

    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()

    return load


def _sklearn_photo(name: str) -> Callable[[], np.ndarray]:
    """Return a loader for scikit-learn's sample photo ``name`` (china or flower)."""

    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


SOURCES: dict[str, Callable[[], np.ndarray]] = {
    **{
        name: _skimage_photo(name)
        for name in (
            "astronaut",
            "chelsea",
            "coffee",
            "hubble_deep_field",
            "immunohistochemistry",
            "motorcycle",
            "retina",
            "rocket",
        )
    },
    "china": _sklearn_photo("china"),
    "flower": _sklearn_photo("flower"),
}


def load_sources() -> dict[str, Image.Image]:
    """Load every sample photo that is available offline, as RGB images keyed by class name."""
    photos = {}
    for name, load in SOURCES.items():
        try:
            array = load()
        except (ImportError, OSError, AttributeError, ValueError):
            continue
        photos[name] = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    return photos


def image_format(index: int) -> tuple[str, str]:
    """Return (file extension, Pillow mode) for the ``index``-th image written overall.

    Every 7th image is an RGB PNG; a few others are grayscale or CMYK JPEGs.
    """
    if index % 7 == 6:
        return ".png", "RGB"
    if index % 23 == 4:
        return ".JPEG", "L"
    if index % 23 == 15:
        return ".JPEG", "CMYK"
    return ".JPEG", "RGB"


def random_crop(photo: Image.Image, rng: np.random.Generator, min_size: int, max_size: int) -> Image.Image:
    """Crop a random box with sides in [min_size, max_size], upscaling the photo if it is too small."""
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    scale = max(width / photo.width, height / photo.height)
    if scale > 1:
        size = (math.ceil(photo.width * scale), math.ceil(photo.height * scale))
        photo = photo.resize(size, Image.Resampling.BICUBIC)
    left = int(rng.integers(0, photo.width - width + 1))
    top = int(rng.integers(0, photo.height - height + 1))
    return photo.crop((left, top, left + width, top + height))


def save_image(image: Image.Image, path: Path, mode: str) -> None:
    """Save ``image`` converted to ``mode``; the format follows the file extension."""
    image = image.convert(mode)
    if path.suffix == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=JPEG_QUALITY)


def _is_complete(root: Path, params: dict) -> bool:
    """Whether ``root`` holds a finished set written with exactly ``params``."""
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("params") != params:
        return False
    return all((root / name).is_file() for name in recorded.get("files", []))


def _remove_stale(class_dir: Path, class_name: str, keep: set[str]) -> None:
    """Delete images from an earlier run in ``class_dir`` that this run does not write."""
    pattern = re.compile(rf"{re.escape(class_name)}_\d{{5}}\.(JPEG|png)")
    for path in class_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep and path.is_file():
            path.unlink()


def make_demo_imagefolder(
    root: str | Path,
    *,
    per_class: int = 40,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 420,
) -> dict:
    """Write ``per_class`` random crops of each sample photo to ``root/<class>/``.

    Returns ``{"classes": [...], "num_images": N}``. Does nothing when ``root``
    already holds a complete set written with the same parameters.
    """
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    root = Path(root)
    photos = load_sources()
    classes = sorted(photos)
    params = {
        "version": FORMAT_VERSION,
        "per_class": per_class,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
        "classes": classes,
    }
    summary = {"classes": classes, "num_images": per_class * len(classes)}
    if _is_complete(root, params):
        return summary

    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    files = []
    for class_index, name in enumerate(classes):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        class_dir = root / name
        class_dir.mkdir(exist_ok=True)
        names = set()
        for i in range(per_class):
            suffix, mode = image_format(class_index * per_class + i)
            path = class_dir / f"{name}_{i:05d}{suffix}"
            save_image(random_crop(photos[name], rng, min_size, max_size), path, mode)
            names.add(path.name)
            files.append(f"{name}/{path.name}")
        _remove_stale(class_dir, name, names)
    tmp = root / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"params": params, "files": files}, indent=1))
    os.replace(tmp, root / MARKER)
    return summary


@dataclass(frozen=True)
class DemoImagesConfig:
    """Build a small ImageNet-style folder of real photos."""

    root: str = field(default="", metadata={"help": "output folder"})
    per_class: int = field(default=40, metadata={"min": 1, "max": 10000, "help": "images per class"})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1, "help": "random seed"})

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("give the output folder ROOT")
        check_fields(self)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args, dry_run = parse_config(DemoImagesConfig, argv, positional=("root",), description=__doc__.splitlines()[0])
    if dry_run:
        return
    summary = make_demo_imagefolder(args.root, per_class=args.per_class, seed=args.seed)
    print(f"{summary['num_images']} images in {len(summary['classes'])} classes at {args.root}")


if __name__ == "__main__":
    main()
