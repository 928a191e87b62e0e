"""int8 teacher tokens: symmetric quantisation with one scale per token, after per-channel equalisation.

A teacher's int8 tokens carry two kinds of scales:

- ``c`` (D,) float32, once per teacher (its manifest record, ``channel_scales``): how much louder than
  the median channel each channel is, ``c_j = max(rms_j / median(rms), 1)``, from the root mean square
  of each channel over the tokens of the first :data:`CALIBRATION_ROWS` images (:func:`channel_scales`).
  Channels at or below the median have ``c_j = 1``; a few outlier channels (common in ViT features)
  are divided down to the median's level, so that they do not set every token's scale alone.
- ``s`` per token, stored as float32 beside the values: ``s = max|x / c| / 127``, ``q = round(x / c / s)``
  in int8 (absmax: every value fits in [-127, 127], -128 is never used).

``x ~ q * s * c``: each value is off by at most ``s * c_j / 2``. A token of zeros (a skipped row) has
``s = 0`` and ``q = 0``. Without channel scales (``c = None``: caches written before them, or built
without calibration) ``c`` is 1. For D = 768 a token takes 768 + 4 bytes instead of 1,536 in float16
(0.503 of it). Measured accuracy against float16: docs/benchmarks.md (``make bench-int8``).

These functions work on torch tensors of any device (the build quantises on the GPU, the trainer
dequantises inside its compiled step) and on numpy arrays through ``torch.from_numpy``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["QMAX", "COSINE_GOAL", "CALIBRATION_ROWS", "channel_scales", "quantize_tokens", "dequantize_tokens",
           "dequantize_into", "scales_valid", "token_cosine"]

QMAX = 127
#: Per-token cosine between int8 and float tokens that the build checks (mean, minimum); below it, it warns.
COSINE_GOAL = (0.9995, 0.999)
#: Images whose tokens set a teacher's channel scales: the first ones with data, in row order.
CALIBRATION_ROWS = 16


def channel_scales(calibration: torch.Tensor) -> torch.Tensor:
    """float32 (D,) ``c_j = max(rms_j / median(rms), 1)`` over the calibration tokens (..., D), rms in float64
    (the median of an even number of channels is the lower middle one).
    All ones when the median channel is silent (nothing to equalise against)."""
    if not bool(torch.isfinite(calibration).all()):
        raise ValueError("channel_scales: the calibration tokens hold non-finite values")
    x = calibration.detach().double().reshape(-1, calibration.shape[-1])
    rms = x.square().mean(0).sqrt()
    median = rms.median()
    if not median > 0:
        return torch.ones(rms.shape, dtype=torch.float32, device=calibration.device)
    return torch.clamp(rms / median, min=1.0).float()


def _channels(channels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if channels is None:
        return None
    channels = torch.as_tensor(channels, dtype=torch.float32, device=like.device)
    if channels.shape != like.shape[-1:]:
        raise ValueError(f"channel scales of shape {tuple(channels.shape)} for tokens of width {like.shape[-1]}")
    return channels


def quantize_tokens(x: torch.Tensor, channels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (..., D), scale float32 (...)) of tokens ``x`` (..., D), computed in float32.

    ``y = x / channels`` (channels: the teacher's (D,) channel scales, None: ones), ``scale = max|y| / 127``
    over the last axis and ``q = round(y / scale)`` (round half to even); a token of zeros gets scale 0 and
    q 0. Non-finite input is refused: a scale of inf or NaN would turn the whole token into garbage.
    """
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_tokens: the tokens hold non-finite values")
    c = _channels(channels, x)
    if c is not None:
        x = x / c
    amax = x.abs().amax(dim=-1)
    scale = amax / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_tokens(q: torch.Tensor, scale: torch.Tensor, channels: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale * channels`` in ``dtype`` (computed in float32, rounded once): int8 tokens (..., D), their
    float32 scales (...) and the teacher's (D,) channel scales (None: ones)."""
    out = q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    c = _channels(channels, q)
    if c is not None:
        out = out * c
    return out.to(dtype)


def scales_valid(scales: np.ndarray) -> bool:
    """Whether per-token scales are what :func:`quantize_tokens` writes: finite and not negative (0 for a token of
    zeros). Every read path that dequantises checks this first: a NaN or infinite scale would hand out garbage."""
    scales = np.asarray(scales)
    return bool(np.isfinite(scales).all() and (scales >= 0).all())


_DEQUANT_BLOCK = 1 << 20  # values per step of dequantize_into: its float32 temporary (4 MB) stays in cache


def dequantize_into(values: np.ndarray, scales: np.ndarray, out: np.ndarray, channels: np.ndarray | None = None) -> None:
    """out (n, ..., D) float16 = int8 ``values`` x float32 ``scales`` (n, ...) x ``channels`` (D,) (None: ones),
    in float32 then rounded once: :func:`dequantize_tokens`'s values, computed a few rows at a
    time so that no batch-sized float32 temporary is made (which would make it memory-bound and several
    times slower)."""
    q, s, o = (torch.from_numpy(np.asarray(a)) for a in (values, scales, out))
    c = None if channels is None else torch.from_numpy(np.asarray(channels, dtype=np.float32))
    step = max(1, _DEQUANT_BLOCK // max(1, q[0].numel() if len(q) else 1))
    for i in range(0, len(q), step):
        x = q[i:i + step].to(torch.float32) * s[i:i + step].unsqueeze(-1)
        if c is None:
            o[i:i + step].copy_(x)
        else:
            torch.mul(x, c, out=o[i:i + step])


def token_cosine(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 channels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cosine (...,) between tokens ``x`` (..., D) and their int8 form, in float32. A token of
    zeros (both sides) counts as 1."""
    x = x.float()
    y = dequantize_tokens(q, scale, channels)
    dot, nx, ny = (x * y).sum(-1), x.norm(dim=-1), y.norm(dim=-1)
    return torch.where((nx > 0) & (ny > 0), dot / (nx * ny).clamp_min(1e-30), (nx == ny).float())
