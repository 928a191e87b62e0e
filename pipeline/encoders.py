"""The two encoders of the build: SD-VAE posterior moments and teacher (DINOv2 or any timm ViT) patch
tokens; and the VAE's decoder for sampling (``load_vae_decoder``, same specs as ``load_vae``).

Specs (``--vae`` / ``--teacher``):
- a HF hub id or local folder for the VAE (``AutoencoderKL.from_pretrained``), a timm model name
  for the teacher (with ``--teacher-weights FILE`` for a local weight file);
- ``random:<id or name>``: the same architecture with seeded random weights (for benchmarks);
- ``tiny``: a small configuration of the same classes with seeded random weights (tests, demo):
  VAE = AutoencoderKL with block_out_channels (16, 32, 32, 32), one layer per block, 4 latent
  channels (still 8x down); teacher = timm DINOv2 ViT with patch 14, width 96, depth 2, 3 heads;
- ``tiny:<timm name>`` (teachers only): that architecture (patch size, prefix and register tokens,
  mean/std) at width 96, depth 2, 3 heads, seeded random weights; stored as ``tiny-<timm name>``.
Random weights are for plumbing and speed only; the manifest records ``random_weights: true``.

Teachers follow one contract, ``docs/teachers.md``: a timm ``VisionTransformer`` with an absolute
position table; grid = resolution / 16 tokens per side (the student's outer grid), input = grid * patch
px; the model's own mean/std (ImageNet's for DINOv2); output = patch tokens after the final norm with
class and register tokens removed. :func:`check_teacher_architecture` refuses the rest.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_TEACHER = "vit_base_patch14_dinov2.lvd142m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The SD-VAE architecture (stabilityai/sd-vae-ft-ema and ft-mse share it), for `random:` specs,
# which cannot download a config.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", sample_size=256, scaling_factor=0.18215,
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    SD_VAE_CONFIG, layers_per_block=1, norm_num_groups=8, block_out_channels=(16, 32, 32, 32),
)
TINY_TEACHER = ("vit_small_patch14_dinov2", dict(embed_dim=96, depth=2, num_heads=3))

MISSING_WEIGHTS_HELP = (
    "Weights cannot be fetched from this machine. Either download them elsewhere and pass a local "
    "path ({how}), or point HF_HOME / HF_HUB_CACHE at a cache that holds them; use `tiny` (or "
    "`random:<name>`) for random-weight runs that test plumbing and speed only."
)


class WeightsUnavailable(RuntimeError):
    """Real encoder weights could not be loaded; the message says how to supply them."""


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# VAE


def posterior_moments(moments: torch.Tensor) -> torch.Tensor:
    """Mean and std of the diagonal Gaussian posterior from the encoder's (mean, logvar) output.

    As diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20], std = exp(logvar/2).
    Returns (B, 2C, h, w): mean channels first, then std.
    """
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return torch.cat([mean, std], dim=1)


def vae_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class VaeMoments(nn.Module):
    """uint8 images (B, H, W, 3) -> posterior mean and std (B, 8, H/8, W/8)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = vae_input(images).to(self.encoder.conv_in.weight.dtype)
        return posterior_moments(self.quant_conv(self.encoder(x)))


@dataclass
class LoadedEncoder:
    module: nn.Module
    info: dict[str, Any]


def _autoencoder_kl(spec: str, seed: int) -> tuple[nn.Module, bool]:
    """The AutoencoderKL of a spec (see module docstring) in eval mode without gradients, and whether
    its weights are random (``tiny`` / ``random:<id>``, seeded with ``seed``)."""
    from diffusers import AutoencoderKL

    random_weights = spec == "tiny" or spec.startswith("random:")
    if random_weights:
        config = TINY_VAE_CONFIG if spec == "tiny" else SD_VAE_CONFIG
        if spec.startswith("random:") and spec[7:] not in ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse", "sd-vae"):
            raise ValueError(f"--vae {spec}: random weights are offered for the SD-VAE architecture only "
                             "(random:stabilityai/sd-vae-ft-ema)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**config)
    else:
        try:
            vae = AutoencoderKL.from_pretrained(spec)
        except Exception as e:  # OSError, EnvironmentError, HF hub errors, missing files
            raise WeightsUnavailable(
                f"could not load the VAE {spec!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                + MISSING_WEIGHTS_HELP.format(
                    how="`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`, then --vae DIR")
            ) from None
    vae.eval().requires_grad_(False)
    return vae, random_weights


