"""Config plumbing shared by every entry point: a frozen dataclass, named presets, CLI overrides.

Each entry point (``pipeline.build``, ``trainer.train``, ``tools.*``, ``cache.inspect``) declares one
frozen dataclass, and each field says everything about itself::

    precision: Literal["fp32", "tf32", "bf16"] = field(default="bf16", metadata={"help": "model precision"})
    batch_size: int = field(default=256, metadata={"help": "global batch", "min": 1, "max": 65536})
    model: str = field(default="tiny", metadata={"help": "model preset", "choices": tuple(MODEL_PRESETS)})

``Literal[...]`` declares the choices (``metadata["choices"]`` does it for a set owned elsewhere,
such as the keys of a preset table), ``metadata["help"]`` the help text and ``metadata["min"]`` and
``metadata["max"]`` an inclusive range (every int and float field of an entry point declares both, and
``--help`` shows it: ``(1 to 10000; default: 0)``; a NaN is outside every range). :func:`check_fields`
enforces the choices and bounds, on each item of a tuple field; every config's
``__post_init__`` calls it first, so a config built in Python is checked like one built from the
CLI, and keeps only the checks no single field can declare (finiteness, divisibility, consistency).

:func:`parse_config` builds an argparse CLI from the fields (``--batch-size 64``,
``--compile/--no-compile``, ``--interval 0 0.7`` for a fixed-length tuple field, ``--model A B C``
for a ``tuple[X, ...]`` field, ``choices=`` for a field with choices), applies ``--preset NAME`` first and explicit flags on top, validates the result
through the dataclass' ``__post_init__``, and handles ``--dry-run``. It lives in
:mod:`cache.cli` (see there why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as setting
from typing import Any, Literal, TypeVar

from ..stores import OBJECT_SCHEMES, scheme_of

T = TypeVar("T")

__all__ = ["ConfigError", "StoreSettings", "check_fields", "field_choices", "field_range", "parse_config",
           "config_to_dict"]


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


@dataclass(frozen=True)
class StoreSettings:
    """The settings of an object store (``s3://``, ``gs://``, ``az://``) that a cache location names: every entry
    point's config that takes a cache location derives from this, so each has ``--store-endpoint``,
    ``--store-region``, ``--store-anonymous`` and ``--store-allow-http``, and :meth:`storage_options` is the one
    place they become the store layer's options (obstore's configuration keys, :func:`cache.stores.open_store`).
    They add to the environment (``AWS_ENDPOINT_URL``, ...) and win over it. Credentials are never options: they
    come from the environment (or an instance role) only, so they never reach a resolved config or a log line;
    the endpoint and region are no secrets and are recorded with the rest of the config."""

    store_endpoint: str = setting(default="", metadata={
        "help": "endpoint URL of the object store of a store-URL cache, e.g. http://127.0.0.1:8333 (MinIO, Ceph, "
                "SeaweedFS, R2; unset: AWS_ENDPOINT_URL, else AWS itself). Credentials come from the environment "
                "only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...; docs/remote.md), never from a flag"})
    store_region: str = setting(default="", metadata={
        "help": "region of the object store (unset: AWS_REGION)"})
    store_anonymous: bool = setting(default=False, metadata={
        "help": "read the store without signing requests (a public bucket; no credentials used)"})
    store_allow_http: bool = setting(default=False, metadata={
        "help": "allow a plain http:// endpoint (the client refuses one otherwise; or AWS_ALLOW_HTTP=true)"})

    def storage_options(self) -> dict[str, Any]:
        """The store layer's options for these settings (obstore's keys); {} when none is set."""
        options: dict[str, Any] = {}
        if self.store_endpoint:
            options["endpoint"] = self.store_endpoint
        if self.store_region:
            options["region"] = self.store_region
        if self.store_anonymous:
            options["skip_signature"] = True
        if self.store_allow_http:
            options["allow_http"] = True
        return options

    def options_for(self, location: str) -> dict[str, Any]:
        """:meth:`storage_options` for a cache at ``location`` when it is an object store URL, else {} (a command
        with several locations gives the options to those in a store)."""
        return self.storage_options() if scheme_of(location) in OBJECT_SCHEMES else {}

    def check_store(self, *locations: str) -> None:
        """ConfigError (one line) for a malformed ``--store-endpoint``, or store options given where none of the
        command's cache ``locations`` is in an object store (none given: not known yet, the caller checks later).
        Every deriving config's ``__post_init__`` calls it."""
        endpoint = self.store_endpoint
        if endpoint:
            try:
                parts = urllib.parse.urlsplit(endpoint)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
            except ValueError:  # a port that is not a number, a bracket left open
                ok = False
            if not ok or any(c.isspace() for c in endpoint):
                raise ConfigError(f"--store-endpoint must be an http:// or https:// URL with a host (e.g. "
                                  f"https://s3.example.org or http://127.0.0.1:8333), got {endpoint!r}")
        if locations and self.storage_options() and not any(scheme_of(x) in OBJECT_SCHEMES for x in locations if x):
            given = [_flag(f.name) for f in dataclasses.fields(StoreSettings) if getattr(self, f.name)]
            shown = " and ".join(x for x in locations if x)
            raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a cache in an object "
                              f"store (s3://, gs://, az://), and {shown} is not in one")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] -> X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def _is_list(tp: Any) -> bool:
    """``tuple[X, ...]``: any number of values, ``--name A B C`` on the command line."""
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def field_choices(cls: type, field: dataclasses.Field) -> tuple[Any, ...] | None:
    """The values a field (each item, for a ``tuple[X, ...]`` field) allows: the arguments of its
    ``Literal[...]`` type, else ``metadata["choices"]``; None for a field without choices."""
    tp = _field_type(cls, field)
    if _is_list(tp):
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    choices = field.metadata.get("choices")
    return tuple(choices) if choices is not None else None


