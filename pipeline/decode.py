"""Decoding one source file into the ADM-cropped RGB array, or a reason to skip it."""

from __future__ import annotations

import errno
import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from cache.files import checksum

from .crop import adm_center_crop
from .sources import escapes_root

ImageFile.LOAD_TRUNCATED_IMAGES = False


class SkipImage(Exception):
    """The file cannot be encoded; the message is the reason recorded in the manifest."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit integer and float greyscale are rescaled, palette and
    alpha images drop their alpha (as ``convert("RGB")`` in ADM), CMYK goes through PIL's transform."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image).astype(np.float64)
        peak = 65535.0 if (mode.startswith("I;16") or arr.max() > 255) else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image).astype(np.float64)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str, resolution: int, *, max_pixels: int) -> np.ndarray:
    """Open, convert and crop one file: uint8 (resolution, resolution, 3). Raises SkipImage."""
    return decode_image(path, resolution, max_pixels=max_pixels)[0]


def decode_image(path: str, resolution: int, *, max_pixels: int) -> tuple[np.ndarray, str]:
    """:func:`load_image`, and the :func:`cache.files.checksum` of the file's bytes, computed from the bytes
    that are decoded (the file is read once). Raises SkipImage.

    Sets PIL's process-wide pixel limit and warning filters while it runs: call it from one thread
    per process (the build's and the evaluator's loaders use worker processes)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels  # restored below: callers share PIL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                data = f.read()
            digest = checksum(data)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise SkipImage(f"too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
                im.load()
                rgb = to_rgb(im)
    except SkipImage:
        raise
    except IsADirectoryError:
        raise SkipImage("is a directory") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise SkipImage("not an image (unidentified format or empty file)") from None
    except FileNotFoundError:
        raise SkipImage("missing, or a dangling symlink") from None
    except PermissionError:
        raise SkipImage("permission denied") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise SkipImage(f"cannot decode: {type(e).__name__}: {e}") from None
        raise SkipImage("symlink loop") from None
    except Exception as e:  # truncated, corrupt, unreadable: never let one file stop a build
        raise SkipImage(f"cannot decode: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if min(rgb.size) < 1:
        raise SkipImage(f"empty image {rgb.size}")
    return adm_center_crop(rgb, resolution), digest


class DecodedImages(Dataset):
    """Image files by index for a DataLoader: ``(index, uint8 (R, R, 3) or None, skip reason)``, each file
    through :func:`load_image` (in the loader's worker processes, one thread each). With a ``root``, the
    paths are relative to it and a file that a symlink leads out of it is skipped, never read."""

    def __init__(self, paths: Sequence[str], resolution: int, *, max_pixels: int, root: str = "") -> None:
        self.paths, self.resolution, self.max_pixels, self.root = paths, resolution, max_pixels, root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str, str]:
        """``(index, image or None, skip reason, checksum of the file's bytes or "")``."""
        path = os.path.join(self.root, self.paths[index])
        if self.root and escapes_root(self.root, self.paths[index]):
            return index, None, "a symlink leads outside SOURCE", ""
        try:
            image, digest = decode_image(path, self.resolution, max_pixels=self.max_pixels)
            return index, image, "", digest
        except SkipImage as e:
            return index, None, str(e), ""
