"""One zarr cache in every format, for the reader contract tests (tests/test_formats.py and others)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import cache
from cache.convert import convert

# case -> (format, the value of UREPA_IO while its tests run: None for the fast paths, "library" to force
# zarr's, h5py's and FFCV's own reads)
FORMAT_CASES = {
    "zarr": ("zarr", None),
    "zarr-library": ("zarr", "library"),
    "hdf5": ("hdf5", None),
    "hdf5-library": ("hdf5", "library"),
    "ffcv-library": ("ffcv", "library"),
    "ffcv": ("ffcv", None),  # last: a module-scoped fixture keeps the last case's setting until the module ends
}
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5", "ffcv": ".ffcv"}


def as_format(zarr_path: str | os.PathLike, fmt: str, folder: str | os.PathLike, **kw) -> cache.CacheReader:
    """The zarr cache at ``zarr_path`` opened as it is (``fmt`` 'zarr') or converted into ``folder``."""
    if fmt == "zarr":
        return cache.open_cache(zarr_path)
    return convert(zarr_path, Path(folder) / (Path(zarr_path).stem + SUFFIX[fmt]), format=fmt, progress=False, **kw)


def io_env(mp: pytest.MonkeyPatch, io: str | None) -> None:
    """Set the I/O switches for one case: direct reads where each format allows them, or library reads."""
    mp.delenv("UREPA_ZARR_IO", raising=False)
    if io is None:
        mp.delenv("UREPA_IO", raising=False)
    else:
        mp.setenv("UREPA_IO", io)


def direct_reads(loader: cache.CacheLoader) -> bool:
    """Whether every array of a loader is read by byte range (the fast path; False for a format's own loader)."""
    return loader._source is None and all(r.direct for r in loader._readers.values())
