"""Listing an ImageNet-style folder ``SOURCE/<class_name>/<image>`` in a fixed order."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

_logger = logging.getLogger(__name__)

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


def unsafe_source_path(path: object) -> str:
    """Why a source path read from a stored listing could leave its SOURCE folder ('' if it cannot):
    it must be a relative POSIX path without ``..`` or empty parts."""
    if not isinstance(path, str) or not path:
        return "is not a path"
    if path.startswith("/") or "\\" in path or (len(path) > 1 and path[1] == ":"):
        return "is absolute"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        return "is not a plain relative path (it has '..', '.' or empty parts)"
    return ""


def escapes_root(root: str, path: str) -> bool:
    """Whether ``root/path``, with every symlink resolved, lies outside both ``root`` and its class folder
    (``root/<first part of path>``, which may itself be a link to the user's images elsewhere)."""
    resolved = os.path.realpath(os.path.join(root, path))
    allowed = {os.path.realpath(root), os.path.realpath(os.path.join(root, path.split("/")[0]))}
    return not any(resolved == a or resolved.startswith(a.rstrip(os.sep) + os.sep) for a in allowed)


def file_size(path: Path) -> tuple[int, str]:
    """(size in bytes, '') of an entry, or (-1, why it cannot be read): dangling link, link loop, no permission."""
    try:
        return path.stat().st_size, ""
    except FileNotFoundError:
        return -1, "dangling symlink (its target does not exist)" if path.is_symlink() else "vanished while listing"
    except PermissionError:
        return -1, "permission denied"
    except OSError as e:
        return -1, "symlink loop" if e.errno == errno.ELOOP else f"cannot stat: {e.strerror or e}"


def list_image_folder(root: str | os.PathLike, *, classes: int = 0, limit: int = 0,
                      exclude: str | os.PathLike | None = None) -> SourceListing:
    """Classes are the sub-folders of ``root`` sorted by name (label = position); images are the
    entries with an image extension under each class folder, at any depth, sorted by path.
    ``exclude`` (the cache being built, which may live inside SOURCE) is left out wherever it is, so that it
    never becomes a class or a sub-folder of one.

    An entry named like an image is listed whatever it is (a directory called ``x.jpg`` too, a
    dangling symlink or a link loop, with size -1), so that the build can record it as skipped
    rather than ignore it or stop. A sub-folder that cannot be read is logged as a warning.
    ``classes`` keeps the first K classes, ``limit`` the first N images of the listing (0: all).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"SOURCE {root} is not a folder")
    skip = os.path.realpath(exclude) if exclude is not None else None

    def excluded(path: str | os.PathLike) -> bool:
        return skip is not None and os.path.realpath(path) == skip

    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                   and not excluded(e.path))
    if not names:
        raise ValueError(f"SOURCE {root} has no class folders (expected SOURCE/<class_name>/<image>)")
    if classes:
        names = names[:classes]
    files: list[dict] = []
    for label, name in enumerate(names):
        found = []
        def unreadable(e: OSError) -> None:
            _logger.warning("cannot list %s (%s): its images are left out", e.filename, e.strerror or e)

        for dirpath, dirnames, filenames in os.walk(root / name, onerror=unreadable):
            entries = [(d, True) for d in dirnames] + [(f, False) for f in filenames]
            keep_dirs = []
            for entry, is_dir in entries:
                if entry.startswith("."):
                    continue
                if entry.lower().endswith(IMAGE_EXTENSIONS):
                    full = Path(dirpath) / entry
                    size = 0 if is_dir else file_size(full)[0]
                    found.append({"path": full.relative_to(root).as_posix(), "size": size, "label": label})
                elif is_dir and not excluded(os.path.join(dirpath, entry)):
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
