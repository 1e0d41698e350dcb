"""dermkit.data.images: every supported mode becomes (H, W, 3) uint8; every bad file is named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from _image_faults import (
    rgb_pixels,
    write_empty,
    write_grey_png,
    write_jpeg,
    write_png,
    write_png_header,
    write_rgba_png,
    write_truncated,
)
from dermkit.data import images
from dermkit.data.images import (
    ImageDecodeError,
    load_rgb,
    load_rgb_with_info,
    probe_image,
)


def test_rgb_png_round_trips_exactly(tmp_path):
    path = write_png(tmp_path / "a.png", seed=3)
    out, mode = load_rgb_with_info(path)
    assert mode == "RGB"
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb_pixels(3))


def test_jpeg_loads_as_hw3_uint8(tmp_path):
    path = write_jpeg(tmp_path / "a.jpg", seed=3, size=(20, 10))
    out = load_rgb(path)
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8
    # Exactly the pixels a plain PIL decode gives (nothing padded, shifted or re-scaled).
    with Image.open(path) as reference:
        np.testing.assert_array_equal(out, np.asarray(reference.convert("RGB")))


def test_greyscale_is_copied_to_three_channels(tmp_path):
    grey = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    out, mode = load_rgb_with_info(write_grey_png(tmp_path / "g.png", grey))
    assert mode == "L"
    assert out.shape == (12, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_is_scaled_by_bit_depth_not_clipped(tmp_path, fmt):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / f"d16.{fmt.lower()}"
    Image.fromarray(values).save(path, fmt)
    out, mode = load_rgb_with_info(path)
    assert mode.startswith("I;16")
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    # 257 = 1/255 of full scale -> 1; 32768 -> 127.5 -> 128; clipping would give 255 for all
    # but 0, stretching to the image's own max would map 32768 to 128 only by coincidence.
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_16_bit_dark_image_is_not_stretched(tmp_path):
    values = np.full((2, 2), 1000, dtype=np.uint16)
    out = load_rgb(write_grey_png(tmp_path / "dark.png", values))
    assert (out == round(1000 * 255 / 65535)).all()  # 4, not 255


def test_cmyk_converts_to_rgb(tmp_path):
    cmyk = np.zeros((4, 4, 4), dtype=np.uint8)
    cmyk[:, :, 0] = 255  # pure cyan
    path = tmp_path / "c.tif"
    Image.fromarray(cmyk, mode="CMYK").save(path)
    out, mode = load_rgb_with_info(path)
    assert mode == "CMYK"
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [0, 255, 255])


def test_opaque_rgba_drops_alpha(tmp_path):
    out, mode = load_rgb_with_info(write_rgba_png(tmp_path / "o.png", n_transparent=0))
    assert mode == "RGBA"
    np.testing.assert_array_equal(out, rgb_pixels(2))


def test_rgba_with_transparency_is_rejected_with_count(tmp_path):
    path = write_rgba_png(tmp_path / "t.png", n_transparent=5)
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(path)
    assert err.value.path == str(path)
    assert "transparency" in err.value.reason and "5 pixels" in err.value.reason
    assert probe_image(path) == err.value.reason


def test_palette_images(tmp_path):
    palette_img = Image.new("P", (4, 2))
    palette_img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_img.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    plain = tmp_path / "p.png"
    palette_img.save(plain)
    out, mode = load_rgb_with_info(plain)
    assert mode == "P"
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])

    # A transparency entry that no pixel uses leaves the image opaque: converted.
    unused = tmp_path / "p_unused.png"
    palette_img.save(unused, transparency=7)
    assert load_rgb(unused).shape == (2, 4, 3)

    # Transparency on a colour the pixels use: rejected like RGBA.
    used = tmp_path / "p_used.png"
    palette_img.save(used, transparency=1)
    reason = probe_image(used)
    assert reason is not None and reason.startswith("P image with transparency")


def test_one_bit_image(tmp_path):
    path = tmp_path / "b.png"
    bits = Image.new("1", (3, 1))
    bits.putdata([0, 1, 0])
    bits.save(path)
    out, mode = load_rgb_with_info(path)
    assert mode == "1"
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 0])


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.shape == (40, 20, 3)
    assert out[:15].mean() < 30  # the left (black) half is now on top
    assert out[25:].mean() > 225


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("pil_pads_truncated", [False, True])
def test_truncated_image_is_rejected_even_if_pil_would_pad(
    tmp_path, monkeypatch, fmt, pil_pads_truncated
):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pil_pads_truncated)
    path = write_truncated(tmp_path / f"cut.{fmt.lower()}", fmt)
    with pytest.raises(ImageDecodeError, match="truncated image"):
        load_rgb(path)
    assert probe_image(path) == "truncated image"


def test_png_cut_inside_its_end_chunk_is_truncated(tmp_path):
    path = write_png(tmp_path / "a.png")
    path.write_bytes(path.read_bytes()[:-6])
    assert probe_image(path) == "truncated image"


def test_zero_byte_and_non_image_files(tmp_path):
    assert probe_image(write_empty(tmp_path / "z.jpg")) == "0-byte file"
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    assert probe_image(text) == "not an image (cannot identify)"
    assert probe_image(tmp_path / "absent.jpg") == "file not found"
    assert probe_image(write_jpeg(tmp_path / "ok.jpg")) is None


def test_decompression_bomb_above_dermkit_limit_is_refused(tmp_path):
    # 49 M pixels: below PIL's own limit (89 M, which would only warn), above dermkit's 40 M.
    path = write_png_header(tmp_path / "bomb.png", 7000, 7000)
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(path)
    assert err.value.reason.startswith("decompression bomb: 7000x7000 pixels exceeds limit")


def test_decompression_bomb_does_not_rely_on_pil_global(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone disabled PIL's check
    path = write_png_header(tmp_path / "bomb.png", 50_000, 50_000)
    reason = probe_image(path)
    assert reason is not None and reason.startswith("decompression bomb: 50000x50000")


def test_huge_bomb_caught_by_pil_is_reported_as_bomb(tmp_path):
    reason = probe_image(write_png_header(tmp_path / "bomb.png", 50_000, 50_000))
    assert reason is not None and reason.startswith("decompression bomb")


def test_pixel_limit_is_read_at_call_time(tmp_path, monkeypatch):
    path = write_png(tmp_path / "a.png", size=(16, 12))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 16 * 12)
    assert probe_image(path) is None
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 16 * 12 - 1)
    assert "decompression bomb: 16x12 pixels" in probe_image(path)
