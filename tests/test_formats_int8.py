"""int8 teacher tokens in every format, and ``cache.convert --feature-dtype keep|fp16|int8``.

The reader contract of tests/test_formats.py on a cache with one int8 teacher (t_a: int8 values and
float32 scales) and one float16 teacher (t_b), as zarr and converted to HDF5 and FFCV, with each
format's fast reads and its library's own reads (``UREPA_IO=library``): the stored int8 values and
scales equal the zarr source's, batches are matched rows, ``dequantize=True`` gives the same float16
tokens in every format. Then conversion between dtypes: keep copies every array bit for bit, int8 is
``quantize_tokens`` of the float16 tokens, fp16 is ``dequantize_tokens`` of the int8 ones, and a zarr
copy quantised by convert opens and loads like a ``--feature-dtype int8`` build.
"""

import json
import os

import numpy as np
import pytest
import torch
from common.formats import FORMAT_CASES, SUFFIX, direct_reads, io_env
from common.synthetic import TEACHERS, expected_latent, float_tokens, token_cache
from conftest import run_build

import cache
from cache import CacheDataset, CacheError
from cache import inspect as cache_inspect
from cache.convert import convert
from cache.convert import main as convert_main
from cache.quant import CALIBRATION_ROWS, channel_scales, dequantize_tokens, quantize_tokens

ARRAYS = ["latents", "features/t_a", "features/t_b", "feature_scales/t_a"]


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The int8 token cache (40 rows, 2 variants, rows 5 and 20 skipped) as zarr, HDF5 and FFCV (keep)."""
    folder = tmp_path_factory.mktemp("int8")
    z = token_cache(folder / "c.zarr")
    out = {"zarr": z.url}
    for fmt in ("hdf5", "ffcv"):
        out[fmt] = convert(z.url, folder / f"c{SUFFIX[fmt]}", format=fmt, progress=False, block_rows=16).url
    return out


@pytest.fixture(scope="module", params=list(FORMAT_CASES))
def q8(request, copies):
    """The int8 cache in one format, opened with that case's I/O switches."""
    fmt, io = FORMAT_CASES[request.param]
    with pytest.MonkeyPatch.context() as mp:
        io_env(mp, io)
        c = cache.open_cache(copies[fmt])
        assert c.format == fmt
        yield c


def test_stored_int8_values_and_scales_equal_the_zarr_source(q8, copies):
    z = cache.open_cache(copies["zarr"])
    assert q8.layout == z.layout and q8.layout.quantized_teachers == ["t_a"]
    assert set(q8.feature_scales) == {"t_a"}
    assert q8.features["t_a"].dtype == np.int8 and q8.feature_scales["t_a"].dtype == np.float32
    assert q8.features["t_b"].dtype == np.float16 and q8.feature_scales["t_a"].shape == (40, 2, 6)
    for name in ARRAYS:  # every row and variant, skipped rows too
        got, want = np.asarray(q8.array(name)[:]), np.asarray(z.array(name)[:])
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
    q, s = quantize_tokens(torch.from_numpy(float_tokens(np.arange(40), 2, 6, 5, 0)))
    data = np.flatnonzero(z.labels >= 0)
    np.testing.assert_array_equal(q8.features["t_a"][:][data], q.numpy()[data])
    np.testing.assert_array_equal(q8.feature_scales["t_a"][:][data], s.numpy()[data])


def test_fast_path_for_int8_and_float32_datasets(q8):
    forced = bool(os.environ.get("UREPA_IO"))
    loader = q8.loader(4)
    assert direct_reads(loader) == (not forced)
    if q8.format == "hdf5":
        assert all((q8._offsets[name] is None) == forced for name in ARRAYS)
    if q8.format == "ffcv" and forced:  # FFCV's own loader
        source = q8.batch_source(["features/t_a", "feature_scales/t_a"], num_workers=1, prefetch=1)
        assert source.variant_dtypes == {"features/t_a": np.int8, "feature_scales/t_a": np.float32}
    if q8.format == "ffcv" and not forced:
        assert {k: q8.row_reader(k).dtype for k in ("features/t_a", "feature_scales/t_a")} == \
            {"features/t_a": np.int8, "feature_scales/t_a": np.float32}


