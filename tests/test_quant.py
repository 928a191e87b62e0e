"""int8 tokens: the quantiser against a float64 reference, and int8 caches through the writer, the
loader (stored form, ``dequantize=True``, both I/O paths) and the map-style dataset."""

import numpy as np
import pytest
import torch
from common.synthetic import TEACHERS, float_tokens, token_cache

import cache
from cache import CacheDataset, CacheError, CacheWriter, zarr_layout
from cache.quant import QMAX, channel_scales, dequantize_tokens, quantize_tokens, token_cosine

pytestmark = pytest.mark.usefixtures("io_mode")


def reference_quantize(x):
    """Symmetric absmax per token, written out in float64 with numpy."""
    x = np.asarray(x, np.float64)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = amax / 127.0
    q = np.where(scale > 0, np.rint(x / np.where(scale > 0, scale, 1.0)), 0.0)
    return q.astype(np.int8), scale[..., 0]


def test_quantize_matches_the_reference_and_bounds_the_error():
    x = torch.randn(7, 33, 96, generator=torch.Generator().manual_seed(0)) * torch.rand(7, 33, 1) * 5
    x[0, 0] = 0  # a token of zeros (a skipped row)
    q, s = quantize_tokens(x)
    rq, rs = reference_quantize(x.numpy())
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == x.shape and s.shape == x.shape[:-1]
    np.testing.assert_allclose(s.numpy(), rs, rtol=1e-6)
    # float32 division may round a value lying exactly between two steps the other way: at most one step
    assert np.abs(q.numpy().astype(int) - rq.astype(int)).max() <= 1
    assert (q.numpy() == rq).mean() > 0.999
    assert int(q.abs().max()) == QMAX and int(q.min()) >= -QMAX
    err = (dequantize_tokens(q, s, dtype=torch.float64) - x.double()).abs()
    assert bool((err <= s.double().unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-12).all())  # half a step at most
    assert s[0, 0] == 0 and not q[0, 0].any()


def reference_channel_scales(calibration):
    rms = np.sqrt((np.asarray(calibration, np.float64).reshape(-1, calibration.shape[-1]) ** 2).mean(0))
    median = np.sort(rms)[(len(rms) - 1) // 2]  # the lower middle value for an even width, as torch.median
    return np.maximum(rms / median, 1.0)


def test_channel_scales_equalise_outlier_channels_and_help_the_cosine():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, 96, generator=g)
    # two outlier channels, as real ViT features have: large in every token (magnitude 30 and 60, +-25%)
    x[..., [5, 17]] = torch.tensor([30.0, 60.0]) * (1 + 0.25 * x[..., [5, 17]]).abs() * torch.sign(x[..., [6, 18]])
    c = channel_scales(x[:2])
    np.testing.assert_allclose(c.numpy(), reference_channel_scales(x[:2].numpy()), rtol=1e-6)
    assert c.dtype == torch.float32 and float(c.min()) == 1.0 and c[5] > 20 and c[17] > 40
    # quantisation with them against a float64 reference of x / c, then back
    q, s = quantize_tokens(x, c)
    rq, rs = reference_quantize(x.double().numpy() / c.double().numpy())
    np.testing.assert_allclose(s.numpy(), rs, rtol=1e-6)
    assert np.abs(q.numpy().astype(int) - rq.astype(int)).max() <= 1
    back = dequantize_tokens(q, s, c, dtype=torch.float64)
    assert bool(((back - x.double()).abs() <= (s.double().unsqueeze(-1) * c.double()) / 2 * (1 + 1e-5) + 1e-9).all())
    plain = token_cosine(x, *quantize_tokens(x))
    equalised = token_cosine(x, q, s, c)
    # the outliers set every plain token's scale: equalised, the mean error (1 - cos) is several times smaller
    assert float(1 - equalised.mean()) * 4 < float(1 - plain.mean()) and float(equalised.min()) > float(plain.min())
    # a silent median channel: nothing to equalise against
    assert torch.equal(channel_scales(torch.zeros(3, 8)), torch.ones(8))
    with pytest.raises(ValueError, match="width"):
        quantize_tokens(x, torch.ones(5))


def test_quantize_refuses_non_finite_tokens():
    x = torch.ones(2, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_tokens(x)


def test_dequantize_is_values_times_scales():
    q = torch.tensor([[[-127, 0, 5, 127]]], dtype=torch.int8)
    s = torch.tensor([[0.5]])
    assert dequantize_tokens(q, s, dtype=torch.float64).tolist() == [[[-63.5, 0.0, 2.5, 63.5]]]


CHANNELS = np.array([1.0, 1.0, 7.5, 1.0, 1.25], np.float32)  # t_a's channel scales: channel 2 an outlier


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory, io_mode):
    """The synthetic layout with t_a in int8 (written from float tokens, quantised by the writer with
    CHANNELS) and t_b in float16; returns (cache, the float tokens of t_a)."""
    c = token_cache(tmp_path_factory.mktemp("q") / "c.zarr", n=40, skipped=(), channel_scales={"t_a": CHANNELS})
    return c, float_tokens(np.arange(40), 2, *TEACHERS["t_a"], 0)


