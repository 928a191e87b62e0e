"""Source listing, mode conversion and every kind of bad file."""

import numpy as np
import pytest
from common.bad_files import MAX_PIXELS, write_bad_files
from PIL import Image

from pipeline.decode import SkipImage, load_image, to_rgb
from pipeline.sources import list_image_folder


def test_every_bad_file_kind(tmp_path):
    expected = write_bad_files(tmp_path)
    assert {"empty.jpg", "truncated.jpg", "text.jpg", "folder.jpg", "huge.png", "gray16.png", "cmyk.jpg",
            "palette.png", "rgba.png", "gray.jpg", "la.png", "thin.jpg"} <= set(expected)
    for name, outcome in expected.items():
        if outcome == "encoded":
            out = load_image(str(tmp_path / name), 64, max_pixels=MAX_PIXELS)
            assert out.shape == (64, 64, 3) and out.dtype == np.uint8, name
        else:
            with pytest.raises(SkipImage) as info:
                load_image(str(tmp_path / name), 64, max_pixels=MAX_PIXELS)
            assert str(info.value), name


def test_skip_reasons_are_specific(tmp_path):
    write_bad_files(tmp_path)

    def reason(name):
        with pytest.raises(SkipImage) as info:
            load_image(str(tmp_path / name), 64, max_pixels=MAX_PIXELS)
        return str(info.value)

    assert "directory" in reason("folder.jpg")
    assert "too large" in reason("huge.png")
    assert "truncated" in reason("truncated.jpg")
    assert "not an image" in reason("empty.jpg")
    assert "not an image" in reason("text.jpg")


def test_max_pixels_between_one_and_two_times_the_limit(tmp_path):
    """Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; the loader still skips."""
    Image.new("RGB", (300, 300)).save(tmp_path / "a.png")
    with pytest.raises(SkipImage, match="too large"):
        load_image(str(tmp_path / "a.png"), 64, max_pixels=300 * 300 - 1)
    assert load_image(str(tmp_path / "a.png"), 64, max_pixels=300 * 300).shape == (64, 64, 3)


def test_16bit_is_rescaled_not_clipped():
    ramp = (np.linspace(0, 65535, 256)[None, :].repeat(8, 0)).astype(np.uint16)
    img = Image.new("I;16", (256, 8))
    img.frombytes(ramp.astype("<u2").tobytes())
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (8, 256, 3)
    np.testing.assert_allclose(rgb[0, :, 0], np.linspace(0, 255, 256), atol=1)


def test_cmyk_and_palette_convert():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (10, 20, 30)


def test_listing_order_labels_and_limits(tmp_path):
    for cls, names in {"b_cls": ["2.jpg", "10.jpg", "sub/1.png"], "a_cls": ["z.JPEG", "a.jpeg"], ".hidden": ["x.jpg"]}.items():
        for n in names:
            p = tmp_path / cls / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x" * len(n))
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    listing = list_image_folder(tmp_path)
    assert listing.classes == ["a_cls", "b_cls"]
    assert [f["path"] for f in listing.files] == ["a_cls/a.jpeg", "a_cls/z.JPEG", "b_cls/10.jpg", "b_cls/2.jpg", "b_cls/sub/1.png"]
    assert [f["label"] for f in listing.files] == [0, 0, 1, 1, 1]
    assert [f["path"] for f in list_image_folder(tmp_path, limit=3).files] == ["a_cls/a.jpeg", "a_cls/z.JPEG", "b_cls/10.jpg"]
    assert list_image_folder(tmp_path, classes=1).classes == ["a_cls"]
    before = listing.fingerprint
    (tmp_path / "b_cls" / "2.jpg").write_bytes(b"longer content")
    assert list_image_folder(tmp_path).fingerprint != before


def test_listing_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        list_image_folder(tmp_path)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_image_folder(tmp_path)
