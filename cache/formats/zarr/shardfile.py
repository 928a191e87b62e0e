"""Zarr's sharding byte format, for direct byte-range I/O: the only code that knows it.

A zarr v3 array whose single codec is ``sharding_indexed`` stores each shard as one object::

    [inner chunk 0][inner chunk 1]...[inner chunk K-1][index: K x (offset, nbytes) uint64 LE][crc32c LE]

(index at the end, chunks uncompressed, empty chunks as offset = nbytes = 2**64 - 1). When the inner
chunks span whole rows and hold raw little-endian bytes, row r of a shard lives at
``offset[r // chunk_rows] + (r % chunk_rows) * row_nbytes``, so the loader reads rows and the build
writes whole shards straight to and from the files, without zarr's per-chunk copies.

:func:`direct_format` decides whether an array qualifies, from its metadata in the serialised,
documented form (the ``zarr.json`` document, or ``metadata.to_dict()``), never from the Python types
of codec attributes, which change between zarr versions (3.1 keeps enums where 3.4 keeps strings).
When it cannot confirm the layout it says why, and callers use zarr's own reading and writing for
that array (slower, always correct). Setting the environment variable ``UREPA_ZARR_IO=zarr`` forces
zarr's path for every array, so the slow path can be exercised and compared; ``UREPA_IO=library``
forces the library's own path for every format (:func:`cache.files.library_io_forced`).
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...files import ENV_LIBRARY_IO, checksum, library_io_forced

__all__ = [
    "ENV_IO",
    "EMPTY_CHUNK",
    "ShardFormat",
    "ShardIndexError",
    "direct_format",
    "choose_io",
    "log_io_choice",
    "shard_key",
    "metadata_document",
    "zarr_io_forced",
    "encode_index",
    "decode_index",
    "read_index",
    "write_shard_file",
    "shard_index_nbytes",
]

_logger = logging.getLogger(__name__)

ENV_IO = "UREPA_ZARR_IO"  # "zarr": every array through zarr's own reads and writes
EMPTY_CHUNK = 0xFFFFFFFFFFFFFFFF  # index entry (offset and nbytes) of a chunk that is not stored
CHECKSUM_NBYTES = 4  # the crc32c after the index


def shard_index_nbytes(chunks_per_shard: int) -> int:
    """Bytes of a shard's index and its checksum: one (offset, nbytes) uint64 pair per inner chunk, then
    the crc32c."""
    return chunks_per_shard * 16 + CHECKSUM_NBYTES


class ShardIndexError(ValueError):
    """A shard's index is damaged (checksum mismatch, entries out of the file, wrong size)."""


def zarr_io_forced() -> bool:
    """Whether ``UREPA_ZARR_IO=zarr`` (or ``UREPA_IO=library``) asks for zarr's own I/O everywhere."""
    if library_io_forced():
        return True
    value = os.environ.get(ENV_IO, "").strip().lower()
    if value not in ("", "auto", "direct", "zarr"):
        raise ValueError(f"{ENV_IO}={value!r}: use 'zarr' (force zarr's own I/O) or leave it unset")
    return value == "zarr"


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return value


def metadata_document(array_or_metadata: Any) -> dict[str, Any]:
    """An array's metadata as JSON types (what ``zarr.json`` holds): from a zarr array, its
    ``metadata`` or a dict such as ``metadata.to_dict()``; enums become their values."""
    meta = getattr(array_or_metadata, "metadata", array_or_metadata)
    if not isinstance(meta, Mapping):
        meta = meta.to_dict()
    return json.loads(json.dumps(_plain(meta)))


@dataclass(frozen=True)
class ShardFormat:
    """The byte layout of one array's shards, for arrays that :func:`direct_format` accepts."""

    shard_rows: int  # rows per shard (the outer chunk along axis 0)
    chunk_rows: int  # rows per inner chunk
    row_nbytes: int  # bytes of one row (everything after axis 0)
    ndim: int
    separator: str  # chunk key encoding: "default" with this separator, or "v2"
    v2_keys: bool = False

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_nbytes(self) -> int:
        return self.chunk_rows * self.row_nbytes

    @property
    def index_nbytes(self) -> int:
        """Bytes of the index and its checksum at the end of every shard file."""
        return shard_index_nbytes(self.chunks_per_shard)

    def shard_key(self, shard: int) -> str:
        """The shard's object key inside the array's folder (e.g. ``c/3/0/0/0``)."""
        coords = [str(shard)] + ["0"] * (self.ndim - 1)
        if self.v2_keys:
            return self.separator.join(coords)
        return self.separator.join(["c", *coords])