def test_int8_cache_stores_values_and_scales(int8_cache):
    c, tokens = int8_cache
    assert c.layout.feature_dtype("t_a") == "int8" and c.layout.feature_dtype("t_b") == "float16"
    assert c.features["t_a"].dtype == np.int8 and c.feature_scales["t_a"].dtype == np.float32
    assert set(c.feature_scales) == {"t_a"}
    np.testing.assert_array_equal(c.channel_scales("t_a"), CHANNELS)
    assert c.channel_scales("t_b") is None  # float16
    q, s = quantize_tokens(torch.from_numpy(tokens), torch.from_numpy(CHANNELS))
    np.testing.assert_array_equal(c.features["t_a"][:], q.numpy())
    np.testing.assert_array_equal(c.feature_scales["t_a"][:], s.numpy())
    reopened = cache.open_cache(c.url)  # the layout's dtypes survive the manifest
    assert reopened.layout == c.layout and reopened.manifest.to_dict()["layout"]["dtypes"]["features"] == {
        "t_a": "int8", "t_b": "float16"}
    assert c.verify_stored() == []


def test_loader_hands_out_stored_int8_or_dequantized_float16(int8_cache):
    c, _ = int8_cache
    stored = list(c.loader(8, seed=1, flip=True, num_workers=2, pin_memory=False))
    fp16 = list(c.loader(8, seed=1, flip=True, num_workers=3, pin_memory=False, dequantize=True))
    assert len(stored) == len(fp16) == 5
    for a, b in zip(stored, fp16):
        assert a["features"]["t_a"].dtype == torch.int8 and a["feature_scales"]["t_a"].dtype == torch.float32
        assert a["features"]["t_a"].shape == (8, *TEACHERS["t_a"]) and a["feature_scales"]["t_a"].shape == (8, 6)
        assert set(a["feature_scales"]) == {"t_a"} and b["feature_scales"] == {}
        assert b["features"]["t_a"].dtype == torch.float16 and a["features"]["t_b"].dtype == torch.float16
        rows, variants = a["index"].numpy(), a["flip"].numpy().astype(int)
        np.testing.assert_array_equal(a["features"]["t_a"].numpy(), c.features["t_a"][:][rows, variants])
        np.testing.assert_array_equal(a["feature_scales"]["t_a"].numpy(), c.feature_scales["t_a"][:][rows, variants])
        want = dequantize_tokens(a["features"]["t_a"], a["feature_scales"]["t_a"], torch.from_numpy(CHANNELS),
                                 dtype=torch.float16)
        assert torch.equal(b["features"]["t_a"], want)
        assert torch.equal(a["features"]["t_b"], b["features"]["t_b"]) and torch.equal(a["index"], b["index"])


def test_dequantized_tokens_are_close_to_the_float_tokens(int8_cache):
    c, tokens = int8_cache
    batch = next(iter(c.loader(40, shuffle=False, pin_memory=False, dequantize=True)))
    got = batch["features"]["t_a"].double().numpy()
    want = tokens[:, 0].astype(np.float64)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.999


def test_batches_dataset_hands_out_float16_by_default(int8_cache):
    c, _ = int8_cache
    default = next(iter(cache.CacheBatches(c, 8, seed=2, num_workers=1, pin_memory=False)))
    stored = next(iter(cache.CacheBatches(c, 8, seed=2, num_workers=1, pin_memory=False, dequantize=False)))
    assert default["features"]["t_a"].dtype == torch.float16 and default["feature_scales"] == {}
    assert torch.equal(default["features"]["t_a"], dequantize_tokens(stored["features"]["t_a"],
                                                                     stored["feature_scales"]["t_a"], CHANNELS,
                                                                     dtype=torch.float16))


def test_map_style_dataset_on_int8(int8_cache):
    c, _ = int8_cache
    item = CacheDataset(c, variant=1)[5]
    raw = CacheDataset(c, variant=1, dequantize=False)[5]
    assert item["features"]["t_a"].dtype == torch.float16 and item["feature_scales"] == {}
    assert raw["features"]["t_a"].dtype == torch.int8 and raw["feature_scales"]["t_a"].shape == (6,)
    row = int(c.rows[5])
    np.testing.assert_array_equal(raw["features"]["t_a"].numpy(), c.features["t_a"][row, 1])
    assert torch.equal(item["features"]["t_a"], dequantize_tokens(raw["features"]["t_a"], raw["feature_scales"]["t_a"],
                                                                   CHANNELS, dtype=torch.float16))


