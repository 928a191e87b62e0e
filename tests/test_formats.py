"""The reader contract in every format, and the converter between them.

Each contract test (matched rows, determinism, exact resume, rank split, flips, teacher subsets)
runs on tests/common/synthetic.py's cache as zarr and converted to HDF5 and FFCV, with each
format's fast reads and with its library's own reads (``UREPA_IO=library``). Then: the same batches
bit for bit across formats, conversion (everything kept, atomic, resumable), damaged and foreign
files, ``cache.inspect --verify``, and the trainer's losses from each format.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from common.formats import FORMAT_CASES, as_format, direct_reads, io_env
from common.synthetic import expected_latent, synthetic_cache
from conftest import ROOT, _env

import cache
from cache import CacheError, epoch_flips
from cache import inspect as cache_inspect
from cache.cli.advice import explain
from cache.convert import convert
from cache.manifest import Manifest


@pytest.fixture(scope="module", params=list(FORMAT_CASES))
def synth(request, tmp_path_factory):
    """tests/common/synthetic.py's cache (100 rows, 2 variants, rows 3, 50, 51 skipped) in one format."""
    fmt, io = FORMAT_CASES[request.param]
    with pytest.MonkeyPatch.context() as mp:
        io_env(mp, io)
        folder = tmp_path_factory.mktemp(f"synth-{request.param}")
        zarr_cache = synthetic_cache(folder / "c.zarr")
        c = as_format(zarr_cache.url, fmt, folder)
        assert c.format == fmt
        yield c


def test_fast_path_is_taken_unless_library_io_is_forced(synth):
    loader = synth.loader(4)
    assert direct_reads(loader) == (not os.environ.get("UREPA_IO"))


def test_open_cache_api(synth):
    assert len(synth) == 97 and synth.num_variants == 2
    assert synth.latents.shape == (100, 2, 8, 2, 2)
    assert set(synth.features) == {"t_a", "t_b"} and synth.features["t_a"].shape == (100, 2, 6, 5)
    assert synth.labels[3] == -1 and synth.labels[4] == 1
    assert 3 not in synth.rows and 50 not in synth.rows
    assert synth.source_path(7) == "c1/img0007.jpg"
    assert isinstance(synth.manifest, Manifest) and synth.manifest.layout == synth.layout
    assert [s.row for s in synth.manifest.skipped_files] == [3, 50, 51]


def test_loader_batches_are_matched_rows(synth):
    seen = []
    for b in synth.loader(8, seed=1, epoch=2, flip=True, num_workers=3):
        idx, flip = b["index"].numpy(), b["flip"].numpy().astype(int)
        assert b["latents"].shape == (8, 8, 2, 2) and b["features"]["t_a"].shape == (8, 6, 5)
        np.testing.assert_array_equal(b["latents"][:, 0, 0, 0].numpy(), [expected_latent(r, v) for r, v in zip(idx, flip)])
        np.testing.assert_array_equal(b["features"]["t_b"][:, 0, 0].numpy(),
                                      [np.float16(expected_latent(r, v) + np.float16(1)) for r, v in zip(idx, flip)])
        np.testing.assert_array_equal(b["labels"].numpy(), idx % 3)
        seen += idx.tolist()
    assert len(seen) == 96 and len(set(seen)) == 96 and not {3, 50, 51} & set(seen)


def test_loader_is_deterministic_and_epoch_dependent(synth):
    def run(**kw):
        return [b["index"].tolist() for b in synth.loader(10, **kw)]
    assert run(seed=0, epoch=0) == run(seed=0, epoch=0, num_workers=1)
    assert run(seed=0, epoch=0) != run(seed=0, epoch=1)
    assert run(seed=0, epoch=0) != run(seed=1, epoch=0)


def test_start_resumes_exactly(synth):
    full = [b for b in synth.loader(6, seed=3, epoch=1, flip=True)]
    for consumed_batches in (0, 1, 7):
        rest = list(synth.loader(6, seed=3, epoch=1, flip=True, start=6 * consumed_batches))
        assert len(rest) == len(full) - consumed_batches
        for a, b in zip(full[consumed_batches:], rest):
            for key in ("index", "flip", "labels", "latents"):
                assert (a[key] == b[key]).all()


