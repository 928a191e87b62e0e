"""The typed cache manifest: exact round trip of a built cache's manifest, unknown keys, typed reads."""

from __future__ import annotations

import pytest
import zarr

import cache
from cache.manifest import MANIFEST_KEY, EncoderInfo, Manifest, ManifestError, SourceInfo


def test_a_built_manifest_round_trips_exactly(built_cache):
    stored = dict(zarr.open_group(str(built_cache), mode="r").attrs[MANIFEST_KEY])
    m = Manifest.from_dict(stored)
    assert m.to_dict() == stored
    assert m == cache.open_cache(built_cache).manifest
    assert m.is_complete and m.generation and m.source.fingerprint == stored["source"]["fingerprint"]
    assert m.vae.random_weights is True and m.vae.spec == stored["vae"]["spec"]
    assert m.preprocessing.resolution == stored["preprocessing"]["resolution"]
    teacher = next(iter(stored["teachers"]))
    assert m.teacher(teacher).extra["tokens"] == stored["teachers"][teacher]["tokens"]
    assert m.random_weights(teacher) and m.teacher("absent") is None


def test_unknown_keys_are_kept_and_written_back(built_cache):
    stored = dict(zarr.open_group(str(built_cache), mode="r").attrs[MANIFEST_KEY])
    newer = {**stored, "future_entry": {"a": 1}, "vae": {**stored["vae"], "future_field": [1, 2]}}
    m = Manifest.from_dict(newer)
    assert m.extra == {"future_entry": {"a": 1}} and m.vae.extra["future_field"] == [1, 2]
    assert m.to_dict() == newer


def test_mistyped_or_missing_entries_are_errors():
    with pytest.raises(ManifestError, match="lacks 'classes'"):
        Manifest.from_dict({"schema_version": 1, "layout": {}})
    with pytest.raises(ManifestError, match="vae.random_weights"):
        EncoderInfo.from_dict({"spec": "x", "random_weights": "yes"}, where="vae")
    with pytest.raises(ManifestError, match="source.num_files"):
        SourceInfo.from_dict({"fingerprint": "f", "num_files": True}, where="source")
