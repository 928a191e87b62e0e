"""The cache manifest as typed records: what a build writes and what every reader asks.

Every format stores the manifest as one JSON object, verbatim (zarr: the group attribute ``urepa_cache``)::

    schema_version, layout, classes            every reader needs these (the store refuses a cache without them)
    source {num_files, fingerprint, ...}        what was encoded; source_root the folder it was read from
    preprocessing {resolution, max_pixels, ...} crop, flip, teacher position table
    vae {spec, weights_sha256, random_weights, seed, ...}
    teachers {name: {spec, weights_sha256, random_weights, seed, tokens, dim, ...}}
    encode {precision, batch_size, compile}
    software, created, complete, generation     bookkeeping
    skipped [{row, path, reason}], stats {...}  written when the build finishes
    adding {name: {tokens, dim, dtype, record}} teachers being added to a finished cache (until they are)

:meth:`Manifest.from_dict` and :meth:`Manifest.to_dict` are inverse on every manifest a build writes:
``Manifest.from_dict(d).to_dict() == d``. Keys this code does not name are preserved, not refused:
each record keeps them in its ``extra`` mapping and writes them back unchanged, so a cache written by
a build that records more still opens; readers use only the named, typed attributes. A record or entry
absent from the stored object (a manifest written by a benchmark or a test) is None, and a record's
named entries are written back even where they were absent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .diff import describe_change, nested_diff
from .errors import CacheError
from .layout import Layout

__all__ = [
    "SCHEMA_VERSION",
    "ManifestError",
    "SourceInfo",
    "Preprocessing",
    "EncoderInfo",
    "EncodeSettings",
    "SkippedFile",
    "BuildStats",
    "AddedTeacher",
    "Manifest",
    "MANIFEST_KEY",
    "READER_KEYS",
    "check_manifest",
    "manifest_diff",
    "channel_scales_of",
]

#: The channel scales a build can write: ``max(rms_j / median rms, 1)`` is at least 1, and a scale past
#: float16's largest value would turn dequantised float16 tokens into infinities.
CHANNEL_SCALE_RANGE = (1.0, 65504.0)
MANIFEST_KEY = "urepa_cache"  # the name every format stores the manifest under (zarr: a group attribute)
READER_KEYS = ("schema_version", "layout", "classes")  # entries every reader needs

SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """A stored manifest is not the JSON object this code writes (a missing or mistyped entry)."""


def _check(value: Any, types: type | tuple[type, ...], name: str) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise ManifestError(f"manifest entry {name!r} is {value!r}, not {_type_names(types)}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in _as_tuple(types))


class _Record:
    """A JSON object with some named, typed entries; the entries it does not name stay in ``extra``.

    Subclasses are frozen dataclasses whose last field is ``extra`` and whose ``TYPES`` maps each
    named field to the JSON types it may hold. A named entry absent from the object takes the field's
    default (a field without one is required) and is written on the way back.
    """

    TYPES: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    extra: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "") -> Any:
        where = where or cls.__name__
        if not isinstance(d, Mapping):
            raise ManifestError(f"manifest entry {where!r} is {d!r}, not a JSON object")
        named = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        values = {}
        for name in named:
            if name in d:
                values[name] = _check(d[name], cls.TYPES[name], f"{where}.{name}")
            elif named[name].default is dataclasses.MISSING:
                raise ManifestError(f"manifest entry {where!r} lacks {name!r}")
        return cls(**values, extra={k: v for k, v in d.items() if k not in named})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


_INT = int
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))


@dataclass(frozen=True)
class SourceInfo(_Record):
    """What was encoded: the number of source files and the fingerprint of their sorted listing."""

    fingerprint: str | None = None
    num_files: int | None = None
    classes_limit: int = 0
    limit: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPES: ClassVar = {"fingerprint": _OPT_STR, "num_files": _OPT_INT, "classes_limit": _INT, "limit": _INT}


@dataclass(frozen=True)
class Preprocessing(_Record):
    """How source images became encoder inputs (``crop`` and ``variants`` stay in ``extra``)."""

    resolution: int | None = None
    max_pixels: int | None = None
    flip: str = "none"
    teacher_pos_embed: str = "repa"
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPES: ClassVar = {"resolution": _OPT_INT, "max_pixels": _OPT_INT, "flip": str, "teacher_pos_embed": str}


@dataclass(frozen=True)
class EncoderInfo(_Record):
    """One encoder (the VAE or a teacher): its spec, the sha256 of its weights, whether they were random
    (and then their seed). The rest of what the encoder records (config, token grid, ...) is in ``extra``."""

    spec: str | None = None
    weights_sha256: str | None = None
    random_weights: bool = False
    seed: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPES: ClassVar = {"spec": _OPT_STR, "weights_sha256": _OPT_STR, "random_weights": bool, "seed": _OPT_INT}

    @property
    def channel_scales(self) -> list[float] | None:
        """An int8 teacher's per-channel scales (``cache.quant``), or None (ones)."""
        value = self.extra.get("channel_scales")
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ManifestError(f"manifest entry 'channel_scales' of {self.spec!r} is not a list of numbers")
        return value


