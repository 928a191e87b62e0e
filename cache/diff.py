"""Differences between two nested JSON-like records, worded for a refusal: the one printer every check
that compares a stored record with a run's (a cache's manifest, a training run's record, a sample
folder's record) uses."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["nested_diff", "describe_change"]


def nested_diff(old: Mapping[str, Any], new: Mapping[str, Any], *, skip: frozenset[str] = frozenset(),
                _prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted name, old value, new value)`` of every leaf that differs between two nested dicts,
    sorted by name; names in ``skip`` (dotted, at any depth) are left out with all below them."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{_prefix}{key}"
        if name in skip:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += nested_diff(a, b, skip=skip, _prefix=name + ".")
        elif a != b:
            out.append((name, a, b))
    return out


def describe_change(name: str, old: Any, new: Any, *, sides: tuple[str, str] | None = None, items: int = 3) -> str:
    """One difference of :func:`nested_diff`: ``name: old -> new`` (values as Python literals), or with
    ``sides`` (what holds the old and the new value, e.g. ``("the cache", "this run")``)
    ``name: the cache has OLD, this run has NEW`` (values as JSON). Two lists show their lengths and the
    first ``items`` edits that turn one into the other (added, removed or changed items with their
    positions); a list against something else shows the list by its length alone (a teacher's 768 channel
    scales against none)."""
    if isinstance(old, list) != isinstance(new, list):
        def shown(v: Any) -> str:
            return f"a list of {len(v)} items" if isinstance(v, list) else (repr(v) if sides is None else json.dumps(v))

        if sides is None:
            return f"{name}: {shown(old)} -> {shown(new)}"
        return f"{name}: {_short(sides[0])} has {shown(old)}, {sides[1]} has {shown(new)}"
    if isinstance(old, list) and isinstance(new, list):
        edits = _list_edits(old, new)
        more = f" and {len(edits) - items} more" if len(edits) > items else ""
        shown = "; ".join(edits[:items]) + more
        if sides is None:
            return f"{name}: {len(old)} -> {len(new)} items: {shown}"
        return f"{name}: {len(old)} items in {sides[0]}, {len(new)} in {sides[1]}: {shown}"
    if sides is None:
        return f"{name}: {old!r} -> {new!r}"
    return f"{name}: {_short(sides[0])} has {json.dumps(old)}, {sides[1]} has {json.dumps(new)}"


def _short(side: str) -> str:
    return side.removeprefix("the ")


def _list_edits(old: list[Any], new: list[Any]) -> list[str]:
    a, b = [json.dumps(x) for x in old], [json.dumps(x) for x in new]
    edits = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "insert":
            edits += [f"added {b[j]} at position {j}" for j in range(j1, j2)]
        elif op == "delete":
            edits += [f"removed {a[i]} from position {i}" for i in range(i1, i2)]
        elif op == "replace":
            edits += [f"{a[i]} became {b[j]} at position {j}" for i, j in zip(range(i1, i2), range(j1, j2))]
            edits += [f"added {b[j]} at position {j}" for j in range(j1 + i2 - i1, j2)]
            edits += [f"removed {a[i]} from position {i}" for i in range(i1 + j2 - j1, i2)]
    return edits