def _vae_info(spec: str, vae: nn.Module, random_weights: bool, seed: int) -> dict[str, Any]:
    """What identifies a VAE: spec, config, sha256 of the whole AutoencoderKL, random-weights flag."""
    return {
        "spec": spec,
        "class": "diffusers.AutoencoderKL",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items()
                   if not k.startswith("_")},
        "weights_sha256": weights_sha256(vae),
        "random_weights": random_weights,
        "seed": seed if random_weights else None,
    }


def load_vae(spec: str, *, seed: int = 0) -> LoadedEncoder:
    """An AutoencoderKL from a spec (see module docstring), wrapped as :class:`VaeMoments`."""
    vae, random_weights = _autoencoder_kl(spec, seed)
    info = {
        **_vae_info(spec, vae, random_weights, seed),
        "moments": "channels 0-3 posterior mean, 4-7 posterior std (exp(logvar/2), logvar clamped to [-30, 20])",
        "input": "RGB scaled to [-1, 1]",
    }
    return LoadedEncoder(VaeMoments(vae), info)


#: How decoder output in [-1, 1] becomes uint8 (``--quantize`` of tools.sample).
QUANTIZE_MODES = ("truncate", "round")


def vae_output(x: torch.Tensor, *, quantize: str = "truncate") -> torch.Tensor:
    """Decoder output (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3).

    ``truncate`` (REPA's generate.py, the default): clamp(255 (x + 1) / 2, 0, 255) truncated to uint8,
    i.e. floor(127.5 (x + 1)); x = 0 gives 127.
    ``round`` (DiT's sample_ddp.py): clamp(127.5 x + 128, 0, 255) truncated, i.e. 127.5 (x + 1)
    rounded half up; x = 0 gives 128. The two differ by at most one level.
    """
    x = x.float()
    if quantize == "truncate":
        y = torch.clamp(255.0 * ((x + 1.0) / 2.0), 0, 255)
    elif quantize == "round":
        y = torch.clamp(127.5 * x + 128.0, 0, 255)
    else:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


_QUANTIZE_TEXT = {
    "truncate": "clamp(255 (x + 1) / 2, 0, 255) truncated (REPA generate.py)",
    "round": "clamp(127.5 x + 128, 0, 255) truncated = rounded half up (DiT sample_ddp.py)",
}


class NonFiniteOutput(ValueError):
    """A network's output holds NaN or infinite values (it would become black or garbage uint8 pixels)."""


class VaeDecoder(nn.Module):
    """Latents z (B, C, h, w) in the VAE's own latent space (not scaled) -> uint8 images (B, 8h, 8w, 3);
    a decoded image holding NaN or infinity is a :class:`NonFiniteOutput` (uint8 would hide it)."""

    def __init__(self, vae: nn.Module, *, quantize: str = "truncate") -> None:
        super().__init__()
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        self.vae = vae
        self.quantize = quantize

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.vae.decoder.conv_in.weight.dtype
        x = self.vae.decode(z.to(dtype)).sample
        if not bool(torch.isfinite(x).all()):
            bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(x).flatten(1).all(1)).flatten()})
            raise NonFiniteOutput(f"the VAE decoder's output holds NaN or infinite values (images {bad[:5]} of the "
                                  f"batch of {len(x)})")
        return vae_output(x, quantize=self.quantize)