def test_ranks_split_each_global_batch(synth):
    one = list(synth.loader(12, seed=4, world_size=1))
    ranks = [list(synth.loader(4, seed=4, world_size=3, rank=r)) for r in range(3)]
    assert all(len(r) == len(one) for r in ranks)
    for k, b in enumerate(one):
        joined = np.concatenate([ranks[r][k]["index"].numpy() for r in range(3)])
        np.testing.assert_array_equal(joined, b["index"].numpy())
        joined_lat = np.concatenate([ranks[r][k]["latents"].numpy() for r in range(3)])
        np.testing.assert_array_equal(joined_lat, b["latents"].numpy())


def test_block_order_matched_rows_ranks_and_resume(synth):
    """order="blocks": the rows of cache.block_order in every format, matched, ranks disjoint and covering,
    a resume at a global batch exact; the default order is unchanged by it."""
    kw = dict(seed=2, epoch=1, flip=True, order="blocks", shuffle_window=12)
    unit = synth.read_unit_rows
    assert unit == {"zarr": 4, "hdf5": 1, "ffcv": 1}[synth.format]  # zarr: its inner chunk; a contiguous h5: rows
    want = cache.block_order(synth.rows, block_rows=unit, window=12, seed=2, epoch=1, batch_size=4, world_size=3)
    ranks = [list(synth.loader(4, world_size=3, rank=r, **kw)) for r in range(3)]
    seen = []
    for r, batches in enumerate(ranks):
        for k, b in enumerate(batches):
            idx, flip = b["index"].numpy(), b["flip"].numpy().astype(int)
            np.testing.assert_array_equal(idx, want[k * 12 + r * 4:k * 12 + (r + 1) * 4])
            np.testing.assert_array_equal(b["latents"][:, 0, 0, 0].numpy(),
                                          [expected_latent(i, v) for i, v in zip(idx, flip)])
            seen += idx.tolist()
        rest = list(synth.loader(4, world_size=3, rank=r, start=5 * 12, **kw))
        assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in batches[5:]]
    assert len(seen) == len(set(seen)) == 96
    default = [b["index"].tolist() for b in synth.loader(8, seed=2, epoch=1)]
    assert default == [b["index"].tolist() for b in synth.loader(8, seed=2, epoch=1, order="permutation")]
    assert sum(default, []) == cache.epoch_order(synth.rows, seed=2, epoch=1)[:96].tolist()
    with pytest.raises(ValueError, match="order='random'"):
        synth.loader(4, order="random")


def test_flip_selection(synth):
    b = next(iter(synth.loader(32, seed=0, flip=True)))
    flips = b["flip"].numpy()
    assert flips.any() and not flips.all()
    np.testing.assert_array_equal(flips, epoch_flips(97, seed=0, epoch=0)[:32].astype(bool))
    b0 = next(iter(synth.loader(32, seed=0, flip=False)))
    assert not b0["flip"].any()
    np.testing.assert_array_equal(b0["latents"][:, 0, 0, 0].numpy(), [expected_latent(r, 0) for r in b0["index"].numpy()])


def test_flip_needs_two_variants(tmp_path, synth):
    c = as_format(synthetic_cache(tmp_path / "one.zarr", n=20, variants=1, skipped=()).url, synth.format, tmp_path)
    with pytest.raises(ValueError, match="--flip both"):
        c.loader(4, flip=True)


def test_teacher_subset_and_errors(synth):
    b = next(iter(synth.loader(4, teachers=["t_b"])))
    assert list(b["features"]) == ["t_b"]
    with pytest.raises(ValueError, match="unknown teachers"):
        synth.loader(4, teachers=["nope"])
    with pytest.raises(ValueError, match="outside the epoch"):
        synth.loader(4, start=1000)