def test_loader_batches_are_matched_rows_in_stored_and_dequantized_form(q8):
    values, scales = np.asarray(q8.features["t_a"][:]), np.asarray(q8.feature_scales["t_a"][:])
    t_b = np.asarray(q8.features["t_b"][:])
    stored = list(q8.loader(8, seed=1, flip=True, num_workers=2, drop_last=False))
    fp16 = list(q8.loader(8, seed=1, flip=True, num_workers=3, drop_last=False, dequantize=True))
    assert len(stored) == len(fp16) == 5
    seen = []
    for a, b in zip(stored, fp16):
        idx, flip = a["index"].numpy(), a["flip"].numpy().astype(int)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["flip"], b["flip"])
        np.testing.assert_array_equal(a["latents"][:, 0, 0, 0].numpy(), [expected_latent(r, v) for r, v in zip(idx, flip)])
        assert a["features"]["t_a"].dtype == torch.int8 and a["feature_scales"]["t_a"].dtype == torch.float32
        assert list(a["feature_scales"]) == ["t_a"] and b["feature_scales"] == {}
        np.testing.assert_array_equal(a["features"]["t_a"].numpy(), values[idx, flip])
        np.testing.assert_array_equal(a["feature_scales"]["t_a"].numpy(), scales[idx, flip])
        np.testing.assert_array_equal(a["features"]["t_b"].numpy(), t_b[idx, flip])
        assert b["features"]["t_a"].dtype == torch.float16
        assert torch.equal(b["features"]["t_a"], dequantize_tokens(a["features"]["t_a"], a["feature_scales"]["t_a"],
                                                                   dtype=torch.float16))
        assert torch.equal(a["features"]["t_b"], b["features"]["t_b"]) and torch.equal(a["latents"], b["latents"])
        seen += idx.tolist()
    assert sorted(seen) == [r for r in range(40) if r not in (5, 20)]


def test_teacher_subset_without_the_int8_teacher(q8):
    b = next(iter(q8.loader(4, teachers=["t_b"])))
    assert list(b["features"]) == ["t_b"] and b["feature_scales"] == {}


def test_map_style_dataset_on_int8(q8):
    if q8.format == "ffcv" and os.environ.get("UREPA_IO"):  # FFCV's own loader reads whole batches only
        with pytest.raises(ValueError):
            CacheDataset(q8)
        return
    item, raw = CacheDataset(q8, variant=1)[7], CacheDataset(q8, variant=1, dequantize=False)[7]
    row = int(q8.rows[7])
    assert int(item["index"]) == row and item["feature_scales"] == {}
    np.testing.assert_array_equal(raw["features"]["t_a"].numpy(), q8.features["t_a"][row, 1])
    np.testing.assert_array_equal(raw["feature_scales"]["t_a"].numpy(), q8.feature_scales["t_a"][row, 1])
    assert torch.equal(item["features"]["t_a"], dequantize_tokens(raw["features"]["t_a"], raw["feature_scales"]["t_a"],
                                                                   dtype=torch.float16))


def test_every_format_yields_the_same_batches_bit_for_bit(copies, monkeypatch):
    monkeypatch.delenv("UREPA_IO", raising=False)
    caches = {fmt: cache.open_cache(url) for fmt, url in copies.items()}
    for kw in (dict(seed=3, epoch=1, flip=True), dict(seed=2, world_size=2, rank=1, drop_last=False, start=7)):
        for dequantize in (False, True):
            ref = list(caches["zarr"].loader(7, num_workers=2, dequantize=dequantize, **kw))
            for fmt, c in caches.items():
                got = list(c.loader(7, num_workers=2, dequantize=dequantize, **kw))
                assert len(got) == len(ref), fmt
                for a, b in zip(ref, got):
                    for key in ("features", "feature_scales"):
                        assert list(a[key]) == list(b[key]), (fmt, key)
                        for t in a[key]:
                            assert a[key][t].dtype == b[key][t].dtype, (fmt, key, t)
                            assert a[key][t].numpy().tobytes() == b[key][t].numpy().tobytes(), (fmt, key, t)
                    assert a["latents"].numpy().tobytes() == b["latents"].numpy().tobytes() and torch.equal(a["index"], b["index"])