def load_vae_decoder(spec: str, *, seed: int = 0, quantize: str = "truncate") -> LoadedEncoder:
    """The decoder of the AutoencoderKL of a spec (as :func:`load_vae`), wrapped as :class:`VaeDecoder`
    with the uint8 conversion ``quantize`` (see :func:`vae_output`).

    ``info["weights_sha256"]`` is over the whole AutoencoderKL, the number :func:`load_vae` records in
    a cache manifest, so a sampler can check that it decodes with the VAE the latents came from.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    vae, random_weights = _autoencoder_kl(spec, seed)
    info = {
        **_vae_info(spec, vae, random_weights, seed),
        "quantize": quantize,
        "output": f"uint8 RGB (B, H, W, 3) = {_QUANTIZE_TEXT[quantize]}, x = vae.decode(z).sample",
    }
    return LoadedEncoder(VaeDecoder(vae, quantize=quantize), info)


# ------------------------------------------------------------------------------------------
# Teacher


#: Tokens per side of every teacher at 256 px: SiT-down's outer grid (8x-down latents, patch 2).
GRID_AT_256 = 16


def teacher_grid(resolution: int) -> int:
    """Teacher tokens per side for images of ``resolution`` px: 16 per 256 px (the student's outer
    grid, resolution / 16), rounded to the nearest integer."""
    return round(resolution * GRID_AT_256 / 256)


def teacher_input_size(resolution: int, patch_size: int = 14) -> int:
    """Teacher input side for an image of ``resolution`` px: ``patch_size * teacher_grid(resolution)``.
    For DINOv2 (patch 14) this is REPA's 224 at 256 px, 448 at 512; patch 16 gives 256 at 256 px."""
    return patch_size * teacher_grid(resolution)


