"""The logical layout of a feature cache, the same in every format: what a row holds, in which shapes and
dtypes. The one shape table (:meth:`Layout.row_shapes`) and the one dtype vocabulary live here; every
format, the loader, the build and the converters ask them.

One cache holds ``num_rows`` rows; row i is source file i of the build's sorted listing. Each row holds
``variants`` variants (F: 0 as encoded, 1 mirrored left-right when built with ``--flip both``) of::

    latents                  (F, 8, R/8, R/8) float16: SD-VAE posterior mean (4 channels) and std (4)
    features/<teacher>       (F, T, D) float16, or int8 for a teacher stored as int8
    feature_scales/<teacher> (F, T) float32: one scale per token, int8 teachers only (see cache.quant)
    labels                   () int32: the class index; -1 marks a source file that could not be decoded
                             (its row holds zeros and is never served)

How a format stores these (zarr's shards and chunks, HDF5's datasets, FFCV's fields) is the format's:
its storage settings ride along in :attr:`Layout.storage`, opaque here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CacheError

__all__ = ["LATENT_CHANNELS", "SCALES_GROUP", "TOKEN_DTYPES", "DTYPE_OPTIONS", "stored_dtype", "ByTeacher", "Layout"]

LATENT_CHANNELS = 8  # posterior mean (4) and std (4) of the SD-VAE
SCALES_GROUP = "feature_scales"  # int8 teachers' per-token scales: 'feature_scales/<teacher>'
#: The stored dtype of a teacher's tokens (int8: with a float32 scale per token).
TOKEN_DTYPES = ("float16", "int8")
#: How commands spell a stored token dtype (``--feature-dtype fp16|int8``), and the dtype each means.
DTYPE_OPTIONS: Mapping[str, str] = {"fp16": "float16", "int8": "int8"}
_LOGICAL = ("num_rows", "resolution", "variants", "teachers")


def stored_dtype(option: str) -> str:
    """The stored token dtype a command's ``fp16`` / ``int8`` (or the stored name itself) means."""
    if option in TOKEN_DTYPES:
        return option
    if option not in DTYPE_OPTIONS:
        raise ValueError(f"token dtype must be one of {', '.join(DTYPE_OPTIONS)}, got {option!r}")
    return DTYPE_OPTIONS[option]


class ByTeacher(dict):
    """A dict keyed by teacher name whose missing key says which teachers there are."""

    def __missing__(self, key: Any) -> Any:
        raise KeyError(f"no teacher {key!r} here; the teachers are {', '.join(map(repr, self)) or 'none'}")


@dataclass(frozen=True)
class Layout:
    """Shapes and dtypes of one cache, and the storage settings of its format (``storage``: a JSON object
    the format owns, e.g. zarr's ``shard_rows``; written beside the logical entries in the manifest)."""

    num_rows: int
    resolution: int
    variants: int  # F: 1, or 2 with the mirrored image
    teachers: Mapping[str, tuple[int, int]]  # name -> (tokens T, dim D)
    feature_dtypes: Mapping[str, str] = field(default_factory=dict)  # name -> 'float16' | 'int8'; absent: float16
    storage: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise CacheError("a cache needs at least one row")
        if self.variants not in (1, 2):
            raise CacheError(f"variants must be 1 or 2, got {self.variants}")
        if self.resolution % 8:
            raise CacheError(f"resolution must be a multiple of 8, got {self.resolution}")
        for name in self.teachers:
            if not name or "/" in name or name.startswith("__") or name in (".", ".."):
                raise CacheError(f"invalid teacher name {name!r}")
        for name, dtype in self.feature_dtypes.items():
            if name not in self.teachers:
                raise CacheError(f"a token dtype for {name!r}, which is not a teacher of the layout")
            if dtype not in TOKEN_DTYPES:
                raise CacheError(f"teacher {name!r}: token dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
        clash = set(self.storage) & {*_LOGICAL, "dtypes"}
        if clash:
            raise CacheError(f"storage settings may not be named {sorted(clash)}")
        object.__setattr__(self, "teachers", {k: tuple(v) for k, v in self.teachers.items()})
        object.__setattr__(self, "feature_dtypes", {k: v for k, v in self.feature_dtypes.items() if v != "float16"})
        object.__setattr__(self, "storage", dict(self.storage))

    def feature_dtype(self, name: str) -> str:
        """The stored dtype of teacher ``name``'s tokens: 'float16' or 'int8' (with per-token scales)."""
        if name not in self.teachers:
            raise KeyError(name)
        return self.feature_dtypes.get(name, "float16")

    def quantized(self, name: str) -> bool:
        """Whether teacher ``name``'s tokens are int8 with a float32 scale per token."""
        return self.feature_dtype(name) == "int8"

    @property
    def quantized_teachers(self) -> list[str]:
        return [name for name in self.teachers if self.quantized(name)]

    def array_names(self, *, labels: bool = True) -> list[str]:
        """Every per-row array: 'latents', 'features/<name>', 'feature_scales/<name>' (int8 teachers), and
        (unless ``labels=False``) 'labels'."""
        return ["latents", *(f"features/{k}" for k in self.teachers),
                *(f"{SCALES_GROUP}/{k}" for k in self.quantized_teachers), *(["labels"] if labels else [])]

    def row_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape of one row, dtype name) of every array of :meth:`array_names`: the one shape table."""
        h = self.resolution // 8
        return {"latents": ((self.variants, LATENT_CHANNELS, h, h), "float16"),
                **{f"features/{k}": ((self.variants, *self.teachers[k]), self.feature_dtype(k)) for k in self.teachers},
                **{f"{SCALES_GROUP}/{k}": ((self.variants, self.teachers[k][0]), "float32")
                   for k in self.quantized_teachers},
                "labels": ((), "int32")}

    def variant_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape of one variant of one row, dtype name) of every array but the labels."""
        return {k: (shape[1:], dtype) for k, (shape, dtype) in self.row_shapes().items() if k != "labels"}

    def with_teachers(self, teachers: Mapping[str, tuple[int, int]], dtypes: Mapping[str, str]) -> Layout:
        """This layout with ``teachers`` (name -> (T, D)) in ``dtypes`` in place of its own."""
        return Layout(num_rows=self.num_rows, resolution=self.resolution, variants=self.variants,
                      teachers=dict(teachers), feature_dtypes=dict(dtypes), storage=self.storage)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "resolution": self.resolution,
            "variants": self.variants,
            "teachers": {k: list(v) for k, v in self.teachers.items()},
            **self.storage,
            "dtypes": {"latents": "float16", "features": {k: self.feature_dtype(k) for k in self.teachers},
                       **({"feature_scales": "float32"} if self.quantized_teachers else {}), "labels": "int32"},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        teachers = {k: tuple(v) for k, v in d["teachers"].items()}
        stored = (d.get("dtypes") or {}).get("features", "float16")  # one name for all (older caches) or per teacher
        dtypes = {k: stored for k in teachers} if isinstance(stored, str) else dict(stored)
        return cls(
            num_rows=d["num_rows"], resolution=d["resolution"], variants=d["variants"], teachers=teachers,
            feature_dtypes={k: v for k, v in dtypes.items() if v != "float16"},  # before the check of the names
            storage={k: v for k, v in d.items() if k not in (*_LOGICAL, "dtypes")},
        )
