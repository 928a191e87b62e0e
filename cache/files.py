"""Local files as every format and entry point writes and watches them: JSON records written
atomically, and the stamp that tells whether a file was replaced since it was opened."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, NamedTuple

import numpy as np

__all__ = ["ENV_LIBRARY_IO", "library_io_forced", "checksum", "file_checksum", "write_json", "FileStamp", "local_root",
           "ProcessFile", "pread_rows"]

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


class ProcessFile:
    """A read-only descriptor of a local file, opened lazily in each process that reads (never inherited
    across a fork: a forked worker opens its own), shared by that process's threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: tuple[int, int] | None = None  # (pid, fd)

    def fd(self) -> int:
        with self._lock:
            if self._fd is None or self._fd[0] != os.getpid():
                self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
            return self._fd[1]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._fd[0] == os.getpid():
                os.close(self._fd[1])
            self._fd = None


def pread_rows(fds: int | np.ndarray, offsets: np.ndarray, out: np.ndarray) -> int | None:
    """Row i of ``out`` (its raw bytes) read from file descriptor ``fds`` (or ``fds[i]``) at byte ``offsets[i]``
    with ``os.preadv`` straight into the buffer, short reads retried; an offset of -1 leaves zeros (a chunk never
    stored). Returns the index of the first row whose file ends before its bytes do, or None: the caller names
    the file in its own error."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    size = view.nbytes // max(len(out), 1)
    per_row = None if isinstance(fds, int) else fds.tolist()  # Python ints: no numpy scalar per row
    for i, offset in enumerate(offsets.tolist()):
        if offset < 0:
            out[i] = 0
            continue
        fd = fds if per_row is None else per_row[i]
        dst = view[i * size:(i + 1) * size]
        got = os.preadv(fd, [dst], offset)
        while got < size:  # short read
            n = os.preadv(fd, [dst[got:]], offset + got)
            if n == 0:
                return i
            got += n
    return None
