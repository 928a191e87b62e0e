"""SiT-down (a transformer U-Net) and REPA's isotropic SiT, each with a U-REPA alignment head.

Usage::

    from trainer.models import create_model, count_params
    model = create_model("sitdown-xl")                      # a preset from MODEL_PRESETS
    model = create_model("tiny", teacher_dim=96)            # overrides are ModelConfig fields
    with torch.device("meta"):                              # shapes and counts without memory
        big = create_model("sitdown-xl")
    velocity, projected = model(x, t, y)

``forward(x, t, y)`` takes latents ``x`` (B, in_channels, H, W), times ``t`` (B,) in [0, 1] fed to
the sinusoidal embedding as they are (REPA's convention, no x1000), and labels ``y`` (B,) in
[0, num_classes], where ``num_classes`` is the null label for classifier-free guidance: class
dropout is the trainer's job. It returns the velocity (B, in_channels, H, W) and the projected
alignment tokens (B, teacher_grid**2, teacher_dim) in row-major order (token = row * grid + col,
the teacher's patch order), or None when ``teacher_dim == 0``.

Blocks (both kinds) are DiT/SiT blocks: adaLN-Zero on c = t_emb + y_emb (SiLU -> Linear(C, 6C),
zero-initialised), LayerNorm without affine (eps 1e-6), attention with a biased qkv Linear and
``F.scaled_dot_product_attention``. The MLP is SwiGLU as three biased Linear layers (gate, up,
down) with hidden int(2/3 * 4C) rounded up to a multiple of 256 (LLaMA's rule: 2048 / 2816 / 3072
for B / L / XL; the rounding only changes L, from 2730, and is what brings L to the paper's GMACs),
or REPA's GELU(tanh) MLP with ratio 4. Biases follow DiT's Linear layers; they add 0.03% and
do not decide the match. Position comes from
exactly one source: 2D axial RoPE in every attention (``rope=True``; head dims [0, D/2) rotate
with the row, [D/2, D) with the column, each half in rotate-half pairing, base 10000, on the grid
of the block's stage), or, with ``rope=False``, REPA's fixed 2D sin-cos embedding added after the
patch embedding.

SiT-down (``kind="sitdown"``, blocks (n1, n2, n3) with n3 == n1). The paper names the parts but
not the down/up/skip operators; these follow the recipe's counted stand-in (U-DiT, the same
first author, uses the same operators), which matches the paper's GMACs:

- patch embedding: Conv2d(in_channels, C, p, stride p); 16 x 16 tokens at 256 px;
- stage 1: n1 blocks on the G x G grid, each block's output kept as a long skip;
- down: tokens -> (B, C, G, G) -> Conv3x3(C -> C/4, no bias) -> pixel_unshuffle(2) -> (B, C, G/2, G/2);
- stage 2: n2 blocks on the G/2 x G/2 grid (8 x 8 = 64 tokens at 256 px);
- up: Conv3x3(C -> 4C, no bias) -> pixel_shuffle(2) -> (B, C, G, G);
- stage 3: before its i-th block, x = Linear(2C -> C)(cat(x, skip)), the skips taken from
  stage 1 in reverse order (U-ViT's long skips);
- final layer: DiT's (LayerNorm, adaLN shift/scale, Linear(C, p*p*in_channels)), unpatchify.
  The output is a velocity with in_channels channels (no learned sigma).

The down/up convolutions are U-DiT's (``Downsample``/``Upsample`` in its models: ``nn.Conv2d(dim, dim // 4, 3,
padding=1, bias=False)`` then ``nn.PixelUnshuffle(2)``, and ``bias=False`` before ``nn.PixelShuffle(2)``),
the one operation U-REPA's author says SiT-down shares with U-DiT. ``resample_bias=True`` gives them a bias,
as this code did before: runs trained so (their records lack the field) load with it (see
:func:`trainer.run.legacy_model_fields`).

Isotropic SiT (``kind="sit"``, blocks (depth,)): REPA's models/sit.py SiT-B/2, L/2, XL/2, with
GELU MLPs and the fixed sin-cos embedding, no RoPE.

Alignment head (``teacher_dim > 0``): the tokens after ``align_block`` blocks (1-based, counted
across the whole network) go through REPA's per-token projector Linear(C, 2048) - SiLU -
Linear(2048, 2048) - SiLU - Linear(2048, teacher_dim), THEN are upsampled on their grid by the
integer factor teacher_grid / grid (U-REPA's MLP-then-upsample; bilinear with half-pixel centres
or nearest, see ``upsample_tokens``). Default ``align_block``: SiT-down n1 + ceil(n2 / 2), the
middle of the middle stage (XL: 18 of 36, the paper's best); isotropic SiT 8 (REPA's
``encoder_depth``).

Initialisation follows DiT/SiT: xavier-uniform Linear weights with zero biases, the patch
embedding and the down/up convolutions initialised like Linear layers (xavier on the flattened
kernel, zero bias where there is one), normal(0.02) for the label table and the timestep MLP, zero adaLN and zero
final layer (so the initial velocity is exactly 0).

Precision: the residual stream keeps the input's dtype (the patch embedding, down/up and skip
fusion outputs are cast back to it), so under ``torch.autocast`` with float32 inputs the stream
stays float32 as in REPA's SiT, whose float32 position embedding has the same effect.

Sizes (``count_params``, ``python -m tools.macs``): the paper's SiT-down counts are closest when
they include the projector (XL 951.6M with it vs 943.4M without, paper 954.4M; L 684.2M vs
676.4M, paper 686.6M; B 198.0M vs 190.7M, paper 199.7M), while REPA's SiT counts exclude it
(674.8M for SiT-XL/2, paper 675M). The paper's GMACs (24.1 / 79.3 / 109.3) are matched to 0.1% by
everything but attention's QK^T and AV products, which add 1.0 / 2.5 / 3.2 GMACs.
The bias-free down/up convolutions hold 4.25 C fewer parameters than biased ones (XL: 4,896 of
951,559,440), below the 0.1M these figures show.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("sitdown", "sit")
MLPS = ("swiglu", "gelu")
UPSAMPLES = ("bilinear", "nearest")
ROPE_BASE = 10000.0
FREQUENCY_EMBEDDING_SIZE = 256
SWIGLU_MULTIPLE = 256


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a SiT-down or isotropic SiT with its alignment head; checked on creation."""

    kind: str = "sitdown"  # "sitdown" (3-stage U-Net) or "sit" (isotropic)
    width: int = 1152  # token width C, the same in every stage
    heads: int = 16  # attention heads
    blocks: tuple[int, ...] = (10, 16, 10)  # blocks per stage: (n1, n2, n1) sitdown, (depth,) sit
    patch_size: int = 2  # patch size on the latent
    in_channels: int = 4  # latent channels (also the velocity's)
    input_size: int = 32  # latent height and width
    num_classes: int = 1000  # label num_classes is the null class
    mlp: str = "swiglu"  # "swiglu" (hidden 2/3 * 4C, see swiglu_hidden) or "gelu" (tanh, hidden 4C)
    rope: bool = True  # 2D axial RoPE; False = fixed 2D sin-cos absolute embedding
    align_block: int | None = None  # 1-based block count before the alignment features; None = default
    projector_dim: int = 2048  # hidden width of the projector MLP
    teacher_dim: int = 768  # projected token width; 0 = no alignment head
    teacher_grid: int = 16  # teacher tokens per side
    upsample: str = "bilinear"  # "bilinear" or "nearest" token upsampling to the teacher grid
    resample_bias: bool = False  # SiT-down's down/up convolutions with a bias (U-DiT's have none; older runs did)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        _check(self)

    @property
    def depth(self) -> int:
        """Total number of transformer blocks."""
        return sum(self.blocks)

    @property
    def grid(self) -> int:
        """Tokens per side after the patch embedding."""
        return self.input_size // self.patch_size

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.heads

    @property
    def resolved_align_block(self) -> int:
        """``align_block``, or the kind's default when it is None."""
        if self.align_block is not None:
            return self.align_block
        if self.kind == "sitdown":
            return self.blocks[0] + math.ceil(self.blocks[1] / 2)
        return 8

    @property
    def align_grid(self) -> int:
        """Tokens per side of the features taken after ``resolved_align_block`` blocks."""
        if self.kind == "sitdown" and self.blocks[0] < self.resolved_align_block <= sum(self.blocks[:2]):
            return self.grid // 2
        return self.grid