def direct_format(metadata: Any, *, itemsize: int | None = None) -> tuple[ShardFormat | None, str]:
    """(format, "") when rows of this array can be read and its shards written by byte range, else
    (None, the reason). ``metadata``: a zarr array, its metadata, or its JSON document.

    Accepted: zarr v3, a regular chunk grid, one ``sharding_indexed`` codec whose inner codecs are
    ``bytes`` alone (little-endian, or no endian for one-byte types), whose index codecs are ``bytes``
    (little-endian) then ``crc32c``, index at the end, inner chunks spanning whole rows, no storage
    transformers, the default or v2 chunk key encoding.
    """
    try:
        doc = metadata_document(metadata)
    except (TypeError, ValueError, AttributeError) as e:
        return None, f"metadata not readable as JSON ({type(e).__name__}: {e})"
    try:
        return _decide(doc, itemsize)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return None, f"metadata not understood ({type(e).__name__}: {e})"


_DTYPE_SIZES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2, "int32": 4,
                "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8}


def _decide(doc: Mapping[str, Any], itemsize: int | None) -> tuple[ShardFormat | None, str]:
    if doc.get("zarr_format") != 3:
        return None, f"zarr_format {doc.get('zarr_format')!r}, not 3"
    if doc.get("storage_transformers"):
        return None, "storage transformers are present"
    dtype = doc["data_type"]
    name = dtype if isinstance(dtype, str) else dtype.get("name") if isinstance(dtype, Mapping) else None
    size = _DTYPE_SIZES.get(name or "") if itemsize is None else itemsize
    if not size:
        return None, f"data type {dtype!r} is not a fixed-size numeric type"
    shape = [int(s) for s in doc["shape"]]
    grid = doc["chunk_grid"]
    if grid.get("name") != "regular":
        return None, f"chunk grid {grid.get('name')!r}, not regular"
    outer = [int(s) for s in grid["configuration"]["chunk_shape"]]
    codecs = doc["codecs"]
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None, "not a single sharding_indexed codec: " + ", ".join(str(c.get("name")) for c in codecs)
    conf = codecs[0].get("configuration", {})
    inner = [int(s) for s in conf["chunk_shape"]]
    if inner[1:] != shape[1:] or outer[1:] != shape[1:]:
        return None, f"chunks {inner} / shards {outer} do not span whole rows of shape {shape}"
    if outer[0] % inner[0]:
        return None, f"shard rows {outer[0]} are not a multiple of chunk rows {inner[0]}"
    inner_codecs = conf.get("codecs", [])
    if len(inner_codecs) != 1 or inner_codecs[0].get("name") != "bytes":
        return None, "inner codecs are not raw bytes alone: " + ", ".join(str(c.get("name")) for c in inner_codecs)
    endian = (inner_codecs[0].get("configuration") or {}).get("endian")
    if endian not in ("little", None) or (endian is None and size > 1):
        return None, f"inner chunks are {endian or 'of unspecified'}-endian"
    index_codecs = conf.get("index_codecs", [])
    names = [c.get("name") for c in index_codecs]
    if names != ["bytes", "crc32c"]:
        return None, f"index codecs {names}, not ['bytes', 'crc32c']"
    if (index_codecs[0].get("configuration") or {}).get("endian", "little") != "little":
        return None, "the shard index is big-endian"
    if conf.get("index_location", "end") != "end":
        return None, f"index location {conf.get('index_location')!r}, not 'end'"
    keys = doc.get("chunk_key_encoding", {"name": "default"})
    sep = (keys.get("configuration") or {}).get("separator")
    if keys.get("name") == "default":
        sep, v2 = sep or "/", False
    elif keys.get("name") == "v2":
        sep, v2 = sep or ".", True
    else:
        return None, f"chunk key encoding {keys.get('name')!r}"
    if sep not in ("/", "."):
        return None, f"chunk key separator {sep!r}"
    row_nbytes = int(np.prod(shape[1:], dtype=np.int64)) * size
    return ShardFormat(shard_rows=outer[0], chunk_rows=inner[0], row_nbytes=row_nbytes, ndim=len(shape),
                       separator=sep, v2_keys=v2), ""