# ---------------------------------------------------------------------------------------------
# The same cache in every format


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    """One synthetic cache as zarr, HDF5 (contiguous, and chunked + gzip), FFCV and zarr again from FFCV."""
    with pytest.MonkeyPatch.context() as mp:
        io_env(mp, None)  # the fast paths, whatever the last `synth` case left set
        folder = tmp_path_factory.mktemp("every")
        z = synthetic_cache(folder / "c.zarr", n=90, skipped=(0, 17, 89))
        out = {"zarr": z, "hdf5": convert(z.url, folder / "c.h5", format="hdf5", progress=False, block_rows=32),
               "hdf5-gzip": convert(z.url, folder / "g.h5", format="hdf5", progress=False, compression="gzip"),
               "ffcv": convert(z.url, folder / "c.ffcv", format="ffcv", progress=False)}
        out["zarr-from-ffcv"] = convert(out["ffcv"].url, folder / "back.zarr", format="zarr", progress=False)
        yield out


SETTINGS = [dict(seed=0, epoch=0), dict(seed=3, epoch=1, flip=True), dict(seed=1, epoch=2, flip=True, start=10),
            dict(seed=2, world_size=3, rank=2, flip=True), dict(seed=2, world_size=2, rank=1, drop_last=False, start=7),
            dict(shuffle=False, drop_last=False, teachers=["t_b"])]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_every_format_yields_the_same_batches_bit_for_bit(every_format, kw):
    ref = list(every_format["zarr"].loader(7, num_workers=2, **kw))
    assert ref
    for name, c in every_format.items():
        got = list(c.loader(7, num_workers=2, **kw))
        assert len(got) == len(ref), name
        for a, b in zip(ref, got):
            for key in ("latents", "labels", "index", "flip"):
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (name, key)
                assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), (name, key)
            assert list(a["features"]) == list(b["features"])
            for t in a["features"]:
                assert a["features"][t].dtype == b["features"][t].dtype
                assert a["features"][t].numpy().tobytes() == b["features"][t].numpy().tobytes(), (name, t)


def test_conversion_keeps_rows_labels_sources_and_manifest(every_format):
    z = every_format["zarr"]
    for name, c in every_format.items():
        np.testing.assert_array_equal(c.labels, z.labels)
        np.testing.assert_array_equal(c.rows, z.rows)
        assert c.latents.shape == z.latents.shape and c.features["t_a"].shape == z.features["t_a"].shape
        np.testing.assert_array_equal(c.latents[:], z.latents[:])  # every row and variant, skipped rows too
        np.testing.assert_array_equal(c.features["t_b"][40:50], z.features["t_b"][40:50])
        assert [c.source_path(i) for i in (0, 17, 89)] == [z.source_path(i) for i in (0, 17, 89)]
        assert (c.num_classes, c.manifest.classes, c.num_variants) == (z.num_classes, z.manifest.classes, z.num_variants)
        volatile = {"generation", "created"} if name.startswith("zarr") else set()
        assert isinstance(c.manifest, Manifest), name
        assert {k: v for k, v in c.manifest.to_dict().items() if k not in volatile} == \
            {k: v for k, v in z.manifest.to_dict().items() if k not in volatile}, name
        assert [s.row for s in c.manifest.skipped_files] == [0, 17, 89]


def test_teacher_subset(every_format, tmp_path):
    for fmt in ("hdf5", "ffcv", "zarr"):
        c = convert(every_format["zarr"].url, tmp_path / f"sub.{fmt}", format=fmt, teachers=["t_b"], progress=False)
        assert list(c.features) == ["t_b"] and list(c.layout.teachers) == ["t_b"]
        a = next(iter(every_format["zarr"].loader(8, seed=5, flip=True, teachers=["t_b"])))
        b = next(iter(c.loader(8, seed=5, flip=True)))
        assert (a["features"]["t_b"] == b["features"]["t_b"]).all() and (a["latents"] == b["latents"]).all()
    with pytest.raises(CacheError, match="no teachers"):
        convert(every_format["zarr"].url, tmp_path / "x.h5", format="hdf5", teachers=["nope"], progress=False)


def test_h5py_path_and_a_failing_fast_path_read_the_same(every_format, monkeypatch, caplog):
    from cache.formats import hdf5 as h5cache

    h = every_format["hdf5"]
    ref = [b["latents"] for b in h.loader(8, seed=4, flip=True)]
    assert direct_reads(h.loader(8)) and not direct_reads(every_format["hdf5-gzip"].loader(8))

    def broken(self, rows, variants, out):
        raise OSError("preadv is not supported here")

    monkeypatch.setattr(h5cache._H5RowReader, "_read_direct", broken)
    with caplog.at_level("WARNING"):
        loader = h.loader(8, seed=4, flip=True)
        got = [b["latents"] for b in loader]
    assert all((a == b).all() for a, b in zip(ref, got)) and len(ref) == len(got)
    assert not direct_reads(loader) and "through h5py from now on" in caplog.text


