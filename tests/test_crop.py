"""ADM center crop against an independent float64 implementation (numpy box filter, torch bicubic)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.crop import adm_center_crop


def box_resize_1d(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """PIL's BOX filter on one axis: output i averages the inputs whose centres lie in [i*s, (i+1)*s)."""
    n = x.shape[axis]
    s = n / out
    centres = np.arange(n) + 0.5
    owner = np.minimum((centres // s).astype(int), out - 1)
    sums = np.zeros((out,) + tuple(np.delete(x.shape, axis)))
    np.add.at(sums, owner, np.moveaxis(x, axis, 0))
    counts = np.bincount(owner, minlength=out).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.moveaxis(sums / counts, 0, axis)


def reference_crop(arr: np.ndarray, r: int) -> np.ndarray:
    x = arr.astype(np.float64)
    while min(x.shape[:2]) >= 2 * r:
        h, w = x.shape[:2]
        x = np.floor(box_resize_1d(x, w // 2, axis=1) + 0.5)
        x = np.floor(box_resize_1d(x, h // 2, axis=0) + 0.5)
    h, w = x.shape[:2]
    scale = r / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        t = torch.from_numpy(x).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        x = np.clip(np.floor(t[0].permute(1, 2, 0).numpy() + 0.5), 0, 255)
    top, left = (nh - r) // 2, (nw - r) // 2
    return x[top:top + r, left:left + r]


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([127 + 100 * np.sin(xx / 17 + c) * np.cos(yy / 23 + c) for c in range(3)], -1)
    return np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w", [(375, 500), (1024, 768), (300, 257), (600, 1200), (511, 700), (90, 64), (64, 2000)])
@pytest.mark.parametrize("r", [64, 256])
def test_crop_matches_reference(h, w, r):
    arr = photo_like(h, w, seed=h + w)
    out = adm_center_crop(Image.fromarray(arr), r)
    assert out.shape == (r, r, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(np.float64) - reference_crop(arr, r))
    assert diff.mean() < 0.6 and diff.max() <= 3, (diff.mean(), diff.max())


def test_box_halving_stage_exact_within_rounding():
    """A 512 x 1024 image at r=256 is box-halved once, not resized, then center-cut: +-1 of the reference."""
    arr = photo_like(512, 1024)
    out = adm_center_crop(Image.fromarray(arr), 256).astype(np.float64)
    ref = reference_crop(arr, 256)
    assert np.abs(out - ref).max() <= 1


def test_offsets_floor_on_exact_size():
    """Short side already r: no resampling, the crop is a slice at floor((W - r) / 2)."""
    arr = np.random.default_rng(0).integers(0, 256, (64, 101, 3), dtype=np.uint8)
    out = adm_center_crop(Image.fromarray(arr), 64)
    np.testing.assert_array_equal(out, arr[:, 18:82])
    square = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(adm_center_crop(Image.fromarray(square), 64), square)


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        adm_center_crop(Image.new("L", (80, 80)), 64)