def encode_index(fmt: ShardFormat, num_rows: int) -> bytes:
    """Index and crc32c of a shard holding ``num_rows`` rows (its partial last chunk padded; the chunks
    past the array's end not stored)."""
    import google_crc32c

    present = -(-num_rows // fmt.chunk_rows)
    index = np.full((fmt.chunks_per_shard, 2), EMPTY_CHUNK, dtype="<u8")
    index[:present, 0] = np.arange(present, dtype=np.uint64) * np.uint64(fmt.chunk_nbytes)
    index[:present, 1] = fmt.chunk_nbytes
    raw = index.tobytes()
    return raw + int(google_crc32c.value(raw)).to_bytes(CHECKSUM_NBYTES, "little")


def decode_index(fmt: ShardFormat, tail: bytes, *, file_size: int, what: str = "shard") -> np.ndarray:
    """The (chunks, 2) uint64 (offset, nbytes) index from a shard's last ``index_nbytes`` bytes, after
    checking its crc32c and that every stored chunk lies inside the file and has the full chunk size.
    Raises :class:`ShardIndexError` naming ``what``."""
    import google_crc32c

    if len(tail) != fmt.index_nbytes or file_size < fmt.index_nbytes:
        raise ShardIndexError(f"{what}: {file_size} bytes, too short for its {fmt.index_nbytes}-byte index")
    raw, crc = tail[:-CHECKSUM_NBYTES], int.from_bytes(tail[-CHECKSUM_NBYTES:], "little")
    if int(google_crc32c.value(raw)) != crc:
        raise ShardIndexError(f"{what}: the shard index fails its crc32c checksum")
    index = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    stored = index[:, 0] != np.uint64(EMPTY_CHUNK)
    if stored.any():
        offsets, sizes = index[stored, 0], index[stored, 1]
        data_end = np.uint64(file_size - fmt.index_nbytes)
        if (sizes != np.uint64(fmt.chunk_nbytes)).any() or (offsets > data_end - sizes).any() or (sizes > data_end).any():
            raise ShardIndexError(f"{what}: the shard index points outside the file's {file_size} bytes")
    return index


def read_index(fmt: ShardFormat, fd: int, *, what: str) -> np.ndarray:
    """The checked index (:func:`decode_index`) of the shard file open at ``fd``: its tail, read once."""
    size = os.fstat(fd).st_size
    n = fmt.index_nbytes
    return decode_index(fmt, os.pread(fd, n, max(size - n, 0)), file_size=size, what=what)


def write_shard_file(path: str, data: np.ndarray, fmt: ShardFormat) -> str:
    """Write one shard (its rows in ``data``, fewer than ``shard_rows`` for the last shard) as zarr's
    sharding codec lays it out: the inner chunks in order (a partial last chunk padded with the fill
    value 0), then the index, empty chunks as 2**64 - 1, then its crc32c. Written to
    ``path + '.partial'`` and renamed, so a reader never sees half a shard. Byte for byte what zarr
    writes with ``write_empty_chunks=True`` (tested), without its per-chunk copies. Returns the
    :func:`checksum` of the bytes written."""
    data = np.ascontiguousarray(data)
    n = data.shape[0]
    if data.ndim != fmt.ndim or data.nbytes != n * fmt.row_nbytes or not 0 < n <= fmt.shard_rows:
        raise ValueError(f"{path}: {data.shape} {data.dtype} does not fit shards of {fmt.shard_rows} rows x "
                         f"{fmt.row_nbytes} bytes")
    present = -(-n // fmt.chunk_rows)
    if n % fmt.chunk_rows:
        padded = np.zeros((present * fmt.chunk_rows, *data.shape[1:]), dtype=data.dtype)
        padded[:n] = data
        data = padded
    tail = encode_index(fmt, n)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + (1 << 30)])
        os.write(fd, tail)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return checksum(data, tail)


def shard_key(array: Any, shard: int) -> str:
    """The object key of shard ``shard`` of an array inside its folder, from its chunk key encoding."""
    doc = metadata_document(array)
    keys = doc.get("chunk_key_encoding", {"name": "default"})
    v2 = keys.get("name") == "v2"
    sep = (keys.get("configuration") or {}).get("separator") or ("." if v2 else "/")
    return ShardFormat(shard_rows=1, chunk_rows=1, row_nbytes=1, ndim=len(doc["shape"]), separator=sep,
                       v2_keys=v2).shard_key(shard)


def choose_io(root: str | None, array: Any, *, ranged: bool = False) -> tuple[ShardFormat | None, str]:
    """How one array of a cache is read and written: (its shard format, "") for direct byte-range I/O,
    or (None, why zarr's own I/O is used). ``root``: the cache's local folder, None for other stores;
    ``ranged``: the store is an object store the remote reader fetches byte ranges from."""
    if library_io_forced():
        return None, f"forced by {ENV_LIBRARY_IO}=library"
    if zarr_io_forced():
        return None, f"forced by {ENV_IO}=zarr"
    if root is None and not ranged:
        return None, "the store is neither a local folder nor an object store"
    return direct_format(array)


_LOGGED: set[tuple[str, str, str, bool]] = set()


def log_io_choice(what: str, url: str, name: str, fmt: ShardFormat | None, reason: str, *,
                  fell_back: bool = False) -> None:
    """Log once per process which path the ``what`` ("reads", "writes") of an array take, and why."""
    key = (what, os.fspath(url), name, fmt is None)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    if fmt is not None:
        _logger.info("%s: %s %s by byte range", url, name, what)
    elif fell_back:
        _logger.warning("%s: %s %s through zarr from now on: %s", url, name, what, reason)
    else:
        _logger.info("%s: %s %s through zarr: %s", url, name, what, reason)
