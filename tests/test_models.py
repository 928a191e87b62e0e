"""trainer.models: preset sizes against the papers, shapes, config checks, RoPE and upsampling maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tools.macs import PAPER, count_macs, measure
from trainer.models import (
    MODEL_PRESETS,
    apply_rope_2d,
    count_params,
    create_model,
    rope_2d_tables,
    sincos_pos_embed_2d,
    upsample_tokens,
)


def meta_forward(name: str, batch: int = 2, **overrides):
    """Build ``name`` on the meta device and run it; returns (model, velocity, projected, input)."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
        cfg = model.config
        x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        v, z = model(x, torch.rand(batch), torch.zeros(batch, dtype=torch.long))
    return model, v, z, x


def tiny_inputs(batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 32, 32, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, 1001, (batch,), generator=gen)  # 1000 is the null class
    return x, t, y


# ---- sizes against the papers -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PAPER))
def test_param_count_within_3_percent_of_paper(name):
    row = measure(name)
    assert row["params_m"] == pytest.approx(row["paper_params_m"], rel=0.03)


def test_paper_counts_sitdown_with_head_sit_without():
    with torch.device("meta"):
        xl = create_model("sitdown-xl")
    head = sum(p.numel() for p in xl.head.parameters())
    assert count_params(xl) - count_params(xl, include_head=False) == head
    assert measure("sitdown-xl")["head"] and not measure("sit-xl")["head"]


@pytest.mark.parametrize("name", ["sitdown-b", "sitdown-xl"])
def test_gmacs_within_5_percent_of_paper(name):
    row = measure(name)
    assert row["gmacs"] == pytest.approx(row["paper_gmacs"], rel=0.05)
    # without attention's QK^T and AV products (the paper's convention) the match is close
    assert row["gmacs_no_attn"] == pytest.approx(row["paper_gmacs"], rel=0.005)


def test_attention_macs_are_the_score_and_value_products():
    with torch.device("meta"):
        model = create_model("sitdown-b")
    _, attention = count_macs(model, input_size=32)
    width, (n1, n2, n3) = 768, model.config.blocks
    assert attention == 2 * width * ((n1 + n3) * 256**2 + n2 * 64**2)


# ---- shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_output_shapes(name):
    _, v, z, x = meta_forward(name)
    assert v.shape == x.shape
    assert z.shape == (2, 256, 768)


@pytest.mark.parametrize(("overrides", "head_shape"), [
    (dict(input_size=64, teacher_dim=1024, teacher_grid=32), (2, 1024, 1024)),  # 512 px, 32x32 teacher
    (dict(teacher_dim=384), (2, 256, 384)),
    (dict(teacher_grid=8), (2, 64, 768)),  # a teacher on the middle grid: no upsampling
])
def test_other_teachers(overrides, head_shape):
    _, v, z, x = meta_forward("sitdown-xl", **overrides)
    assert v.shape == x.shape
    assert z.shape == head_shape


def test_no_alignment_head():
    model, v, z, x = meta_forward("sit-b", teacher_dim=0)
    assert model.head is None and z is None and v.shape == x.shape


# ---- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "block"), [
    ("sitdown-b", 8), ("sitdown-l", 16), ("sitdown-xl", 18), ("tiny", 3),
    ("sit-b", 8), ("sit-l", 8), ("sit-xl", 8),
])
def test_default_align_block(name, block):
    with torch.device("meta"):
        model = create_model(name)
    assert model.config.align_block == block
    assert MODEL_PRESETS[name].align_block is None


def test_align_block_on_the_outer_grid_upsamples_nothing():
    with torch.device("meta"):
        model = create_model("sitdown-xl", align_block=10)
    assert model.config.align_grid == 16 and model.head.factor == 1
    with torch.device("meta"):
        model = create_model("sitdown-xl", align_block=11)
    assert model.config.align_grid == 8 and model.head.factor == 2


