"""The ADM ("center-crop-dhariwal") center crop used by ADM, REPA and EDM2 for ImageNet."""

from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Center crop of ADM (guided-diffusion ``center_crop_arr``): uint8 (resolution, resolution, 3).

    While the short side is at least twice the target, halve the image with a BOX filter; then
    resize with BICUBIC so that the short side equals the target (each side rounded); then cut
    the centre, offsets rounded down.
    """
    if image.mode != "RGB":
        raise ValueError(f"adm_center_crop expects an RGB image, got mode {image.mode}")
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution].copy()  # writable, contiguous