def test_ffcv_loader_and_a_failing_fast_path_read_the_same(every_format, monkeypatch, caplog):
    from cache.formats.ffcv import reader as ffcv_format

    f = every_format["ffcv"]
    ref = [b["latents"] for b in f.loader(8, seed=4, flip=True)]
    assert direct_reads(f.loader(8))
    with monkeypatch.context() as mp:  # FFCV's own loader, chosen at open
        mp.setenv("UREPA_IO", "library")
        lib = cache.open_cache(f.url)
        got = [b["latents"] for b in lib.loader(8, seed=4, flip=True)]
    assert lib.loader(8)._source is not None
    assert all((a == b).all() for a, b in zip(ref, got)) and len(ref) == len(got)

    def broken(self, rows, variants, out):
        raise OSError("preadv is not supported here")

    monkeypatch.setattr(ffcv_format._BetonRowReader, "_read_direct", broken)
    with caplog.at_level("WARNING"):
        loader = f.loader(8, seed=4, flip=True)
        got = [b["latents"] for b in loader]
    assert all((a == b).all() for a, b in zip(ref, got)) and len(ref) == len(got)
    assert not direct_reads(loader) and "from FFCV's loader from now on" in caplog.text


def test_inspect_verifies_every_format(every_format, capsys):
    for name, c in every_format.items():
        assert cache_inspect.main([c.url, "--verify"]) == 0, name
        assert "verify: OK" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Conversion: atomic, resumable, refusals


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "ffcv"])
def test_a_killed_conversion_leaves_no_cache_and_the_rerun_finishes(fmt, tmp_path, monkeypatch):
    from cache import convert as convert_mod

    z = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=(5,))
    real = convert_mod._blocks
    calls = []

    def dies(src, *args):
        calls.append(args[-2])  # lo
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(src, *args)

    dst = tmp_path / f"out.{fmt}"
    with monkeypatch.context() as m:
        m.setattr(convert_mod, "_blocks", dies)
        with pytest.raises(KeyboardInterrupt):
            convert(z.url, dst, format=fmt, progress=False, block_rows=16)
    assert not os.path.exists(dst)
    partial = str(dst) + ".partial"
    assert os.path.exists(partial)
    with pytest.raises(CacheError):
        cache.open_cache(partial)
    calls.clear()

    def counts(src, *args):
        calls.append(args[-2])  # lo
        return real(src, *args)

    with monkeypatch.context() as m:
        m.setattr(convert_mod, "_blocks", counts)
        c = convert(z.url, dst, format=fmt, progress=False, block_rows=16)
    assert not os.path.exists(partial)
    # zarr keeps its finished shards (2), FFCV its staged blocks (2 of 3, the third died); HDF5 starts again
    assert len(calls) == {"zarr": 1, "ffcv": 1, "hdf5": 3}[fmt]
    a, b = list(z.loader(8, seed=1, flip=True)), list(c.loader(8, seed=1, flip=True))
    assert len(a) == len(b) and all((x["latents"] == y["latents"]).all() for x, y in zip(a, b))