def test_inspect_verifies_int8_copies(copies, capsys):
    for fmt, url in copies.items():
        assert cache_inspect.main([url, "--verify"]) == 0, fmt
        out = capsys.readouterr().out
        assert "verify: OK" in out and "int8 + float32 scale per token" in out, fmt


# ---------------------------------------------------------------------------------------------
# Files whose data do not match the dtypes their manifest names


def test_hdf5_refuses_datasets_that_do_not_match_the_manifest_dtypes(tmp_path):
    import h5py

    z = token_cache(tmp_path / "c.zarr", n=16, skipped=())
    h = convert(z.url, tmp_path / "c.h5", format="hdf5", progress=False)
    with h5py.File(h.url, "r+") as f:
        m = json.loads(f.attrs["urepa_cache"])
        m["layout"]["dtypes"]["features"]["t_a"] = "float16"  # the file holds int8 values
        f.attrs["urepa_cache"] = json.dumps(m)
    with pytest.raises(CacheError, match="does not match its manifest"):
        cache.open_cache(h.url)
    f16 = convert(token_cache(tmp_path / "f.zarr", n=16, skipped=(), feature_dtypes={}).url, tmp_path / "f.h5",
                  format="hdf5", progress=False)
    with h5py.File(f16.url, "r+") as f:
        m = json.loads(f.attrs["urepa_cache"])
        m["layout"]["dtypes"]["features"]["t_a"] = "int8"  # the file holds float16 tokens and no scales
        f.attrs["urepa_cache"] = json.dumps(m)
    with pytest.raises(CacheError, match="lacks the dataset 'feature_scales/t_a'|does not match its manifest"):
        cache.open_cache(f16.url)


def test_ffcv_refuses_fields_that_do_not_match_the_manifest_dtypes(copies, tmp_path):
    import shutil

    folder = tmp_path / "c.ffcv"
    shutil.copytree(copies["ffcv"], folder)
    beton = folder / "data.beton"
    raw = beton.read_bytes()
    head = raw[:1 << 16]
    assert head.count(b'"|i1"') == 1  # the int8 tokens' field; stored as uint8 instead:
    beton.write_bytes(raw.replace(b'"|i1"', b'"|u1"', 1))
    with pytest.raises(CacheError, match="fields .* do not match the cache's manifest"):
        cache.open_cache(folder)
    beton.write_bytes(raw)
    assert cache.open_cache(folder).format == "ffcv"
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m["layout"]["dtypes"]["features"]["t_a"] = "float16"
    path.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="does not match"):
        cache.open_cache(folder)


