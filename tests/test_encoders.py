"""Encoder wrappers against the libraries' own paths and float64 formulas."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.encoders import (
    TINY_VAE_CONFIG,
    WeightsUnavailable,
    dinov2_pos_embed,
    load_teacher,
    load_vae,
    load_vae_decoder,
    posterior_moments,
    repa_pos_embed,
    teacher_input,
    teacher_input_size,
    vae_input,
    vae_output,
    weights_sha256,
)


def test_posterior_moments_match_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    h = torch.randn(3, 8, 5, 5, dtype=torch.float64) * 20  # exercises the logvar clamp
    dist = DiagonalGaussianDistribution(h)
    out = posterior_moments(h)
    torch.testing.assert_close(out[:, :4], dist.mean)
    torch.testing.assert_close(out[:, 4:], dist.std)


def test_vae_moments_equal_autoencoder_encode():
    from diffusers import AutoencoderKL

    loaded = load_vae("tiny", seed=0)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    assert weights_sha256(vae) == loaded.info["weights_sha256"]
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).double() / 127.5 - 1
    with torch.no_grad():
        dist = vae.double().encode(x).latent_dist
        out = loaded.module.double()(images)
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(out, torch.cat([dist.mean, dist.std], 1))


def test_random_weights_are_seeded_and_recorded():
    a, b, c = load_vae("tiny", seed=0), load_vae("tiny", seed=0), load_vae("tiny", seed=1)
    assert a.info["weights_sha256"] == b.info["weights_sha256"] != c.info["weights_sha256"]
    assert a.info["random_weights"] is True
    t = load_teacher("tiny", resolution=64)
    assert t.info["random_weights"] and t.info["tokens"] == 16 and t.info["grid"] == 4


def test_vae_input_range():
    x = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)
    torch.testing.assert_close(vae_input(x).flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))


QUANT_X = [-1.5, -1.0, -0.99, 0.0, 0.01, 0.5, 1.0, 1.2]


def test_vae_output_truncates_as_repa_by_default():
    """REPA's generate.py: clamp(255 (x + 1) / 2, 0, 255).to(uint8); by hand: 255 * 0.005 = 1.275 -> 1,
    127.5 -> 127, 128.775 -> 128, 191.25 -> 191."""
    x = torch.tensor(QUANT_X).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = vae_output(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, len(QUANT_X), 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 1, 127, 128, 191, 255, 255]
    assert torch.equal(vae_output(x, quantize="truncate"), out)


def test_vae_output_round_option_is_dits():
    """DiT's sample_ddp.py: clamp(127.5 x + 128, 0, 255) truncated = 127.5 (x + 1) rounded half up:
    1.775 -> 1, 128 -> 128, 129.275 -> 129, 191.75 -> 191."""
    x = torch.tensor(QUANT_X).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = vae_output(x, quantize="round")
    assert out[0, 0, :, 0].tolist() == [0, 0, 1, 128, 129, 191, 255, 255]
    # over a fine grid: truncate = floor(127.5 (x + 1)), round = floor(127.5 (x + 1) + 0.5), float64 references
    grid = torch.linspace(-1, 1, 100_001, dtype=torch.float64)[1:-1]
    v = 127.5 * (grid + 1)
    near_edge = ((v - v.floor()).abs() < 1e-4) | ((v - v.floor() - 0.5).abs() < 1e-4)  # float32 may fall either side
    xs = grid.float().view(1, 1, 1, -1)
    trunc, rnd = vae_output(xs)[0, 0, :, 0].long(), vae_output(xs, quantize="round")[0, 0, :, 0].long()
    assert torch.equal(trunc[~near_edge], v.floor().long()[~near_edge])
    assert torch.equal(rnd[~near_edge], (v + 0.5).floor().long()[~near_edge])
    assert set((rnd - trunc).unique().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="quantize"):
        vae_output(xs, quantize="nearest")


def test_vae_decoder_is_autoencoder_decode_with_load_vaes_hash():
    from diffusers import AutoencoderKL

    dec = load_vae_decoder("tiny", seed=0)
    assert dec.info["weights_sha256"] == load_vae("tiny", seed=0).info["weights_sha256"]
    assert dec.info["weights_sha256"] != load_vae_decoder("tiny", seed=1).info["weights_sha256"]
    assert dec.info["random_weights"] and dec.info["seed"] == 0
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        images = dec.module(z)
        ref = vae.decode(z).sample
    assert images.dtype == torch.uint8 and images.shape == (2, 64, 64, 3)
    assert torch.equal(images, vae_output(ref))
    assert dec.info["quantize"] == "truncate" and "REPA" in dec.info["output"]
    rounded = load_vae_decoder("tiny", seed=0, quantize="round")
    assert rounded.info["quantize"] == "round" and rounded.info["weights_sha256"] == dec.info["weights_sha256"]
    with torch.no_grad():
        assert torch.equal(rounded.module(z), vae_output(ref, quantize="round"))


def test_teacher_input_matches_float64_formula():
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    ref = (images.permute(0, 3, 1, 2).double().numpy() / 255.0 - mean) / std
    ref = F.interpolate(torch.from_numpy(ref), size=(56, 56), mode="bicubic", align_corners=False)
    torch.testing.assert_close(teacher_input(images, 56).double(), ref, atol=1e-4, rtol=1e-4)


def test_teacher_input_size():
    assert teacher_input_size(256) == 224 and teacher_input_size(512) == 448 and teacher_input_size(64) == 56


def test_teacher_tokens_are_normed_patch_tokens():
    t = load_teacher("tiny", resolution=64)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        tokens = t.module(images)
        full = t.module.vit.forward_features(teacher_input(images, 56))
    assert tokens.shape == (2, 16, 96)
    torch.testing.assert_close(tokens, full[:, 1:])


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(x), t = x - floor(x)."""
    def k(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0
    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def reference_resample(grid_in: np.ndarray, out: int, scale: float) -> np.ndarray:
    """Bicubic resampling (A = -0.75, edge taps clamped), source = (dst + 0.5) / scale - 0.5, float64."""
    m = grid_in.shape[0]
    mat = np.zeros((out, m))
    for i in range(out):
        x = (i + 0.5) / scale - 0.5
        x0 = int(np.floor(x))
        for off, w in zip((-1, 0, 1, 2), cubic_weights(x - x0)):
            mat[i, min(max(x0 + off, 0), m - 1)] += w
    return np.einsum("ij,jkc,lk->ilc", mat, grid_in, mat)


def test_dinov2_pos_embed_resampling():
    grid_in, dim = 37, 5
    table = torch.randn(1, 1 + grid_in * grid_in, dim, dtype=torch.float64)
    out = dinov2_pos_embed(table, 16, 1)
    assert out.shape == (1, 1 + 256, dim)
    torch.testing.assert_close(out[:, :1], table[:, :1])
    ref = reference_resample(table[0, 1:].reshape(grid_in, grid_in, dim).numpy(), 16, 16.1 / 37)
    np.testing.assert_allclose(out[0, 1:].reshape(16, 16, dim).numpy(), ref, atol=1e-5)
    assert dinov2_pos_embed(table, grid_in, 1) is table
    no_prefix = dinov2_pos_embed(table[:, 1:], 16, 0)  # register variants keep no prefix entries
    torch.testing.assert_close(no_prefix, out[:, 1:])


def test_repa_pos_embed_is_timms_resample_abs_pos_embed():
    """REPA's utils.py: timm.layers.resample_abs_pos_embed(pos_embed, [16, 16]) with its defaults (one prefix
    entry, bicubic, antialias); and, independently of torch, PIL's antialiased bicubic on a float image."""
    import timm.layers
    from PIL import Image

    grid_in, dim = 37, 6
    table = torch.randn(1, 1 + grid_in * grid_in, dim, generator=torch.Generator().manual_seed(0))
    out = repa_pos_embed(table, 16, 1)
    assert out.shape == (1, 1 + 256, dim)
    torch.testing.assert_close(out, timm.layers.resample_abs_pos_embed(table, [16, 16]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :1], table[:, :1])
    patch = table[0, 1:].reshape(grid_in, grid_in, dim).numpy()
    pil = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(patch[..., c]), mode="F")
                               .resize((16, 16), Image.BICUBIC)) for c in range(dim)], -1)
    np.testing.assert_allclose(out[0, 1:].reshape(16, 16, dim).numpy(), pil, atol=1e-5)
    assert repa_pos_embed(table, grid_in, 1) is table
    half = repa_pos_embed(table.double(), 16, 1)  # resampled in float32, returned in the table's dtype
    assert half.dtype == torch.float64
    torch.testing.assert_close(half.float(), out)


