"""The errors of ``cache``: typed, each carrying the facts (the cache, the object, what differs) and which
kind of remedy applies; the entry points word the advice (:mod:`cache.cli.advice`), so that no message
of the library names a flag of a command above it.

Every error of this package is a :class:`CacheError`. ``remedy`` says what kind of fix applies, as a
word of :data:`REMEDIES`, never as a command line:

    rebuild     the cache is damaged or unreadable: build it again (or restore it from a copy)
    resume      the cache is unfinished: run its build again to finish it
    repair      objects of a finished cache are damaged or missing: verify it, re-encode what is named
    reconvert   a converted copy is damaged or is not one: convert it again
    settings    an existing cache was built with other settings: same settings, another place, or replace it
    replace     something that is not this cache is in the way: another place, or replace it
    addition    an unfinished addition of teachers: finish it, or drop the teachers being added
    restart     the cache changed under a reader: open it again
    store       the object store does not answer, refuses the credentials or lacks the bucket: its settings
    client      the client package of a store is not installed: install it
    space       the disk that a write goes to is full: free space there and run the same command again
    None        nothing to advise (a programming error, or the message says it all)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = ["REMEDIES", "Remedy", "CacheError", "CacheMismatchError", "CacheChangedError", "ShardReadError"]

Remedy = Literal["rebuild", "resume", "repair", "reconvert", "settings", "replace", "addition", "restart", "store",
                 "client", "space"]
REMEDIES: tuple[str, ...] = Remedy.__args__


class CacheError(RuntimeError):
    """The cache is missing, incomplete or malformed. ``url``: the cache (None where none is concerned);
    ``remedy``: which kind of fix applies (:data:`REMEDIES`), or None."""

    remedy: Remedy | None = None

    def __init__(self, message: str, *, url: str | None = None, remedy: Remedy | None = None) -> None:
        super().__init__(message)
        self.url = url
        if remedy is not None:
            if remedy not in REMEDIES:
                raise ValueError(f"unknown remedy {remedy!r}")
            self.remedy = remedy


class CacheMismatchError(CacheError):
    """An existing cache was built from another source, encoder or setting, or something that is not this
    cache is in the way. ``differences``: one line per differing manifest entry (may be empty);
    ``teachers``: the teachers the cache at ``url`` holds, ``wanted``: those the refused run names (for the
    advice on adding or dropping one)."""

    remedy: Remedy | None = "settings"

    def __init__(self, message: str, *, url: str | None = None, remedy: Remedy | None = None,
                 differences: Sequence[str] = (), teachers: Sequence[str] = (), wanted: Sequence[str] = ()) -> None:
        super().__init__(message, url=url, remedy=remedy)
        self.differences = tuple(differences)
        self.teachers = tuple(teachers)
        self.wanted = tuple(wanted)  # the teachers the refused run names

    @property
    def headline(self) -> str:
        """The message without the list of differences."""
        return str(self.args[0])

    def __str__(self) -> str:
        return self.headline + ("" if not self.differences else ":\n  " + "\n  ".join(self.differences))


class CacheChangedError(CacheError):
    """The cache was rebuilt or removed while it was being read."""

    remedy: Remedy | None = "restart"


class ShardReadError(CacheError):
    """A stored object of a finished cache is damaged or missing; ``where`` names the object (a file or URL)."""

    remedy: Remedy | None = "repair"

    def __init__(self, message: str, *, url: str | None = None, where: str | None = None,
                 remedy: Remedy | None = None) -> None:
        super().__init__(message, url=url, remedy=remedy)
        self.where = where