def _check(cfg: ModelConfig) -> None:
    """Raise ValueError for a configuration the model cannot be built with."""

    def fail(message: str) -> None:
        raise ValueError(f"ModelConfig: {message}")

    if cfg.kind not in KINDS:
        fail(f"kind must be one of {KINDS}, got {cfg.kind!r}")
    if cfg.mlp not in MLPS:
        fail(f"mlp must be one of {MLPS}, got {cfg.mlp!r}")
    if cfg.upsample not in UPSAMPLES:
        fail(f"upsample must be one of {UPSAMPLES}, got {cfg.upsample!r}")
    positive = ("width", "heads", "patch_size", "in_channels", "input_size", "num_classes", "projector_dim",
                "teacher_grid")
    for name in positive:
        if getattr(cfg, name) < 1:
            fail(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.teacher_dim < 0:
        fail(f"teacher_dim must be >= 0 (0 = no alignment head), got {cfg.teacher_dim}")
    if any(n < 1 for n in cfg.blocks):
        fail(f"every stage needs >= 1 block, got blocks={cfg.blocks}")
    if cfg.kind == "sitdown":
        if len(cfg.blocks) != 3 or cfg.blocks[0] != cfg.blocks[2]:
            fail(f"sitdown needs blocks (n1, n2, n1) (one long skip per first-stage block), got {cfg.blocks}")
        if cfg.input_size % (2 * cfg.patch_size):
            fail(f"sitdown needs input_size divisible by 2 * patch_size = {2 * cfg.patch_size}, "
                 f"got {cfg.input_size}")
        if cfg.width % 4:
            fail(f"sitdown needs width divisible by 4 (conv to C/4 before pixel_unshuffle), got {cfg.width}")
    elif len(cfg.blocks) != 1:
        fail(f"sit needs blocks=(depth,), got {cfg.blocks}")
    if cfg.input_size % cfg.patch_size:
        fail(f"input_size {cfg.input_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.width % cfg.heads:
        fail(f"width {cfg.width} is not divisible by heads {cfg.heads}")
    if cfg.rope and cfg.head_dim % 4:
        fail(f"2D RoPE needs a head dim divisible by 4, got {cfg.width} / {cfg.heads} = {cfg.head_dim}")
    if not cfg.rope and cfg.width % 4:
        fail(f"the 2D sin-cos embedding needs width divisible by 4, got {cfg.width}")
    align = cfg.resolved_align_block
    if not 1 <= align <= cfg.depth:
        fail(f"align_block must be in [1, {cfg.depth}] (the model's depth), got {align}")
    if cfg.teacher_dim and (cfg.teacher_grid % cfg.align_grid or cfg.teacher_grid < cfg.align_grid):
        fail(f"teacher_grid {cfg.teacher_grid} (a {cfg.teacher_grid}x{cfg.teacher_grid} token grid) is not an integer multiple of the "
             f"{cfg.align_grid}x{cfg.align_grid} student grid after block {align}: projected tokens are upsampled by "
             f"an integer factor only. Use a cache whose teacher grid is a multiple of {cfg.align_grid} (pipeline.build "
             "gives every teacher resolution/16 tokens per side, twice the middle grid), or an align_block whose "
             f"grid divides {cfg.teacher_grid}")


MODEL_PRESETS: dict[str, ModelConfig] = {
    "sitdown-b": ModelConfig(width=768, heads=12, blocks=(5, 5, 5)),
    "sitdown-l": ModelConfig(width=1024, heads=16, blocks=(9, 14, 9)),
    "sitdown-xl": ModelConfig(width=1152, heads=16, blocks=(10, 16, 10)),
    "sit-b": ModelConfig(kind="sit", width=768, heads=12, blocks=(12,), mlp="gelu", rope=False),
    "sit-l": ModelConfig(kind="sit", width=1024, heads=16, blocks=(24,), mlp="gelu", rope=False),
    "sit-xl": ModelConfig(kind="sit", width=1152, heads=16, blocks=(28,), mlp="gelu", rope=False),
    "tiny": ModelConfig(width=64, heads=4, blocks=(2, 2, 2), projector_dim=256),
}


def create_model(name: str, **overrides: object) -> SiTDown | SiT:
    """Build preset ``name`` with ``overrides`` (ModelConfig fields) on the current default device.

    ``align_block`` is resolved in ``model.config`` (None becomes the kind's default).
    Raises ValueError for an unknown preset, an unknown field, or settings the model cannot take.
    """
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(MODEL_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; fields: {', '.join(sorted(fields))}")
    cfg = dataclasses.replace(MODEL_PRESETS[name], **overrides)
    cfg = dataclasses.replace(cfg, align_block=cfg.resolved_align_block)
    return SiTDown(cfg) if cfg.kind == "sitdown" else SiT(cfg)


def count_params(model: nn.Module, *, include_head: bool = True) -> int:
    """Number of parameters of ``model``; ``include_head=False`` leaves out the alignment head."""
    head = getattr(model, "head", None)
    skip = {id(p) for p in head.parameters()} if head is not None and not include_head else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# ----------------------------------------------------------------------------------------------
# Position and time encodings: pure functions.


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal embedding of ``t`` (N,): [cos(t * f_k), sin(t * f_k)], f_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """MAE/REPA fixed 2D sin-cos embedding (grid*grid, dim), row-major; first half encodes the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


def rope_2d_tables(rows: Tensor, cols: Tensor, head_dim: int,
                   base: float = ROPE_BASE) -> tuple[Tensor, Tensor]:
    """cos and sin tables (N, head_dim) of 2D axial RoPE at token positions ``rows``, ``cols`` (N,).

    Head dims [0, D/2) rotate with the row and [D/2, D) with the column; within each half, dim i
    pairs with dim i + D/4 (rotate-half) at frequency base^(-i / (D/4)).
    """
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)
    row_angles = rows.double()[:, None] * freqs
    col_angles = cols.double()[:, None] * freqs
    angles = torch.cat([row_angles, row_angles, col_angles, col_angles], dim=-1)
    return torch.cos(angles).to(rows.dtype), torch.sin(angles).to(rows.dtype)


def apply_rope_2d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., N, D) by the tables of ``rope_2d_tables``; computed in float32 (or wider)."""
    halves = x.unflatten(-1, (2, 2, -1))  # (..., axis, half, D/4)
    first, second = halves.unbind(-2)
    rotated = torch.stack([-second, first], dim=-2).flatten(-3)
    dtype = torch.promote_types(x.dtype, cos.dtype)
    return (x.to(dtype) * cos + rotated.to(dtype) * sin).to(x.dtype)


def grid_positions(grid: int) -> tuple[Tensor, Tensor]:
    """Row and column (float32, (grid*grid,)) of every token in row-major order."""
    index = torch.arange(grid * grid, dtype=torch.float32)
    return torch.div(index, grid, rounding_mode="floor"), index % grid


def tokens_to_image(x: Tensor, grid: int) -> Tensor:
    """Row-major tokens (B, grid*grid, C) -> (B, C, grid, grid)."""
    return x.transpose(1, 2).unflatten(2, (grid, grid))


def image_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> row-major tokens (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def upsample_tokens(tokens: Tensor, factor: int, mode: str) -> Tensor:
    """Upsample row-major tokens (B, g*g, D) to (B, (g*factor)**2, D) on their grid.

    ``mode`` is "nearest" (each token repeated factor x factor times) or "bilinear"
    (``F.interpolate`` with align_corners=False: half-pixel centres, edges clamped).
    """
    if mode not in UPSAMPLES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLES}, got {mode!r}")
    if factor == 1:
        return tokens
    image = tokens_to_image(tokens, math.isqrt(tokens.shape[1]))
    align_corners = False if mode == "bilinear" else None
    return image_to_tokens(F.interpolate(image, scale_factor=factor, mode=mode, align_corners=align_corners))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Layers.


class RoPE2D(nn.Module):
    """2D axial RoPE tables for one token grid, kept as non-persistent buffers."""

    def __init__(self, grid: int, head_dim: int) -> None:
        super().__init__()
        cos, sin = rope_2d_tables(*grid_positions(grid), head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return apply_rope_2d(x, self.cos, self.sin)


class Attention(nn.Module):
    """Multi-head self-attention with a biased qkv projection and optional 2D RoPE on q and k."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: RoPE2D | None) -> Tensor:
        batch, n, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, n, width))


def swiglu_hidden(width: int) -> int:
    """SwiGLU hidden width: int(2/3 * 4 * width) rounded up to a multiple of 256 (LLaMA's rule).

    B and XL are unaffected (2048, 3072); L gets 2816 instead of 2730, which brings its count to
    the paper's 79.3 GMACs and within 0.4% of its 686.6M parameters.
    """
    return SWIGLU_MULTIPLE * math.ceil(int(2 / 3 * 4 * width) / SWIGLU_MULTIPLE)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), three biased Linear layers, hidden ``swiglu_hidden(width)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hidden = swiglu_hidden(width)
        self.gate = nn.Linear(width, hidden)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMlp(nn.Module):
    """REPA/DiT MLP: fc2(gelu_tanh(fc1(x))), hidden 4 * width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """DiT/SiT block with adaLN-Zero conditioning."""

    def __init__(self, width: int, heads: int, mlp: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(width) if mlp == "swiglu" else GeluMlp(width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor, rope: RoPE2D | None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: 256-dim sinusoidal embedding -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, width), nn.SiLU(),
                                 nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).to(t.dtype))


class FinalLayer(nn.Module):
    """DiT's final layer: LayerNorm, adaLN shift/scale, Linear to p*p*channels per token."""

    def __init__(self, width: int, patch_size: int, channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class AlignHead(nn.Module):
    """REPA's projector MLP per token, then upsampling by ``factor`` to the teacher's grid."""

    def __init__(self, width: int, projector_dim: int, teacher_dim: int, factor: int, mode: str) -> None:
        super().__init__()
        self.factor = factor
        self.mode = mode
        self.projector = nn.Sequential(
            nn.Linear(width, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, teacher_dim),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return upsample_tokens(self.projector(tokens), self.factor, self.mode)


class Downsample(nn.Module):
    """Tokens (B, g*g, C) -> Conv3x3(C -> C/4, bias only if asked) -> pixel_unshuffle(2) -> tokens (B, g*g/4, C)."""

    def __init__(self, width: int, grid: int, *, bias: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(width, width // 4, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return image_to_tokens(F.pixel_unshuffle(self.conv(tokens_to_image(x, self.grid)), 2)).to(x.dtype)


class Upsample(nn.Module):
    """Tokens (B, g*g, C) -> Conv3x3(C -> 4C, bias only if asked) -> pixel_shuffle(2) -> tokens (B, 4*g*g, C)."""

    def __init__(self, width: int, grid: int, *, bias: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(width, 4 * width, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return image_to_tokens(F.pixel_shuffle(self.conv(tokens_to_image(x, self.grid)), 2)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Models.


class _Backbone(nn.Module):
    """Embeddings, final layer, alignment head and initialisation shared by SiT-down and SiT."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.align_block = config.resolved_align_block
        width = config.width
        self.x_embedder = nn.Conv2d(config.in_channels, width, config.patch_size, stride=config.patch_size)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = nn.Embedding(config.num_classes + 1, width)
        if not config.rope:
            self.register_buffer("pos_embed", sincos_pos_embed_2d(width, config.grid), persistent=False)
        self.final_layer = FinalLayer(width, config.patch_size, config.in_channels)
        self.head = None
        if config.teacher_dim:
            factor = config.teacher_grid // config.align_grid
            self.head = AlignHead(width, config.projector_dim, config.teacher_dim, factor, config.upsample)

    def initialize_weights(self) -> None:
        """DiT/SiT initialisation (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (Block, FinalLayer)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Patch tokens (B, grid*grid, C) in x's dtype, and the conditioning c = t_emb + y_emb (B, C)."""
        tokens = image_to_tokens(self.x_embedder(x)).to(x.dtype)
        if not self.config.rope:
            tokens = tokens + self.pos_embed.to(x.dtype)
        return tokens, self.t_embedder(t) + self.y_embedder(y)

    def output(self, x: Tensor, c: Tensor) -> Tensor:
        """Final layer and unpatchify: tokens (B, grid*grid, C) -> (B, in_channels, H, W)."""
        p, channels, grid = self.config.patch_size, self.config.in_channels, self.config.grid
        x = self.final_layer(x, c).reshape(x.shape[0], grid, grid, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid * p, grid * p)

    def project(self, features: Tensor | None) -> Tensor | None:
        """The alignment head on the features taken after ``align_block`` blocks, or None."""
        return None if self.head is None else self.head(features)


class SiTDown(_Backbone):
    """SiT-down: a 3-stage transformer U-Net (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        n1, n2, n3 = config.blocks
        width, heads, grid = config.width, config.heads, config.grid
        self.stage1 = nn.ModuleList(Block(width, heads, config.mlp) for _ in range(n1))
        self.down = Downsample(width, grid, bias=config.resample_bias)
        self.stage2 = nn.ModuleList(Block(width, heads, config.mlp) for _ in range(n2))
        self.up = Upsample(width, grid // 2, bias=config.resample_bias)
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(n3))
        self.stage3 = nn.ModuleList(Block(width, heads, config.mlp) for _ in range(n3))
        self.rope_outer = RoPE2D(grid, config.head_dim) if config.rope else None
        self.rope_inner = RoPE2D(grid // 2, config.head_dim) if config.rope else None
        self.initialize_weights()

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """Velocity (B, in_channels, H, W) and projected tokens (B, teacher_grid**2, teacher_dim) or None."""
        align = self.align_block
        h, c = self.embed(x, t, y)
        features, skips, count = None, [], 0
        for block in self.stage1:
            h = block(h, c, self.rope_outer)
            skips.append(h)
            count += 1
            features = h if count == align else features
        h = self.down(h)
        for block in self.stage2:
            h = block(h, c, self.rope_inner)
            count += 1
            features = h if count == align else features
        h = self.up(h)
        for block, fuse in zip(self.stage3, self.skip_fuse):
            h = fuse(torch.cat([h, skips.pop()], dim=-1)).to(x.dtype)
            h = block(h, c, self.rope_outer)
            count += 1
            features = h if count == align else features
        return self.output(h, c), self.project(features)


class SiT(_Backbone):
    """REPA's isotropic SiT (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        width, heads = config.width, config.heads
        self.blocks = nn.ModuleList(Block(width, heads, config.mlp) for _ in range(config.depth))
        self.rope = RoPE2D(config.grid, config.head_dim) if config.rope else None
        self.initialize_weights()

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """Velocity (B, in_channels, H, W) and projected tokens (B, teacher_grid**2, teacher_dim) or None."""
        h, c = self.embed(x, t, y)
        features = None
        for index, block in enumerate(self.blocks, start=1):
            h = block(h, c, self.rope)
            features = h if index == self.align_block else features
        return self.output(h, c), self.project(features)