def field_range(field: dataclasses.Field) -> str:
    """The inclusive range a field declares, as ``--help`` and errors show it ("1 to 10000", ">= 0"), or ''."""
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def check_fields(cfg: Any) -> None:
    """Raise ConfigError for the first field of the dataclass instance ``cfg`` whose value (each item, for a
    tuple field) is not one of its choices or is outside its ``metadata["min"]`` .. ``metadata["max"]``
    (inclusive; NaN is outside); the message names the flag and what it allows."""
    cls = type(cfg)
    for field in dataclasses.fields(cls):
        value = getattr(cfg, field.name)
        allowed = field_choices(cls, field)
        items = value if _is_list(_field_type(cls, field)) else (value,)
        bad = [v for v in items if allowed is not None and v not in allowed]
        if bad:
            raise ConfigError(f"{_flag(field.name)} must be one of {', '.join(map(str, allowed))}, got {bad[0]!r}")
        low, high = field.metadata.get("min"), field.metadata.get("max")
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if (low is not None and not v >= low) or (high is not None and not v <= high):
                allowed = field_range(field)
                raise ConfigError(f"{_flag(field.name)} must be {'from ' if ' to ' in allowed else ''}{allowed}, "
                                  f"got {v}")


def _inherited(cls: type) -> set[str]:
    """The fields ``cls`` has from its dataclass bases (the shared settings, :class:`StoreSettings`)."""
    return {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict (what entry points write next to their outputs): the entry point's own
    settings first, the shared ones after them."""
    values = dataclasses.asdict(cfg)
    inherited = _inherited(type(cfg))
    return {k: values[k] for k in sorted(values, key=lambda k: k in inherited)}


def _prog(cls: type) -> str:
    """How a user runs the entry point that owns ``cls``: ``python -m <its module>``."""
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else os.path.basename(sys.argv[0])
    return f"python -m {module}"


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    positional: Sequence[str] = (),
    description: str | None = None,
    default_preset: str | None = None,
) -> tuple[T, bool]:
    """Parse ``argv`` into an instance of the frozen dataclass ``cls``.

    Returns ``(config, dry_run)``. Fields named in ``positional`` become positional arguments.
    Precedence: dataclass defaults < preset < explicit flags. Invalid values raise SystemExit
    with argparse's usage message; ``__post_init__`` errors (ConfigError) are reported the same way.
    """
    presets = dict(presets or {})
    parser = argparse.ArgumentParser(
        prog=_prog(cls), description=description or (cls.__doc__ or "").strip().splitlines()[0],
    )  # each option's help names its dataclass default itself (argparse's own default here is None)
    inherited = _inherited(cls)  # listed after the entry point's own options
    fields = {f.name: f for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited)}
    for name in positional:
        parser.add_argument(name, help=fields[name].metadata.get("help", ""))
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                            help="named settings applied before explicit flags")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    for name, field in fields.items():
        if name in positional:
            continue
        tp = _field_type(cls, field)
        default = field.default if field.default is not dataclasses.MISSING else None
        bounds = field_range(field)
        shown = "none" if default == "" else default
        help_text = f"{field.metadata.get('help', '')} ({bounds + '; ' if bounds else ''}default: {shown})"
        allowed = field_choices(cls, field)
        if tp is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif _is_list(tp):  # tuple[str, ...]: --name A B C
            item = typing.get_args(tp)[0]
            parser.add_argument(_flag(name), dest=name, nargs="+", default=None, help=help_text,
                                **({"type": type(allowed[0]), "choices": allowed} if allowed is not None else
                                   {"type": item, "metavar": item.__name__.upper()}))
        elif allowed is not None:  # argparse lists the choices in the usage line
            parser.add_argument(_flag(name), dest=name, type=type(allowed[0]), choices=allowed, default=None,
                                help=help_text)
        elif typing.get_origin(tp) is tuple:  # tuple[float, float]: --name A B
            items = typing.get_args(tp)
            parser.add_argument(_flag(name), dest=name, type=items[0], nargs=len(items), default=None,
                                metavar=items[0].__name__.upper(), help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, type=tp, default=None, metavar=tp.__name__.upper(),
                                help=help_text)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    preset = getattr(args, "preset", None)
    if preset is not None:
        values.update(presets[preset])
    for name in fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    unknown = set(values) - set(fields)
    if unknown:
        parser.error(f"preset sets unknown fields {sorted(unknown)}")
    try:
        cfg = cls(**values)
    except ConfigError as e:
        parser.error(str(e))
    except TypeError as e:  # a required field left unset
        parser.error(str(e))
    if args.dry_run:
        print(json.dumps(config_to_dict(cfg), indent=2))
    return cfg, bool(args.dry_run)