@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("sitdown-xxl", {}, "unknown model"),
    ("sitdown-xl", dict(depth=3), "unknown ModelConfig field"),
    ("sitdown-xl", dict(teacher_grid=12), "teacher_grid 12"),
    ("sitdown-xl", dict(teacher_grid=4), "teacher_grid 4"),
    ("sitdown-xl", dict(align_block=0), "align_block"),
    ("sitdown-xl", dict(align_block=37), "align_block"),
    ("sit-b", dict(align_block=13), "align_block"),
    ("sitdown-xl", dict(input_size=30), "divisible by 2 \\* patch_size"),
    ("sitdown-xl", dict(blocks=(10, 16, 9)), "n1"),
    ("sit-b", dict(blocks=(4, 4, 4)), "depth"),
    ("sitdown-xl", dict(heads=7), "not divisible by heads"),
    ("tiny", dict(width=72, heads=4), "divisible by 4"),  # head dim 18
    ("tiny", dict(mlp="relu"), "mlp"),
    ("tiny", dict(upsample="bicubic"), "upsample"),
    ("tiny", dict(kind="unet"), "kind"),
])
def test_bad_configs_raise(name, overrides, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        create_model(name, **overrides)


def test_config_fields_accept_lists_and_other_heads():
    with torch.device("meta"):
        model = create_model("tiny", blocks=[1, 3, 1], heads=8)  # head dim 8: RoPE needs a multiple of 4
    assert model.config.blocks == (1, 3, 1) and model.config.align_block == 3


# ---- the tiny model on CPU ------------------------------------------------------------------------

def test_tiny_zero_init_forward_backward():
    torch.manual_seed(0)
    model = create_model("tiny")
    x, t, y = tiny_inputs()
    v, z = model(x, t, y)
    assert v.shape == x.shape and z.shape == (8, 256, 768)
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-Zero and a zero final layer
    assert z.abs().sum() > 0
    target = torch.randn_like(z)
    loss = F.mse_loss(v, torch.randn_like(v)) - F.cosine_similarity(z, target, dim=-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["final_layer.linear.weight"].abs().sum() > 0
    # the alignment loss reaches the layers below the align block; zero gates stop it at attention/MLP
    assert grads["down.conv.weight"].abs().sum() > 0
    assert grads["stage1.0.adaLN_modulation.1.weight"].abs().sum() > 0
    assert grads["stage1.0.attn.qkv.weight"].abs().sum() == 0


def test_tiny_trained_step_gives_finite_nonzero_velocity_and_uses_labels():
    torch.manual_seed(0)
    model = create_model("tiny", teacher_dim=0)
    for p in model.parameters():  # leave the zero initialisation so that every path is live
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = tiny_inputs(batch=2)
    v, z = model(x, t, y)
    assert z is None and torch.isfinite(v).all() and v.abs().sum() > 0
    v_other, _ = model(x, t, (y + 1) % 1001)
    assert not torch.allclose(v, v_other)


def test_tiny_under_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("tiny")
    x, t, y = tiny_inputs(batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, z = model(x, t, y)
    assert v.shape == x.shape and z.shape == (2, 256, 768)
    assert torch.isfinite(z.float()).all()


def test_sit_tiny_variant_runs():
    model = create_model("tiny", kind="sit", blocks=(3,), align_block=2, mlp="gelu", rope=False)
    x, t, y = tiny_inputs(batch=2)
    v, z = model(x, t, y)
    assert v.shape == x.shape and z.shape == (2, 256, 768)


# ---- RoPE -----------------------------------------------------------------------------------------

def test_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    head_dim = 16
    q = torch.randn(head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(head_dim, generator=gen, dtype=torch.float64)

    def score(pos_q: tuple[float, float], pos_k: tuple[float, float]) -> torch.Tensor:
        rows = torch.tensor([pos_q[0], pos_k[0]], dtype=torch.float64)
        cols = torch.tensor([pos_q[1], pos_k[1]], dtype=torch.float64)
        cos, sin = rope_2d_tables(rows, cols, head_dim)
        rotated = apply_rope_2d(torch.stack([q, k]), cos, sin)
        return rotated[0] @ rotated[1]

    base = score((2.0, 5.0), (7.0, 1.0))
    for shift in [(1.0, 0.0), (0.0, 3.0), (-4.0, 9.0), (10.5, -2.25)]:
        shifted = score((2.0 + shift[0], 5.0 + shift[1]), (7.0 + shift[0], 1.0 + shift[1]))
        torch.testing.assert_close(shifted, base, rtol=0, atol=1e-12)
    assert not torch.isclose(score((2.0, 5.0), (7.0, 2.0)), base)  # the column offset matters
    assert not torch.isclose(score((3.0, 5.0), (7.0, 1.0)), base)  # and so does the row offset


def test_rope_is_a_rotation_and_identity_at_origin():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    rows, cols = torch.arange(5.0, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64) * 2
    cos, sin = rope_2d_tables(rows, cols, 16)
    rotated = apply_rope_2d(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[:, 0], x[:, 0])
    assert rotated.dtype == x.dtype


def test_rope_row_half_and_column_half():
    """A row shift rotates only head dims [0, D/2), a column shift only [D/2, D)."""
    x = torch.randn(1, 16, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    by_row = apply_rope_2d(x, *rope_2d_tables(one, zero, 16))
    by_col = apply_rope_2d(x, *rope_2d_tables(zero, one, 16))
    torch.testing.assert_close(by_row[:, 8:], x[:, 8:])
    torch.testing.assert_close(by_col[:, :8], x[:, :8])
    assert not torch.allclose(by_row[:, :8], x[:, :8]) and not torch.allclose(by_col[:, 8:], x[:, 8:])


def test_sincos_pos_embed_matches_repa():
    """REPA/MAE's numpy recipe: meshgrid(w, h) puts the column in the first half."""
    dim, grid = 32, 5
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    expected = np.concatenate([embed(grid_w), embed(grid_h)], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, grid).numpy(), expected, rtol=0, atol=1e-6)


# ---- upsampling tokens to the teacher grid --------------------------------------------------------

def bilinear_reference(image: np.ndarray, factor: int) -> np.ndarray:
    """(g, g, D) -> (g*f, g*f, D): half-pixel centres, source coordinates clamped to the edges."""
    grid = image.shape[0]
    src = np.clip((np.arange(grid * factor) + 0.5) / factor - 0.5, 0, grid - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, grid - 1)
    w = src - low
    rows = image[low] * (1 - w)[:, None, None] + image[high] * w[:, None, None]
    return rows[:, low] * (1 - w)[None, :, None] + rows[:, high] * w[None, :, None]


def grid_tokens(grid: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Random (1, grid*grid, dim) float64 tokens and the same values as a (grid, grid, dim) image."""
    image = np.random.default_rng(seed).standard_normal((grid, grid, dim))
    return torch.from_numpy(image.reshape(1, grid * grid, dim).copy()), image


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_upsample_nearest_repeats_each_token(factor):
    tokens, image = grid_tokens(8, 3)
    out = upsample_tokens(tokens, factor, "nearest")
    expected = image.repeat(factor, axis=0).repeat(factor, axis=1).reshape(1, -1, 3)
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_upsample_bilinear_matches_reference(factor):
    tokens, image = grid_tokens(8, 5, seed=factor)
    out = upsample_tokens(tokens, factor, "bilinear")
    expected = bilinear_reference(image, factor).reshape(1, -1, 5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_upsample_rejects_unknown_mode():
    with pytest.raises(ValueError, match="bicubic"):
        upsample_tokens(torch.zeros(1, 4, 2), 2, "bicubic")


def test_upsample_token_order_is_row_major():
    """Token row*g + col holds (row, col); upsampled token R*G + C holds the source of (R, C)."""
    grid, factor = 4, 2
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    tokens = torch.tensor(np.stack([rows, cols], -1).reshape(1, grid * grid, 2), dtype=torch.float64)
    out = upsample_tokens(tokens, factor, "nearest")[0].numpy()
    for index, (row, col) in enumerate(out):
        assert (row, col) == (index // (grid * factor) // factor, index % (grid * factor) // factor)


def test_head_projects_then_upsamples():
    """The head equals the projector applied per token, then ``upsample_tokens``."""
    torch.manual_seed(0)
    model = create_model("tiny").double()
    features = torch.randn(2, 64, 64, dtype=torch.float64)
    expected = upsample_tokens(model.head.projector(features), 2, "bilinear")
    torch.testing.assert_close(model.head(features), expected)
    assert math.isqrt(expected.shape[1]) == 16


def test_down_up_convolutions_are_u_dits_bias_free_ones():
    """Down: Conv3x3(C -> C/4, bias=False) -> PixelUnshuffle(2); up: Conv3x3(C -> 4C, bias=False) -> PixelShuffle(2),
    checked against torch.nn's own modules in float64; resample_bias=True (older runs) adds 4.25 C parameters."""
    torch.manual_seed(0)
    model = create_model("tiny").double()
    width, grid = model.config.width, model.config.grid
    assert model.down.conv.bias is None and model.up.conv.bias is None and not model.config.resample_bias
    names = {n for n, _ in model.named_parameters()}
    assert "down.conv.bias" not in names and "up.conv.bias" not in names
    x = torch.randn(2, grid * grid, width, dtype=torch.float64)
    image = x.transpose(1, 2).reshape(2, width, grid, grid)
    down = torch.nn.Sequential(torch.nn.Conv2d(width, width // 4, 3, padding=1, bias=False), torch.nn.PixelUnshuffle(2))
    down = down.double()
    down[0].weight.data.copy_(model.down.conv.weight)
    ref = down(image).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.down(x), ref, rtol=0, atol=1e-12)
    h = torch.randn(2, (grid // 2) ** 2, width, dtype=torch.float64)
    up = torch.nn.Sequential(torch.nn.Conv2d(width, 4 * width, 3, padding=1, bias=False), torch.nn.PixelShuffle(2))
    up = up.double()
    up[0].weight.data.copy_(model.up.conv.weight)
    ref = up(h.transpose(1, 2).reshape(2, width, grid // 2, grid // 2)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.up(h), ref, rtol=0, atol=1e-12)
    old = create_model("tiny", resample_bias=True)
    assert count_params(old) - count_params(model) == width // 4 + 4 * width
    assert torch.equal(old.down.conv.bias, torch.zeros(width // 4))  # zero-initialised as before