def teacher_input(images: torch.Tensor, size: int, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                  std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, size, size) as REPA: /255, (x - mean) / std (ImageNet's by
    default, a teacher's own from its pretrained config), bicubic resize."""
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x


#: How the teacher's position table is brought to the token grid (``--pos-embed`` of pipeline.build).
POS_EMBED_MODES = ("repa", "dinov2")


def _split_table(pos_embed: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(prefix entries, patch grid (1, D, M, M) in float32, M) of a (1, P + M*M, D) position table."""
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    m = int(math.isqrt(patch.shape[1]))
    if m * m != patch.shape[1]:
        raise ValueError(f"position table of {patch.shape[1]} entries is not square")
    return prefix, patch.float().reshape(1, m, m, patch.shape[-1]).permute(0, 3, 1, 2), m


def _join_table(prefix: torch.Tensor, grid_table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    dim, h, w = grid_table.shape[1:]
    return torch.cat([prefix, grid_table.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(dtype)], dim=1)


def repa_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int) -> torch.Tensor:
    """Resample a (1, P + M*M, D) position table to grid x grid as REPA's utils.py ``load_encoders`` does once,
    with timm's ``resample_abs_pos_embed`` defaults: bicubic to the target size (not a scale factor),
    ``antialias=True``, ``align_corners=False``, in float32; the P prefix entries kept. DINOv2 then uses
    the table as it is."""
    prefix, x, m = _split_table(pos_embed, num_prefix)
    if m == grid:
        return pos_embed
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return _join_table(prefix, x, pos_embed.dtype)


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int, *, offset: float = 0.1) -> torch.Tensor:
    """Resample a (1, P + M*M, D) position table to a grid x grid one as DINOv2's own
    ``interpolate_pos_encoding`` does at run time (bicubic, scale factor (grid + 0.1) / M, no antialiasing);
    the P prefix entries are kept."""
    prefix, x, m = _split_table(pos_embed, num_prefix)
    if m == grid:
        return pos_embed
    scale = (grid + offset) / m
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if x.shape[-2:] != (grid, grid):
        raise ValueError(f"resampled position grid is {tuple(x.shape[-2:])}, expected {grid}x{grid}")
    return _join_table(prefix, x, pos_embed.dtype)


_POS_EMBED = {"repa": repa_pos_embed, "dinov2": dinov2_pos_embed}
_POS_EMBED_TEXT = {
    "repa": "resampled once as REPA (timm resample_abs_pos_embed: bicubic to the grid, antialias)",
    "dinov2": "resampled as DINOv2 at run time (bicubic, scale (grid+0.1)/M, no antialias)",
}


class TeacherTokens(nn.Module):
    """uint8 images (B, H, W, 3) -> patch tokens after the final norm (B, T, D), the ``num_prefix``
    class and register tokens removed."""

    def __init__(self, vit: nn.Module, size: int, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.vit = vit
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = teacher_input(images, self.size, mean=self.mean, std=self.std).to(self.vit.patch_embed.proj.weight.dtype)
        tokens = self.vit.forward_features(x)
        return tokens[:, self.num_prefix:]


TINY_PREFIX = "tiny:"


def teacher_name(spec: str) -> str:
    """The name a teacher's features are stored under: its timm name for real and ``random:`` specs;
    ``tiny`` stays ``tiny``; ``tiny:<name>`` becomes ``tiny-<name>`` (no ':' in a file name)."""
    if spec.startswith("random:"):
        return spec[len("random:"):]
    if spec.startswith(TINY_PREFIX):
        return "tiny-" + spec[len(TINY_PREFIX):]
    return spec


def _architecture(spec: str) -> tuple[str, dict[str, Any]]:
    """(timm name, create_model kwargs) of a teacher spec (see module docstring)."""
    if spec == "tiny":
        return TINY_TEACHER
    if spec.startswith(TINY_PREFIX):
        return spec[len(TINY_PREFIX):], dict(TINY_TEACHER[1])
    return teacher_name(spec), {}


def check_teacher_architecture(vit: nn.Module, spec: str) -> None:
    """Refuse, with a message that says why, a model outside the teacher contract (see ``docs/teachers.md``):
    it must be timm's ``VisionTransformer`` (or a subclass) with a plain square patch embedding and an
    absolute position table over a square patch grid, which :func:`load_teacher` resamples."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    kind = type(vit).__name__
    if not isinstance(vit, VisionTransformer):
        rope = " (it encodes positions with RoPE)" if kind == "Eva" or getattr(vit, "rope", None) is not None else ""
        raise ValueError(
            f"--teacher {spec}: {kind} is not timm's VisionTransformer{rope}. A teacher must be a timm "
            "VisionTransformer with an absolute position table over a square patch grid (DINOv2, CLIP, SigLIP, "
            "MAE, DeiT and their register variants are); see docs/teachers.md")
    if not isinstance(vit.patch_embed, PatchEmbed):
        raise ValueError(f"--teacher {spec}: its patch embedding is a {type(vit.patch_embed).__name__} (a hybrid "
                         "CNN stem?), not a plain PatchEmbed; only plain ViT patch embeddings are supported")
    ph, pw = vit.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f"--teacher {spec}: patch size {ph}x{pw} is not square")
    if getattr(vit, "pos_embed", None) is None:
        raise ValueError(f"--teacher {spec}: {kind} has no absolute position table (pos_embed is None), so there "
                         "is nothing to resample to the token grid; choose a ViT with a learned or fixed pos_embed")
    gh, gw = vit.patch_embed.grid_size
    if gh != gw:
        raise ValueError(f"--teacher {spec}: its position table covers a non-square {gh}x{gw} grid")
    if getattr(vit, "dynamic_img_size", False):
        raise ValueError(f"--teacher {spec}: created with dynamic_img_size, which resamples the table at every "
                         "call; create it without, the build resamples the table once")


def teacher_normalization(name: str, pretrained_cfg: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a teacher's input is normalised with: its pretrained config's, except DINOv2 which keeps
    REPA's ImageNet mean/std (its config holds the same numbers)."""
    if "dinov2" in name:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise ValueError(f"teacher {name}: its pretrained config has no 3-channel mean/std ({mean}, {std})")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _create(name: str, kwargs: dict[str, Any], *, spec: str, random_weights: bool, weights: str | None,
            seed: int) -> nn.Module:
    import timm

    try:
        with torch.device("meta"):  # the architecture first, at no cost: refuse before any download
            probe = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"--teacher {spec}: timm has no model {name!r}") from None
        probe = None  # a model that cannot be built on the meta device is checked once it is built
    except Exception:
        probe = None
    if probe is not None:
        check_teacher_architecture(probe, spec)
    del probe
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if random_weights:
                return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            if weights:
                return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=weights))
            return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # hub/network errors, missing local file, a checkpoint that does not fit
        raise WeightsUnavailable(
            f"could not load the teacher {spec!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            + MISSING_WEIGHTS_HELP.format(how="--teacher-weights FILE with the timm .safetensors/.bin of that model")
        ) from None


