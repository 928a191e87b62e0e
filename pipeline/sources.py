"""Listing an ImageNet-style folder ``SOURCE/<class_name>/<image>`` in a fixed order."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class SourceListing:
    root: str
    classes: list[str]
    files: list[dict]  # {"path": relative posix path, "size": bytes, "label": class index}

    @property
    def fingerprint(self) -> str:
        """sha256 of the (path, size, label) list: changes when a file is added, removed or resized."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f['path']}\t{f['size']}\t{f['label']}\n".encode())
        return h.hexdigest()


def list_image_folder(root: str | os.PathLike, *, classes: int = 0, limit: int = 0) -> SourceListing:
    """Classes are the sub-folders of ``root`` sorted by name (label = position); images are the
    entries with an image extension under each class folder, at any depth, sorted by path.

    An entry named like an image is listed whatever it is (a directory called ``x.jpg`` too), so
    that the build can record it as skipped rather than ignore it silently. ``classes`` keeps the
    first K classes, ``limit`` the first N images of the listing (0: all).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"SOURCE {root} is not a folder")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"SOURCE {root} has no class folders (expected SOURCE/<class_name>/<image>)")
    if classes:
        names = names[:classes]
    files: list[dict] = []
    for label, name in enumerate(names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            entries = [(d, True) for d in dirnames] + [(f, False) for f in filenames]
            keep_dirs = []
            for entry, is_dir in entries:
                if entry.startswith("."):
                    continue
                if entry.lower().endswith(IMAGE_EXTENSIONS):
                    full = Path(dirpath) / entry
                    size = 0 if is_dir else full.stat().st_size
                    found.append({"path": full.relative_to(root).as_posix(), "size": size, "label": label})
                elif is_dir:
                    keep_dirs.append(entry)
            dirnames[:] = keep_dirs
        found.sort(key=lambda f: f["path"])
        files += found
        if limit and len(files) >= limit:
            break
    if limit:
        files = files[:limit]
    if not files:
        raise ValueError(f"SOURCE {root} holds no images with extensions {IMAGE_EXTENSIONS}")
    return SourceListing(root=str(root.resolve()), classes=names, files=files)