def test_convert_refuses_existing_and_foreign_targets(tmp_path, capsys):
    z = synthetic_cache(tmp_path / "c.zarr", n=20, variants=1, skipped=())
    convert(z.url, tmp_path / "c.h5", format="hdf5", progress=False)
    with pytest.raises(CacheError, match="exists"):
        convert(z.url, tmp_path / "c.h5", format="hdf5", progress=False)
    convert(z.url, tmp_path / "c.h5", format="hdf5", progress=False, overwrite=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError):
        convert(z.url, tmp_path / "notes.txt", format="hdf5", progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    proc = subprocess.run([sys.executable, "-m", "cache.convert", z.url, str(tmp_path / "cli.h5"), "--format", "hdf5"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert cache.open_cache(tmp_path / "cli.h5").format == "hdf5"
    proc = subprocess.run([sys.executable, "-m", "cache.convert", z.url, str(tmp_path / "x"), "--format", "parquet"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "parquet" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Damaged and foreign files: a sentence naming the file and what to do, never a hang or garbage rows


@pytest.fixture()
def small_copies(tmp_path):
    z = synthetic_cache(tmp_path / "c.zarr", n=40, skipped=(2,))
    return {"hdf5": convert(z.url, tmp_path / "c.h5", format="hdf5", progress=False),
            "ffcv": convert(z.url, tmp_path / "c.ffcv", format="ffcv", progress=False)}


def _data_file(c):
    return c.url if c.format == "hdf5" else c.beton


@pytest.mark.parametrize("fmt", ["hdf5", "ffcv"])
def test_truncated_file_is_a_sentence(small_copies, fmt, capsys):
    c = small_copies[fmt]
    path = _data_file(c)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size * 2 // 3)
    with pytest.raises(CacheError, match="truncated") as e:
        cache.open_cache(c.url)
    assert path in str(e.value) and "convert" in explain(e.value)
    assert cache_inspect.main([c.url, "--verify"]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["hdf5", "ffcv"])
def test_a_flipped_byte_is_found_by_verify(small_copies, fmt, capsys):
    c = small_copies[fmt]
    path = _data_file(c)
    offset = (c._offsets["features/t_a"] + 7 * 2 * 6 * 5 * 2) if fmt == "hdf5" else os.path.getsize(path) // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    again = cache.open_cache(c.url)  # a flipped data byte is not visible at open: verify finds it
    assert cache_inspect.main([again.url, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and path in out and "checksum" in out


def test_manifest_that_does_not_match_the_file(small_copies):
    import h5py

    h = small_copies["hdf5"]
    with h5py.File(h.url, "r+") as f:
        m = json.loads(f.attrs["urepa_cache"])
        m["layout"]["num_rows"] = 41
        f.attrs["urepa_cache"] = json.dumps(m)
    with pytest.raises(CacheError, match="does not match its manifest"):
        cache.open_cache(h.url)
    fc = small_copies["ffcv"]
    path = os.path.join(fc.url, "manifest.json")
    m = json.load(open(path))
    m["layout"]["num_rows"] = 41
    json.dump(m, open(path, "w"))
    with pytest.raises(CacheError, match="header does not match"):
        cache.open_cache(fc.url)
    m["layout"]["teachers"] = {"t_a": [6, 5]}
    m["layout"]["num_rows"] = 40
    json.dump(m, open(path, "w"))
    with pytest.raises(CacheError, match="does not match"):
        cache.open_cache(fc.url)


def test_unrecognised_files_are_sentences(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(CacheError, match="not an HDF5 cache") as e:
        cache.open_cache(tmp_path / "x.h5")
    assert str(tmp_path / "x.h5") in str(e.value)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "data.beton").write_bytes(b"\0" * 100)
    with pytest.raises(CacheError, match="no ffcv.json"):
        cache.open_cache(tmp_path / "b")
    import h5py

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a finished feature cache"):
        cache.open_cache(tmp_path / "plain.h5")


def test_a_replaced_file_stops_the_loader(small_copies, tmp_path):
    from cache import CacheChangedError

    for c in small_copies.values():
        it = iter(c.loader(4, seed=0))
        next(it)
        path = _data_file(c)
        os.replace(path, str(path) + ".old")
        with open(str(path) + ".old", "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        with pytest.raises(CacheChangedError, match="replaced"):
            next(it)


# ---------------------------------------------------------------------------------------------
# The trainer from every format


@pytest.mark.slow
def test_trainer_has_identical_losses_from_every_format(built_cache, tmp_path):
    from test_train import losses, run

    results = {}
    for fmt in ("zarr", "hdf5", "ffcv"):
        c = as_format(built_cache, fmt, tmp_path)
        run(c.url, tmp_path / f"run-{fmt}", steps=3, flip=True)
        results[fmt] = losses(tmp_path / f"run-{fmt}")
    assert len(results["zarr"]) == 3
    assert results["hdf5"] == results["zarr"] and results["ffcv"] == results["zarr"]