def test_verify_finds_a_flipped_byte_in_the_scales(tmp_path, capsys):
    z = token_cache(tmp_path / "c.zarr", n=16, skipped=())
    h = convert(z.url, tmp_path / "c.h5", format="hdf5", progress=False)
    offset = h._offsets["feature_scales/t_a"] + 3 * 2 * 6 * 4 + 1
    with open(h.url, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    assert cache_inspect.main([h.url, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "feature_scales/t_a" in out


# ---------------------------------------------------------------------------------------------
# convert --feature-dtype keep | int8 | fp16


@pytest.fixture(scope="module")
def fp16_source(tmp_path_factory):
    """The token cache with both teachers in float16."""
    return token_cache(tmp_path_factory.mktemp("fp16") / "f.zarr", feature_dtypes={})


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "ffcv"])
def test_keep_copies_every_array_bit_for_bit(copies, fp16_source, fmt, tmp_path):
    for name, src in (("q", cache.open_cache(copies["zarr"])), ("f", fp16_source)):
        c = convert(src.url, tmp_path / f"{name}{SUFFIX[fmt]}", format=fmt, feature_dtype="keep", progress=False)
        assert c.layout.array_names() == src.layout.array_names() and c.layout == src.layout
        for array in c.layout.array_names()[:-1]:
            got, want = np.asarray(c.array(array)[:]), np.asarray(src.array(array)[:])
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, array)
        volatile = {"generation", "created"} if fmt == "zarr" else set()
        assert ({k: v for k, v in c.manifest.to_dict().items() if k not in volatile}
                == {k: v for k, v in src.manifest.to_dict().items() if k not in volatile})


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "ffcv"])
def test_int8_from_fp16_is_quantize_tokens_of_the_float16_tokens(fp16_source, fmt, tmp_path):
    c = convert(fp16_source.url, tmp_path / f"q{SUFFIX[fmt]}", format=fmt, feature_dtype="int8", progress=False)
    assert c.layout.quantized_teachers == ["t_a", "t_b"] and set(c.feature_scales) == {"t_a", "t_b"}
    assert c.manifest.to_dict()["layout"]["dtypes"]["features"] == {"t_a": "int8", "t_b": "int8"}
    for t in TEACHERS:
        # channel scales from the first CALIBRATION_ROWS data rows' tokens (variant 0), as a build measures them
        first = np.asarray(fp16_source.features[t][:])[fp16_source.rows[:CALIBRATION_ROWS], 0].astype(np.float32)
        channels = channel_scales(torch.from_numpy(first))
        np.testing.assert_array_equal(c.channel_scales(t), channels.numpy())
        q, s = quantize_tokens(torch.from_numpy(np.asarray(fp16_source.features[t][:])), channels)
        assert c.features[t].dtype == np.int8 and c.feature_scales[t].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(c.features[t][:]), q.numpy())
        np.testing.assert_array_equal(np.asarray(c.feature_scales[t][:]), s.numpy())
        record = c.manifest.teacher(t).to_dict()
        assert record["dtype"] == "int8" and record["converted_from"] == "float16"
        assert record["encode"] == fp16_source.manifest.teacher(t).to_dict()["encode"]
    np.testing.assert_array_equal(np.asarray(c.latents[:]), np.asarray(fp16_source.latents[:]))
    b = next(iter(c.loader(8, seed=0, dequantize=True)))
    assert b["features"]["t_a"].dtype == torch.float16 and b["feature_scales"] == {}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "ffcv"])
def test_fp16_from_int8_is_dequantize_tokens(copies, fmt, tmp_path):
    src = cache.open_cache(copies["zarr"])
    c = convert(src.url, tmp_path / f"f{SUFFIX[fmt]}", format=fmt, feature_dtype="fp16", progress=False)
    assert c.layout.quantized_teachers == [] and c.feature_scales == {}
    assert c.layout.array_names() == ["latents", "features/t_a", "features/t_b", "labels"]
    want = dequantize_tokens(torch.from_numpy(np.asarray(src.features["t_a"][:])),
                             torch.from_numpy(np.asarray(src.feature_scales["t_a"][:])), dtype=torch.float16)
    got = np.asarray(c.features["t_a"][:])
    assert got.dtype == np.float16 and got.tobytes() == want.numpy().tobytes()
    assert np.asarray(c.features["t_b"][:]).tobytes() == np.asarray(src.features["t_b"][:]).tobytes()
    record = c.manifest.teacher("t_a").to_dict()
    assert record["dtype"] == "float16" and record["converted_from"] == "int8"
    assert "converted_from" not in c.manifest.teacher("t_b").to_dict()
    # the dequantising loader of the int8 cache and the float16 copy hand out the same tokens
    a = list(src.loader(8, seed=2, flip=True, dequantize=True))
    b = list(c.loader(8, seed=2, flip=True))
    assert len(a) == len(b) and all(torch.equal(x["features"]["t_a"], y["features"]["t_a"]) for x, y in zip(a, b))