def test_repa_and_dinov2_tables_differ_on_a_smooth_table():
    """A smooth table (low-frequency sines): the antialiased size-based resampling and DINOv2's scale-factor
    one land on slightly different sample positions and kernels, so the teacher targets differ."""
    grid_in = 37
    u = (torch.arange(grid_in, dtype=torch.float64) + 0.5) / grid_in
    fy, fx = torch.meshgrid(u, u, indexing="ij")
    smooth = torch.stack([torch.sin(2 * torch.pi * (a * fx + b * fy)) for a, b in [(1, 0), (0, 1), (1, 1), (2, 1)]], -1)
    table = torch.cat([torch.zeros(1, 4, dtype=torch.float64), smooth.reshape(-1, 4)])[None].float()
    repa, dino = repa_pos_embed(table, 16, 1), dinov2_pos_embed(table, 16, 1)
    diff = (repa - dino).abs().max().item()
    assert 1e-2 < diff < 0.5  # different tables, both still resamplings of the same smooth function
    # both against the function itself at the output pixel centres: each is a fair resampling
    v = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    gy, gx = torch.meshgrid(v, v, indexing="ij")
    exact = torch.stack([torch.sin(2 * torch.pi * (a * gx + b * gy)) for a, b in [(1, 0), (0, 1), (1, 1), (2, 1)]], -1)
    assert (repa[0, 1:].double() - exact.reshape(-1, 4)).abs().max() < 0.1


