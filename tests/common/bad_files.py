"""Awkward and broken image files for testing how image readers cope.

``write_bad_files(folder)`` fills a class directory with one file per kind and
says whether a reader should encode it or skip it. The "huge" image is only
skipped by a reader that enforces a pixel limit, such as ``MAX_PIXELS``.
"""

import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

ENCODED = "encoded"
SKIPPED = "skipped"
MAX_PIXELS = 2**26
HUGE_SIDE = 20_000


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image of smooth gradients plus noise, which compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 17 + y / 23)], axis=-1)
    noise = rng.normal(0, 0.05, size=base.shape)
    return Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, tag, data and CRC."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def huge_png_bytes(side: int = HUGE_SIDE) -> bytes:
    """A valid ``side`` x ``side`` 1-bit grayscale PNG of one colour.

    Written by hand, row by row, so it costs neither the memory of a full
    image nor much disk: 20000 x 20000 pixels come to about 90 kB.
    """
    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    compressor = zlib.compressobj(6)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def truncated_jpeg_bytes() -> bytes:
    """A JPEG cut to half its bytes, which Pillow refuses to load by default."""
    buffer = BytesIO()
    photo_like(320, 240, seed=1).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def palette_with_transparency(image: Image.Image) -> Image.Image:
    """Quantize ``image`` to a 64-colour palette and make palette entry 0 transparent."""
    paletted = image.quantize(colors=64)
    paletted.info["transparency"] = 0
    return paletted


def write_bad_files(folder: Path) -> dict[str, str]:
    """Write one file per awkward kind into ``folder``; return {file name: "encoded" or "skipped"}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = photo_like(256, 192)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (192, 1)))
    gradient16 = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (192, 1))

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(truncated_jpeg_bytes())
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "folder.jpg").mkdir(exist_ok=True)
    (folder / "folder.jpg" / "note.txt").write_text("a directory named like an image\n")
    (folder / "huge.png").write_bytes(huge_png_bytes())

    Image.fromarray(gradient16).save(folder / "gray16.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    palette_with_transparency(photo).save(folder / "palette.png")
    rgba = photo.copy()
    rgba.putalpha(alpha)
    rgba.save(folder / "rgba.png")
    photo.convert("L").save(folder / "gray.jpg", quality=90)
    la = photo.convert("L")
    la.putalpha(alpha)
    la.save(folder / "la.png")
    photo_like(300, 40, seed=2).save(folder / "thin.jpg", quality=90)

    return {
        "empty.jpg": SKIPPED,
        "truncated.jpg": SKIPPED,
        "text.jpg": SKIPPED,
        "folder.jpg": SKIPPED,
        "huge.png": SKIPPED,
        "gray16.png": ENCODED,
        "cmyk.jpg": ENCODED,
        "palette.png": ENCODED,
        "rgba.png": ENCODED,
        "gray.jpg": ENCODED,
        "la.png": ENCODED,
        "thin.jpg": ENCODED,
    }
