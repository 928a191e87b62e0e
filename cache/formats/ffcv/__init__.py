"""The FFCV format of a feature cache: a folder with one ``.beton`` file, its writer and its reader.

This package (fields.py: the vocabulary, writer.py, reader.py) is the only code that knows this layout::

    <root>/ffcv.json       this format's record: version, the .beton's name, size and crc32c, the field
                           of every array, the variants, the crc32c of labels.npy; written last, so a
                           folder without it is never a cache
    <root>/manifest.json   the build manifest, verbatim
    <root>/sources.json    the build's source list (relative path and size per row)
    <root>/labels.npy      (N,) int32; -1 marks a skipped source file
    <root>/data.beton      FFCV's file: one sample per (row, variant), sample ``row * F + variant``;
                           fields ``latents`` (8, h, w), ``f0``, ``f1``, ... (T, D) per teacher in the
                           manifest's order, then ``s<i>`` float32 per-token scales for each int8
                           teacher ``f<i>`` (stored (T, 1), read as (T,)), then ``label``. A teacher's tokens are float16 or int8 as the
                           manifest's layout says. float16 values are stored as their int16 bit patterns
                           (FFCV's loader hangs on float16 fields) and viewed back; int8 and float32
                           are stored as they are.

Skipped rows are stored too (zeros, label -1) so that row i stays source file i; the loader's order
never visits them.

Reading. Every sample's array fields lie whole in one of FFCV's pages, at a file offset the header's
per-sample metadata records (``ptr``). Where FFCV's own reader parses that metadata, every pointer and
size lies inside the file and the machine is little-endian, a row is a byte range: the loader reads it
with ``os.preadv`` from reader threads straight into the batch, as the HDF5 and zarr paths do (float16
values are the int16 bit patterns stored, byte for byte). Anything else (``UREPA_IO=library``, metadata
that does not check out, a direct read that fails for a reason other than a short file) goes through
FFCV's own :class:`ffcv.loader.Loader` (its compiled pipelines, its page cache handling), fed the sample
ids of this epoch's and this rank's positions in our order (``indices=``,
``order=OrderOption.SEQUENTIAL``, ``drop_last=False``, our batch size), so its batches are ours
(:mod:`cache.loader`); logged once. Why not FFCV's loader always: it builds and compiles its pipeline
for every epoch (0.2 s constructing the loader plus about 0.8 s of numba compilation before the first
batch, per epoch, on the 2-core machine), maps the file afresh each epoch and copies each sample with
at most as many threads as cores (numba's ``NUMBA_NUM_THREADS``), and its buffers are reused, so each
batch is copied once more; measured in docs/benchmarks.md. FFCV trusts its file: on a truncated file
it may hang or crash. So the .beton's size and header are checked against the record before FFCV (or
a direct read) sees the file, at open and before every epoch's loader, and the header's field
descriptors (name, dtype, shape) against the manifest's layout at open; :meth:`FfcvCache.verify`
checks the whole file's crc32c.
"""

from __future__ import annotations

import os

from ...errors import CacheError
from ...writer import Format
from .fields import BETON, FORMAT_VERSION, RECORD
from .reader import FfcvCache
from .writer import FfcvWriter, write_ffcv

__all__ = ["FFCV", "FfcvCache", "FfcvWriter", "write_ffcv", "FORMAT_VERSION", "BETON", "RECORD"]


def _claims(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, RECORD)):
        return True
    if any(n.endswith(".beton") for n in os.listdir(path)):
        raise CacheError(f"{path} holds .beton files but no {RECORD}: not a finished FFCV cache (a conversion that "
                         "did not finish, or files copied by hand)", url=path, remedy="reconvert")
    return False


FFCV = Format(name="ffcv", claims=_claims, open=FfcvCache, copy_writer=FfcvWriter, options=("workers",),
              description="an FFCV cache (a folder with ffcv.json and a .beton)")