def test_teacher_subset_with_a_dtype(fp16_source, tmp_path):
    c = convert(fp16_source.url, tmp_path / "sub.h5", format="hdf5", teachers=["t_b"], feature_dtype="int8",
                progress=False)
    assert list(c.layout.teachers) == ["t_b"] and c.layout.quantized_teachers == ["t_b"]
    assert list(c.manifest.teachers) == ["t_b"] and c.manifest.teacher("t_b").to_dict()["dtype"] == "int8"


def test_cli_feature_dtype(fp16_source, tmp_path, capsys):
    assert convert_main([fp16_source.url, str(tmp_path / "q.zarr"), "--format", "zarr", "--feature-dtype", "int8"]) == 0
    assert cache.open_cache(tmp_path / "q.zarr").layout.quantized_teachers == ["t_a", "t_b"]
    with pytest.raises(SystemExit) as e:
        convert_main([fp16_source.url, str(tmp_path / "x.zarr"), "--feature-dtype", "int4"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(CacheError, match="unknown feature dtype"):
        convert(fp16_source.url, tmp_path / "y.zarr", format="zarr", feature_dtype="int4", progress=False)


@pytest.mark.slow
def test_zarr_quantised_by_convert_opens_and_loads_like_an_int8_build(built_cache, image_folder, tmp_path):
    """A --feature-dtype int8 build against its float16 build converted with --feature-dtype int8: the same
    layout and manifest (but the conversion's note), int8 values within one step of each other."""
    built = tmp_path / "built.zarr"
    run_build(image_folder, built, "--flip", "both", "--feature-dtype", "int8")
    b = cache.open_cache(built)
    c = convert(built_cache, tmp_path / "conv.zarr", format="zarr", feature_dtype="int8", progress=False)
    assert c.format == "zarr" and c.layout == b.layout and c.layout.quantized_teachers == ["tiny"]
    assert cache_inspect.main([c.url, "--verify"]) == 0

    def comparable(m):
        d = {k: v for k, v in m.to_dict().items() if k not in m.VOLATILE}
        d["teachers"] = {t: {k: v for k, v in r.items() if k not in ("converted_from", "channel_scales")}
                         for t, r in d["teachers"].items()}
        return d

    assert comparable(c.manifest) == comparable(b.manifest)
    # channel scales measured from the float16 tokens, not the encoder's float32 output: the same to rounding
    np.testing.assert_allclose(c.channel_scales("tiny"), b.channel_scales("tiny"), rtol=2e-3)
    assert c.manifest.teacher("tiny").to_dict()["converted_from"] == "float16"
    x, y = next(iter(b.loader(24, seed=0, flip=True))), next(iter(c.loader(24, seed=0, flip=True)))
    assert torch.equal(x["index"], y["index"]) and torch.equal(x["latents"], y["latents"])
    for key in ("features", "feature_scales"):
        assert x[key]["tiny"].dtype == y[key]["tiny"].dtype and x[key]["tiny"].shape == y[key]["tiny"].shape
    assert (x["features"]["tiny"].int() - y["features"]["tiny"].int()).abs().max() <= 1
    torch.testing.assert_close(y["feature_scales"]["tiny"], x["feature_scales"]["tiny"], rtol=2e-3, atol=0)
    xd = next(iter(b.loader(24, seed=0, flip=True, dequantize=True)))["features"]["tiny"].float()
    yd = next(iter(c.loader(24, seed=0, flip=True, dequantize=True)))["features"]["tiny"].float()
    step = x["feature_scales"]["tiny"].unsqueeze(-1) * torch.from_numpy(b.channel_scales("tiny"))  # per value
    assert bool(((xd - yd).abs() <= 1.6 * step + 1e-3).all())