def test_load_teacher_resamples_the_table_as_asked():
    import timm
    import timm.layers

    from pipeline.encoders import TINY_TEACHER

    name, kwargs = TINY_TEACHER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).pos_embed.detach()
    repa, dino = load_teacher("tiny", resolution=64), load_teacher("tiny", resolution=64, pos_embed="dinov2")
    assert repa.info["pos_embed"] == "repa" and dino.info["pos_embed"] == "dinov2"
    assert repa.info["pos_embed_source_grid"] == 37 and "antialias" in repa.info["preprocess"]
    torch.testing.assert_close(repa.module.vit.pos_embed.data, timm.layers.resample_abs_pos_embed(original, [4, 4]))
    torch.testing.assert_close(dino.module.vit.pos_embed.data, dinov2_pos_embed(original, 4, 1))
    assert repa.info["weights_sha256"] != dino.info["weights_sha256"]  # the table is part of the weights
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert not torch.allclose(repa.module(images), dino.module(images))
    with pytest.raises(ValueError, match="pos_embed"):
        load_teacher("tiny", resolution=64, pos_embed="nearest")


def test_missing_weights_say_how_to_supply_them(tmp_path):
    with pytest.raises(WeightsUnavailable, match="local path"):
        load_vae(str(tmp_path / "no-such-vae"))
    with pytest.raises(WeightsUnavailable, match="local path"):
        load_vae_decoder(str(tmp_path / "no-such-vae"))
    with pytest.raises(WeightsUnavailable, match="--teacher-weights"):
        load_teacher("vit_small_patch14_dinov2.lvd142m", resolution=64, weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="timm has no model"):
        load_teacher("not_a_model_name", resolution=64)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", None)])
def test_encoders_run_the_teacher_in_its_own_precision(precision, dtype):
    """Encoders(teacher_precision=...) runs the teachers under that autocast while the VAE keeps the build's
    (none here), and restores the TF32 switches afterwards."""
    from pipeline.build import Encoders

    torch.manual_seed(0)
    vae, teacher = load_vae("tiny").module, load_teacher("tiny", resolution=32).module
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    enc = Encoders(vae, {"t": teacher}, flip=False, autocast=None, teacher_precision=precision).eval()
    lat, feats = enc(images)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        want = teacher(images).float().half()
    with torch.no_grad():
        want_lat = vae(images).float().half()
    assert torch.equal(feats["t"][:, 0], want) and torch.equal(lat[:, 0], want_lat)


def test_vae_decoder_refuses_nonfinite_output():
    """An infinite latent decodes to NaN, which uint8 would show as black: the decoder raises, naming the images."""
    from pipeline.encoders import NonFiniteOutput, load_vae_decoder

    decoder = load_vae_decoder("tiny").module
    z = torch.zeros(3, 4, 8, 8)
    assert decoder(z).dtype == torch.uint8
    z[1, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteOutput, match=r"images \[1\] of the batch of 3"):
        decoder(z)
