"""The writer contract of a cache format, and the entry each format gives the registry.

``cache.convert`` copies a cache into any format through :class:`CopyWriter` alone: it reads blocks of
``block_rows`` rows from the source (checked as they are read) and hands each to the writer, in row
order, skipping the blocks :meth:`CopyWriter.done_blocks` says a killed run already wrote. Each format
writes under the temporary name it is given; the caller renames it to the destination at the end.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .layout import Layout
from .manifest import Manifest
from .reader import CacheReader

__all__ = ["CopyWriter", "Format"]


class CopyWriter(abc.ABC):
    """Writes a copy of a cache block by block. ``arrays`` of a block: every array of the target layout
    (:meth:`cache.layout.Layout.array_names`) in its stored dtype, rows ``lo .. lo + block_rows`` (fewer
    for the last block)."""

    block_rows: int
    #: Bytes the copy takes on disk while it is written, per byte of row data (FFCV stages the rows first).
    space_factor: float = 1.0

    def done_blocks(self) -> set[int]:
        """First rows of the blocks a killed run of the same copy already wrote (default: none; the format
        starts again)."""
        return set()

    @abc.abstractmethod
    def write_block(self, lo: int, arrays: Mapping[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def finish(self) -> None:
        """Write what makes the copy a cache (its record, checksums, the format's own file)."""

    def close(self) -> None:  # noqa: B027 (a real default: nothing held open)
        """Release what is open, finished or not."""


@dataclass(frozen=True)
class Format:
    """One cache format as the registry (:mod:`cache.formats`) knows it.

    ``claims(path)``: whether the local file or folder at ``path`` is this format's (it may raise
    :class:`cache.errors.CacheError` for something that is half its own); ``open(url, allow_incomplete=)``:
    the reader; ``copy_writer(tmp, layout=, manifest=, sources=, block_rows=, **options)``: a
    :class:`CopyWriter` of a copy at ``tmp``; ``options``: the names of the options its copy writer takes
    (e.g. HDF5's ``compression``); ``remote``: whether it reads store URLs (``s3://`` and the like)."""

    name: str
    claims: Callable[[str], bool]
    open: Callable[..., CacheReader]
    copy_writer: Callable[..., CopyWriter]
    options: tuple[str, ...] = ()
    remote: bool = False
    description: str = ""

    def writer(self, tmp: str, *, layout: Layout, manifest: Manifest, sources: list[dict[str, Any]],
               block_rows: int, **options: Any) -> CopyWriter:
        """:attr:`copy_writer` with the options this format takes (the others are not its concern)."""
        mine = {k: v for k, v in options.items() if k in self.options}
        return self.copy_writer(tmp, layout=layout, manifest=manifest, sources=sources, block_rows=block_rows, **mine)