@dataclass(frozen=True)
class EncodeSettings(_Record):
    """The encoder run's settings: precision (fp32, tf32 or bf16), batch size, compilation."""

    precision: str | None = None
    batch_size: int | None = None
    compile: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPES: ClassVar = {"precision": _OPT_STR, "batch_size": _OPT_INT, "compile": bool}


@dataclass(frozen=True)
class SkippedFile(_Record):
    """A source file that could not be encoded: its row keeps zeros and label -1."""

    row: int
    path: str
    reason: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPES: ClassVar = {"row": _INT, "path": str, "reason": str}


@dataclass(frozen=True)
class BuildStats(_Record):
    """Timing of the build run that finished the cache."""

    seconds: float | None = None
    img_per_s: float | None = None
    world_size: int | None = None
    device: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPES: ClassVar = {"seconds": (int, float, type(None)), "img_per_s": (int, float, type(None)),
                       "world_size": _OPT_INT, "device": _OPT_STR}


@dataclass(frozen=True)
class AddedTeacher(_Record):
    """A teacher being added to a finished cache: its token grid, stored dtype and the encoder record it
    gets in ``teachers`` once every shard holds its tokens."""

    tokens: int
    dim: int
    dtype: str
    record: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPES: ClassVar = {"tokens": _INT, "dim": _INT, "dtype": str, "record": dict}

    @property
    def channel_scales(self) -> list[float] | None:
        return EncoderInfo.from_dict(self.record, where="adding.record").channel_scales


# Top-level entries written only when present (None here: absent from the stored object).
_OPTIONAL = ("source", "source_root", "preprocessing", "vae", "teachers", "encode", "software", "created",
             "complete", "generation", "skipped", "stats", "adding")


