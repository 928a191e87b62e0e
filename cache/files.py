"""Local files as every format and entry point writes and watches them: JSON records written
atomically, and the stamp that tells whether a file was replaced since it was opened."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

__all__ = ["ENV_LIBRARY_IO", "library_io_forced", "checksum", "file_checksum", "write_json", "FileStamp", "local_root"]

ENV_LIBRARY_IO = "UREPA_IO"  # "library": every format through its library's own I/O (zarr, h5py)


def library_io_forced() -> bool:
    """Whether ``UREPA_IO=library`` asks every format for its library's own I/O (zarr's, h5py's) instead
    of direct byte-range reads and writes."""
    value = os.environ.get(ENV_LIBRARY_IO, "").strip().lower()
    if value not in ("", "auto", "direct", "library"):
        raise ValueError(f"{ENV_LIBRARY_IO}={value!r}: use 'library' (force each format's library I/O) or leave it unset")
    return value == "library"


def checksum(*parts: bytes | np.ndarray) -> str:
    """The checksum recorded for stored bytes (the parts in order): ``crc32c:`` and 8 hex digits. Catches
    any flipped byte or truncation of an object."""
    import google_crc32c

    crc = 0
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part).reshape(-1).view(np.uint8)  # no copy; google_crc32c takes arrays
        crc = google_crc32c.extend(crc, part)
    return f"crc32c:{int(crc):08x}"


def file_checksum(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """:func:`checksum` of a whole file's bytes, read in blocks."""
    import google_crc32c

    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = google_crc32c.extend(crc, chunk)
    return f"crc32c:{int(crc):08x}"


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """``data`` as JSON at ``path``, atomically (a temporary file beside it, then a rename): a record is
    never half-written, and never holds NaN or infinity (ValueError: JSON has no such numbers, and a
    reader would take them for results)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class FileStamp(NamedTuple):
    """What identifies one version of a file: inode, modification time and size. A file rewritten in
    place or replaced by a rename gets another stamp."""

    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        st = os.stat(path)
        return cls(st.st_ino, st.st_mtime_ns, st.st_size)

    @classmethod
    def now(cls, path: str | os.PathLike) -> FileStamp | None:
        """The file's stamp, or None when it is gone."""
        try:
            return cls.of(path)
        except OSError:
            return None


def local_root(url: str | os.PathLike) -> str | None:
    """The local file or folder a cache location names (a plain path or a ``file://`` URL), or None for a
    store URL of another kind (``s3://``, ``memory://``, ...)."""
    s = os.fspath(url)
    if s.startswith("file://"):
        return s[len("file://"):]
    return None if "://" in s else s
