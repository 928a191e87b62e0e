"""int8 teacher tokens: symmetric quantisation with one scale per token.

A token ``x`` (D values) is stored as ``q = round(x / s)`` in int8 with ``s = max|x| / 127`` (absmax:
every value fits in [-127, 127], -128 is never used, so ``-q`` is representable); the scale ``s`` is
stored as float32 beside it. ``x ~ q * s``: each value is off by at most ``s / 2``. A token of zeros
(a skipped row) has ``s = 0`` and ``q = 0``. For D = 768 a token takes 768 + 4 bytes instead of
1,536 in float16 (0.503 of it).

These functions work on torch tensors of any device (the build quantises on the GPU, the trainer
dequantises inside its compiled step) and on numpy arrays through ``torch.from_numpy``.
"""

from __future__ import annotations

import torch

__all__ = ["SCALES_GROUP", "QMAX", "FEATURE_DTYPES", "STORED_DTYPES", "COSINE_GOAL", "quantize_tokens",
           "dequantize_tokens", "token_cosine"]

QMAX = 127
SCALES_GROUP = "feature_scales"  # where a cache keeps int8 teachers' scales: 'feature_scales/<teacher>'
#: What ``--feature-dtype`` accepts, and the dtype of the stored token array for each.
FEATURE_DTYPES = ("fp16", "int8")
STORED_DTYPES = {"fp16": "float16", "int8": "int8"}
#: Per-token cosine between int8 and float tokens that the build checks (mean, minimum); below it, it warns.
COSINE_GOAL = (0.9995, 0.999)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (..., D), scale float32 (...)) of tokens ``x`` (..., D), computed in float32.

    ``scale = max|x| / 127`` over the last axis and ``q = round(x / scale)`` (round half to even);
    a token of zeros gets scale 0 and q 0. Non-finite input is refused: a scale of inf or NaN would
    turn the whole token into garbage.
    """
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_tokens: the tokens hold non-finite values")
    amax = x.abs().amax(dim=-1)
    scale = amax / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_tokens(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in ``dtype``: int8 tokens (..., D) and their float32 scales (...)."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def token_cosine(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token cosine (...,) between tokens ``x`` (..., D) and their int8 form ``q * scale``, in float32.
    A token of zeros (both sides) counts as 1."""
    x = x.float()
    y = dequantize_tokens(q, scale, torch.float32)
    dot, nx, ny = (x * y).sum(-1), x.norm(dim=-1), y.norm(dim=-1)
    return torch.where((nx > 0) & (ny > 0), dot / (nx * ny).clamp_min(1e-30), (nx == ny).float())