def test_writer_refuses_mismatched_token_inputs(tmp_path):
    layout = zarr_layout(num_rows=4, resolution=16, variants=1, teachers={"a": (2, 3), "b": (2, 3)}, shard_rows=4,
                    chunk_rows=4, feature_dtypes={"a": "int8"})
    writer, _ = CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=layout, sources=[], manifest={
        "classes": ["x"], "teachers": {}})
    lat, labels = np.zeros((4, 1, 8, 2, 2), np.float16), np.zeros(4, np.int32)
    q, f16 = np.zeros((4, 1, 2, 3), np.int8), np.zeros((4, 1, 2, 3), np.float16)
    with pytest.raises(CacheError, match="without their scales"):
        writer.write_shard(0, latents=lat, features={"a": q, "b": f16}, labels=labels)
    with pytest.raises(CacheError, match="stored in float16"):
        writer.write_shard(0, latents=lat, features={"a": f16, "b": q}, labels=labels)
    with pytest.raises(CacheError, match="one scale per token"):
        writer.write_shard(0, latents=lat, features={"a": q, "b": f16}, labels=labels, scales={"a": np.zeros((4, 1))})


def test_layout_refuses_unknown_token_dtypes():
    with pytest.raises(CacheError, match="token dtype"):
        zarr_layout(num_rows=4, resolution=16, variants=1, teachers={"a": (2, 3)}, feature_dtypes={"a": "int4"})
    with pytest.raises(CacheError, match="not a teacher"):
        zarr_layout(num_rows=4, resolution=16, variants=1, teachers={"a": (2, 3)}, feature_dtypes={"b": "int8"})
    assert zarr_layout(num_rows=4, resolution=16, variants=1, teachers={"a": (2, 3)}, feature_dtypes={"a": "float16"}) == \
        zarr_layout(num_rows=4, resolution=16, variants=1, teachers={"a": (2, 3)})


def test_token_cosine_matches_numpy_in_float64():
    x = torch.randn(5, 9, 64, generator=torch.Generator().manual_seed(1))
    x[0, 0] = 0
    x[1, :, 3] *= 40  # an outlier channel: one scale per token represents the rest coarsely
    q, s = quantize_tokens(x)
    got = token_cosine(x, q, s).double().numpy()
    xd, yd = x.double().numpy(), (q.double() * s.double().unsqueeze(-1)).numpy()
    with np.errstate(invalid="ignore"):
        want = (xd * yd).sum(-1) / np.linalg.norm(xd, axis=-1) / np.linalg.norm(yd, axis=-1)
    want[0, 0] = 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got[1].min() < got[2].min()


def test_build_warns_when_int8_tokens_miss_the_cosine_goal(caplog):
    from pipeline.build import Encoders, _int8_check

    enc = Encoders(None, {}, flip=False, autocast=None)
    enc.int8_check = {"good": torch.tensor([99.99, 100.0, 0.9999], dtype=torch.float64),
                      "bad": torch.tensor([99.9, 100.0, 0.998], dtype=torch.float64)}
    with caplog.at_level("INFO", logger="pipeline.build"):
        out = _int8_check(enc, ["good", "bad"], torch.device("cpu"), 1)
    assert out["bad"] == {"tokens": 100, "cos_mean": pytest.approx(0.999), "cos_min": pytest.approx(0.998)}
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "int8 teacher bad" in warned[0].getMessage() and "--feature-dtype fp16" in warned[0].getMessage()


def test_a_rerun_keeps_the_channel_scales_the_cache_holds(tmp_path):
    """Channel scales are measured once; a rerun whose own measurement differs in the last bits (a GPU) resumes
    with the stored ones instead of being refused or re-quantising."""
    c = token_cache(tmp_path / "c.zarr", n=16, skipped=(), channel_scales={"t_a": CHANNELS})
    m = c.manifest.to_dict()
    m["teachers"]["t_a"]["channel_scales"] = (CHANNELS * (1 + 1e-6)).tolist()
    writer, resumed = CacheWriter.create_or_resume(tmp_path / "c.zarr", layout=c.layout, manifest=m,
                                                   sources=c.sources())
    assert resumed and writer.manifest.is_complete
    np.testing.assert_array_equal(writer.channel_scales("t_a"), CHANNELS)
    np.testing.assert_array_equal(cache.open_cache(tmp_path / "c.zarr").channel_scales("t_a"), CHANNELS)
    # but a damaged record is refused by name
    m["teachers"]["t_a"]["channel_scales"] = [1.0, -2.0, 1.0, 1.0, 1.0]
    with pytest.raises(CacheError, match="channel scales"):
        cache.manifest.channel_scales_of(cache.Manifest.from_dict(m), "t_a")