@dataclass(frozen=True)
class Manifest:
    """The build manifest of one cache."""

    schema_version: int
    layout: Layout
    classes: tuple[str, ...]
    source: SourceInfo | None = None
    source_root: str | None = None
    preprocessing: Preprocessing | None = None
    vae: EncoderInfo | None = None
    teachers: Mapping[str, EncoderInfo] | None = None
    encode: EncodeSettings | None = None
    software: Mapping[str, str] | None = None
    created: str | None = None
    complete: bool | None = None
    generation: str | None = None  # the id of the creation (None: built before generations were recorded)
    skipped: tuple[SkippedFile, ...] | None = None
    stats: BuildStats | None = None
    adding: Mapping[str, AddedTeacher] | None = None  # teachers being added to this finished cache
    extra: Mapping[str, Any] = field(default_factory=dict)

    #: Entries a rerun of the same build may change (time, versions, skips, generation).
    VOLATILE: ClassVar[tuple[str, ...]] = ("created", "complete", "skipped", "stats", "software", "source_root",
                                           "generation")

    @property
    def is_complete(self) -> bool:
        return bool(self.complete)

    @property
    def skipped_files(self) -> tuple[SkippedFile, ...]:
        return self.skipped or ()

    def teacher(self, name: str) -> EncoderInfo | None:
        """The record of teacher ``name``, or None if the manifest has none."""
        return (self.teachers or {}).get(name)

    def random_weights(self, teacher: str | None = None) -> bool:
        """Whether the VAE (or, with ``teacher``, the VAE or that teacher) had random weights."""
        vae = self.vae is not None and self.vae.random_weights
        info = self.teacher(teacher) if teacher is not None else None
        return bool(vae or (info is not None and info.random_weights))

    @property
    def pending(self) -> Mapping[str, AddedTeacher]:
        """The teachers being added (empty when none)."""
        return self.adding or {}

    def layout_with_pending(self) -> Layout:
        """The layout with the teachers being added appended: what the writes of an addition fill."""
        if not self.pending:
            return self.layout
        lay = self.layout
        return lay.with_teachers({**lay.teachers, **{k: (v.tokens, v.dim) for k, v in self.pending.items()}},
                                 {**lay.feature_dtypes, **{k: v.dtype for k, v in self.pending.items()}})

    # -- JSON ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """The typed manifest of a stored JSON object; ManifestError naming the first bad entry."""
        if not isinstance(d, Mapping):
            raise ManifestError("the manifest is not a JSON object")
        for key in ("schema_version", "layout", "classes"):
            if key not in d:
                raise ManifestError(f"the manifest lacks {key!r}")
        try:
            layout = Layout.from_dict(d["layout"])
        except (KeyError, TypeError, ValueError, AttributeError, CacheError) as e:
            raise ManifestError(f"the layout is malformed ({type(e).__name__}: {e})") from None
        classes = _check(d["classes"], list, "classes")
        for c in classes:
            _check(c, str, "classes[]")
        get = d.get
        teachers = get("teachers")
        if teachers is not None:
            _check(teachers, dict, "teachers")
            teachers = {k: EncoderInfo.from_dict(v, where=f"teachers.{k}") for k, v in teachers.items()}
        skipped = get("skipped")
        if skipped is not None:
            skipped = tuple(SkippedFile.from_dict(s, where="skipped[]") for s in _check(skipped, list, "skipped"))
        adding = get("adding")
        if adding is not None:
            _check(adding, dict, "adding")
            adding = {k: AddedTeacher.from_dict(v, where=f"adding.{k}") for k, v in adding.items()}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            schema_version=_check(d["schema_version"], int, "schema_version"),
            layout=layout,
            classes=tuple(classes),
            source=None if get("source") is None else SourceInfo.from_dict(d["source"], where="source"),
            source_root=_check(get("source_root"), _OPT_STR, "source_root"),
            preprocessing=(None if get("preprocessing") is None
                           else Preprocessing.from_dict(d["preprocessing"], where="preprocessing")),
            vae=None if get("vae") is None else EncoderInfo.from_dict(d["vae"], where="vae"),
            teachers=teachers,
            encode=None if get("encode") is None else EncodeSettings.from_dict(d["encode"], where="encode"),
            software=_check(get("software"), (dict, type(None)), "software"),
            created=_check(get("created"), _OPT_STR, "created"),
            complete=_check(get("complete"), (bool, type(None)), "complete"),
            generation=_check(get("generation"), _OPT_STR, "generation"),
            skipped=skipped,
            stats=None if get("stats") is None else BuildStats.from_dict(d["stats"], where="stats"),
            adding=adding,
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in the cache (entries that are None are left out)."""
        out: dict[str, Any] = {"schema_version": self.schema_version, "layout": self.layout.to_dict(),
                               "classes": list(self.classes)}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is None:
                continue
            if name in ("teachers", "adding"):
                value = {k: v.to_dict() for k, v in value.items()}
            elif name == "skipped":
                value = [s.to_dict() for s in value]
            elif isinstance(value, _Record):
                value = value.to_dict()
            elif isinstance(value, Mapping):
                value = dict(value)
            out[name] = value
        out.update(self.extra)
        return out


def check_manifest(url: str, manifest: Any, *, where: str, allow_incomplete: bool = False) -> Manifest:
    """The manifest of a cache as every format stores it (the build's ``Manifest.to_dict()``, verbatim),
    checked for what a reader needs, typed; a :class:`CacheError` naming ``where`` (the file or attribute
    that holds it) otherwise. The one check of a stored manifest, shared by every format."""
    if not isinstance(manifest, Mapping):
        raise CacheError(f"{url} is not a readable cache: its manifest ({where}) is not a JSON object",
                         url=url, remedy="rebuild")
    lacking = [k for k in READER_KEYS if k not in manifest]
    if lacking:
        raise CacheError(f"{url} is not a readable cache: its manifest ({where}) lacks {', '.join(map(repr, lacking))}",
                         url=url, remedy="rebuild")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{url} has cache schema {manifest.get('schema_version')}, this code reads {SCHEMA_VERSION}",
                         url=url)
    if not manifest.get("complete") and not allow_incomplete:
        raise CacheError(f"{url} is incomplete", url=url, remedy="resume")
    try:
        Layout.from_dict(manifest["layout"])
    except (KeyError, TypeError, ValueError, AttributeError, CacheError) as e:
        raise CacheError(f"{url} is not a readable cache: the layout in its manifest ({where}) is malformed "
                         f"({type(e).__name__}: {e})", url=url, remedy="rebuild") from None
    try:
        return Manifest.from_dict(manifest)
    except ManifestError as e:
        raise CacheError(f"{url} is not a readable cache: its manifest ({where}) is malformed ({e})",
                         url=url, remedy="rebuild") from None


def manifest_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Each manifest entry that differs, ignoring bookkeeping (time, versions, skips, generation): its
    dotted name and both values in full, or for two lists the items that differ."""
    return [describe_change(name, a, b, sides=("the cache", "this run"))
            for name, a, b in nested_diff(old, new, skip=frozenset(Manifest.VOLATILE))]


def channel_scales_of(manifest: Manifest, name: str, *, url: str = "") -> np.ndarray | None:
    """Teacher ``name``'s channel scales as float32 (D,) from its manifest record (or, for a teacher being
    added, its pending record); None for a float16 teacher or a record without them (ones). Scales that are
    not D positive finite numbers are a damaged manifest (:class:`CacheError`)."""
    layout = manifest.layout_with_pending()
    if name not in layout.teachers or not layout.quantized(name):
        return None
    if name in manifest.pending:
        values = manifest.pending[name].channel_scales
    else:
        info = manifest.teacher(name)
        values = None if info is None else info.channel_scales
    if values is None:
        return None
    out = np.asarray(values, dtype=np.float64)
    dim = layout.teachers[name][1]
    lo, hi = CHANNEL_SCALE_RANGE
    if out.shape != (dim,) or not np.isfinite(out).all() or (out < lo).any() or (out > hi).any():
        raise CacheError(f"{url or 'the cache'}: teacher {name!r}: the channel scales in the manifest are not {dim} "
                         f"numbers from {lo:g} to {hi:g} (what a build writes): the manifest is damaged",
                         url=url or None, remedy="rebuild")
    return out.astype(np.float32)
