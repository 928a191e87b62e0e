"""A node-local read-through copy of store objects: each object downloaded once into a local folder, within
a size bound, least recently used ones evicted; shared safely by every process of a node.

    node = NodeCache("/scratch/urepa", max_bytes=500e9)
    path = node.find(name) or node.local_path(name, size, download)   # None: does not fit

Folder::

    DIR/objects/<name>                   complete copies (only ever made by a rename: never half-written)
    DIR/objects/<name>.partial-<pid>-<r> a download in progress (or left by a killed one)
    DIR/locks/<hash>.lock                one lock file per object name (flock), held for a whole download
    DIR/space.lock                       held while space is counted, evicted and reserved

Names are chosen by the caller; the zarr reader puts the object's recorded checksum in the name, so a copy
is only ever served for the bytes that checksum was recorded for (a rebuilt shard is another name).

Processes. A download takes its object's lock (``fcntl.flock``, exclusive) and, holding it, checks again
whether another process finished the copy meanwhile: each object is downloaded once per node. Space is
counted, evicted and reserved (``posix_fallocate`` of the whole size: a full disk is found before a byte is
fetched) under ``space.lock``; a reservation counts in the total until its rename, so processes filling the
folder together stay within the bound. The kernel drops a killed process' locks: a partial file whose
object lock can be taken is left by a dead download and removed (at start, and whenever space is counted).

Use and eviction. Each use of a copy sets its modification time to now; eviction removes the least
recently used copies until the new object fits. A copy another process still has open may be evicted:
its open descriptor keeps reading the same bytes (POSIX), and the space returns when it closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import CacheError

__all__ = ["NodeCache", "NodeCacheStats", "PARTIAL"]

_logger = logging.getLogger(__name__)
PARTIAL = ".partial-"


@dataclass
class NodeCacheStats:
    """What this process did with the folder."""

    downloads: int = 0  # objects this process downloaded
    hits: int = 0  # objects found already there
    evictions: int = 0  # copies this process removed to make room
    stale_partials: int = 0  # partial files of dead downloads removed
    too_large: int = 0  # objects larger than the bound (not copied)


class NodeCache:
    """The local folder ``folder`` holding copies of store objects, at most ``max_bytes`` bytes of them (None:
    the space the folder's file system has free now plus what the folder holds, less 5%)."""

    def __init__(self, folder: str | os.PathLike, *, max_bytes: int | None = None) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self.objects = os.path.join(self.folder, "objects")
        self.locks = os.path.join(self.folder, "locks")
        try:
            os.makedirs(self.objects, exist_ok=True)
            os.makedirs(self.locks, exist_ok=True)
            probe = os.path.join(self.folder, f".probe-{os.getpid()}-{secrets.token_hex(4)}")
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            raise CacheError(f"{self.folder}: the node-local copy folder cannot be used: {e.strerror or e} "
                             f"({type(e).__name__})") from None
        self.stats = NodeCacheStats()
        with self._space():
            held = self._scan(clean=True)[0]
        if max_bytes is None:
            max_bytes = int((shutil.disk_usage(self.folder).free + held) * 0.95)
        if max_bytes < 1:
            raise CacheError(f"{self.folder}: the node-local copy needs a size bound of at least 1 byte, got {max_bytes}")
        self.max_bytes = int(max_bytes)

    # -- locks --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, path: str, *, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing drops the lock

    def _space(self) -> contextlib.AbstractContextManager[bool]:
        return self._flock(os.path.join(self.folder, "space.lock"))

    def _object_lock(self, name: str, *, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        return self._flock(os.path.join(self.locks, digest + ".lock"), blocking=blocking)

    # -- space --------------------------------------------------------------------------------
    def _scan(self, *, clean: bool) -> tuple[int, list[tuple[int, int, str]]]:
        """(bytes held: copies and reservations, [(mtime_ns, size, path)] of complete copies); with ``clean``,
        partial files of dead downloads are removed first. Call under the space lock."""
        total, copies = 0, []
        for root, _, files in os.walk(self.objects):
            for f in files:
                path = os.path.join(root, f)
                if PARTIAL in f:
                    if clean and self._remove_if_stale(path):
                        continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:  # renamed or removed meanwhile
                    continue
                total += st.st_size
                if PARTIAL not in f:
                    copies.append((st.st_mtime_ns, st.st_size, path))
        return total, copies

    def _remove_if_stale(self, partial: str) -> bool:
        """Remove a partial file whose download is dead (its object's lock is free); whether it was removed."""
        name = os.path.relpath(partial, self.objects).rsplit(PARTIAL, 1)[0]
        with self._object_lock(name, blocking=False) as free:
            if not free:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
                self.stats.stale_partials += 1
                _logger.info("%s: removed %s, left by a download that did not finish", self.folder, partial)
            return True

    def _reserve(self, name: str, size: int) -> str | None:
        """Evict least recently used copies until ``size`` more bytes fit, then create the partial file of
        ``name`` with the whole size allocated; its path, or None when the object is larger than the bound."""
        if size > self.max_bytes:
            self.stats.too_large += 1
            return None
        final = os.path.join(self.objects, name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with self._space():
            total, copies = self._scan(clean=True)
            for _, nbytes, path in sorted(copies):
                if total + size <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    total -= nbytes
                    self.stats.evictions += 1
            if total + size > self.max_bytes:  # reservations of other downloads fill it: do not wait
                return None
            partial = f"{final}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if size:
                    os.posix_fallocate(fd, 0, size)  # ENOSPC here, not halfway through the download
            except BaseException:
                os.close(fd)
                os.remove(partial)
                raise
            os.close(fd)
            return partial

    # -- the calls -----------------------------------------------------------------------------
    def find(self, name: str) -> str | None:
        """The path of the local copy of object ``name`` if there is one (its use recorded), else None."""
        final = os.path.join(self.objects, name)
        if self._touch(final):
            self.stats.hits += 1
            return final
        return None

    def local_path(self, name: str, size: int, download: Callable[[str], None]) -> str | None:
        """The path of the local copy of object ``name`` (``size`` bytes): found (its use recorded), or made by
        ``download(partial_path)``, which writes the object's bytes into that file (allocated to ``size``,
        from offset 0) and raises if they are wrong; then renamed into place. None when the object does not
        fit the bound. An error of ``download`` leaves nothing behind and is raised; a local disk error is an
        ``OSError``."""
        final = os.path.join(self.objects, name)
        if self._touch(final):
            self.stats.hits += 1
            return final
        with self._object_lock(name):
            if self._touch(final):  # another process finished it while this one waited
                self.stats.hits += 1
                return final
            partial = self._reserve(name, size)
            if partial is None:
                return None
            try:
                download(partial)
                if os.path.getsize(partial) != size:
                    raise OSError(errno.EIO, f"the download wrote {os.path.getsize(partial)} bytes, not {size}")
                os.replace(partial, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial)
                raise
            self.stats.downloads += 1
            return final

    def _touch(self, path: str) -> bool:
        """Record a use of the copy at ``path``; whether it exists."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def held_bytes(self) -> int:
        """Bytes the folder holds now (copies and reservations)."""
        with self._space():
            return self._scan(clean=False)[0]