def load_teacher(spec: str, *, resolution: int, weights: str | None = None, seed: int = 0,
                 pos_embed: str = "repa") -> LoadedEncoder:
    """A timm ViT teacher under the contract of ``docs/teachers.md``: input ``patch * resolution / 16`` px
    (:func:`teacher_input_size`), so its grid is the student's outer grid (16 x 16 at 256 px); the position
    table resampled to that grid by ``pos_embed`` (:data:`POS_EMBED_MODES`); the model's own mean/std
    (ImageNet's for DINOv2); output the patch tokens after the final norm, class and register tokens removed.
    Models outside the contract are refused (:func:`check_teacher_architecture`)."""
    if pos_embed not in POS_EMBED_MODES:
        raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBED_MODES)}, got {pos_embed!r}")
    random_weights = spec == "tiny" or spec.startswith(("random:", TINY_PREFIX))
    name, kwargs = _architecture(spec)
    vit = _create(name, kwargs, spec=spec, random_weights=random_weights, weights=weights, seed=seed)
    check_teacher_architecture(vit, spec)
    patch = vit.patch_embed.patch_size[0]
    grid = teacher_grid(resolution)
    if grid < 1:
        raise ValueError(f"resolution {resolution} px gives no teacher tokens")
    size = grid * patch
    pretrained_size = tuple(vit.pretrained_cfg.get("input_size", (3, *vit.patch_embed.img_size)))[-2:]
    mean, std = teacher_normalization(name, vit.pretrained_cfg)
    num_pos_prefix = vit.pos_embed.shape[1] - vit.patch_embed.num_patches
    original = vit.pos_embed.detach().clone()
    vit.set_input_size(img_size=(size, size))
    vit.pos_embed = nn.Parameter(_POS_EMBED[pos_embed](original, grid, num_pos_prefix))
    vit.eval().requires_grad_(False)
    module = TeacherTokens(vit, size, mean=mean, std=std)
    num_registers = int(getattr(vit, "num_reg_tokens", 0))
    info = {
        "spec": spec,
        "timm_name": name,
        "timm_kwargs": kwargs,
        "architecture": f"timm.{type(vit).__module__.rsplit('.', 1)[-1]}.{type(vit).__name__}",
        "weights_file": weights,
        "weights_sha256": weights_sha256(vit),
        "random_weights": random_weights,
        "seed": seed if random_weights else None,
        "input_size": size,
        "input_size_rule": f"patch_size * resolution / 16 = {patch} * {grid} (the student's outer grid)",
        "pretrained_input_size": [int(v) for v in pretrained_size],
        "patch_size": patch,
        "grid": grid,
        "tokens": grid * grid,
        "dim": int(vit.embed_dim),
        "num_prefix_tokens": module.num_prefix,
        "num_register_tokens": num_registers,
        "num_class_tokens": module.num_prefix - num_registers,
        "mean": list(mean),
        "std": list(std),
        "pos_embed": pos_embed,
        "pos_embed_source_grid": int(math.isqrt(original.shape[1] - num_pos_prefix)),
        "output": "patch tokens after the final norm (x_norm_patchtokens), class and register tokens removed",
        "preprocess": f"RGB/255, (x - mean) / std with mean {list(mean)} std {list(std)}"
                      f"{' (ImageNet)' if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) else ' (the model config)'}, "
                      f"bicubic resize to {size}, position table {_POS_EMBED_TEXT[pos_embed]}",
    }
    return LoadedEncoder(module, info)
