"""Decoding rules: orientation, modes, transparency, bit depth, geometry (see FORMAT.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardfit.pack._decode import DecodeSpec, crop_box, decode_image, pad_geometry


def spec(h: int, w: int, **kw: object) -> DecodeSpec:
    base: dict[str, object] = {
        "resize": "stretch",
        "interpolation": "bilinear",
        "dtype": "float32",
        "background": (255, 255, 255),
    }
    base.update(kw)
    return DecodeSpec(height=h, width=w, **base)  # type: ignore[arg-type]


def gradient(h: int, w: int) -> np.ndarray:
    """An image with no symmetry: every pixel differs."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 7 + y * 13) % 256], -1
    ).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp", "webp"])
def test_stretch_equals_independent_pil_decode_and_resize(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(gradient(37, 53)).save(path)
    got = decode_image(str(path), spec(16, 24))
    with Image.open(path) as im:
        ref = (
            np.asarray(im.convert("RGB").resize((24, 16), Image.Resampling.BILINEAR), np.float32)
            / 255
        )
    assert got.dtype == np.float32 and got.shape == (16, 24, 3)
    np.testing.assert_array_equal(got, ref)


def test_uint8_stores_raw_resized_pixels(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(gradient(20, 30)).save(path)
    got = decode_image(str(path), spec(10, 10, dtype="uint8", interpolation="nearest"))
    with Image.open(path) as im:
        ref = np.asarray(im.resize((10, 10), Image.Resampling.NEAREST))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)


# Pillow's transposes per EXIF orientation, in numpy terms: stored -> displayed.
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = gradient(6, 10)
    im = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    im.save(path, exif=exif)
    want = _ORIENT[orientation](stored)
    got = decode_image(str(path), spec(want.shape[0], want.shape[1], dtype="uint8"))
    np.testing.assert_array_equal(got, want)


def test_transparent_pixels_show_the_background(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, but only the left half opaque
    rgba[:, :2, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = decode_image(str(path), spec(4, 4, dtype="uint8", background=(0, 0, 255)))
    assert got[:, :2].tolist() == [[[200, 0, 0]] * 2] * 4
    assert got[:, 2:].tolist() == [[[0, 0, 255]] * 2] * 4


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_grey_and_palette_alpha_are_composited(tmp_path: Path, mode: str) -> None:
    im = Image.new(mode, (2, 1), (100, 0))
    im.putpixel((0, 0), (100, 255))
    if mode == "PA":
        im.putpalette([v for i in range(256) for v in (i, i, i)])
    path = tmp_path / "x.png" if mode == "LA" else tmp_path / "x.tif"
    im.save(path)
    got = decode_image(str(path), spec(1, 2, dtype="uint8", background=(9, 9, 9)))
    assert got[0, 0].tolist() == [100, 100, 100]
    assert got[0, 1].tolist() == [9, 9, 9]


def test_palette_transparency_is_composited(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    im.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    im.save(path, transparency=1)
    got = decode_image(str(path), spec(1, 2, dtype="uint8", background=(255, 255, 255)))
    assert got.tolist() == [[[10, 20, 30], [255, 255, 255]]]


@pytest.mark.parametrize(("mode", "value"), [("1", 255), ("L", 77)])
def test_grey_modes_become_rgb(tmp_path: Path, mode: str, value: int) -> None:
    path = tmp_path / "g.png"
    Image.new(mode, (3, 2), value).save(path)
    got = decode_image(str(path), spec(2, 3, dtype="uint8"))
    assert got.shape == (2, 3, 3)
    assert (got == value).all()


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "c.tif"
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(path)
    got = decode_image(str(path), spec(2, 2, dtype="uint8"))
    assert got[0, 0].tolist() == [255, 0, 0]


def test_16_bit_images_keep_their_range_instead_of_clipping(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    path = tmp_path / "d.png"
    Image.fromarray(values).save(path)  # mode I;16
    got = decode_image(str(path), spec(2, 2, interpolation="nearest"))
    want = values.astype(np.float32) / 65535
    for c in range(3):
        np.testing.assert_allclose(got[:, :, c], want, rtol=1e-6)
    u8 = decode_image(str(path), spec(2, 2, interpolation="nearest", dtype="uint8"))
    assert u8[:, :, 0].tolist() == [[0, 4], [117, 255]]


def test_float_images_outside_unit_range_are_rescaled(tmp_path: Path) -> None:
    values = np.array([[-3.0, 0.0], [1.0, 5.0]], dtype=np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(values, "F").save(path)
    got = decode_image(str(path), spec(2, 2, interpolation="nearest"))
    np.testing.assert_allclose(got[:, :, 1], (values + 3) / 8, rtol=1e-6)


def test_animated_files_use_their_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=10)
    got = decode_image(str(path), spec(4, 4, dtype="uint8"))
    assert (got == [255, 0, 0]).all()


def test_crop_takes_the_centred_window_of_the_target_aspect() -> None:
    assert crop_box(40, 20, 10, 10) == (10, 0, 30, 20)
    assert crop_box(20, 40, 20, 10) == (0, 15, 20, 25)


def test_crop_mode_resizes_the_central_window(tmp_path: Path) -> None:
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, 10:20] = 250  # the centre third is bright, the sides dark
    path = tmp_path / "w.png"
    Image.fromarray(a).save(path)
    got = decode_image(str(path), spec(5, 5, resize="crop", dtype="uint8"))
    assert (got == 250).all()


def test_pad_mode_adds_black_bars_then_resizes(tmp_path: Path) -> None:
    assert pad_geometry(40, 20, 10, 10) == (40, 40, 0, 10)
    path = tmp_path / "w.png"
    Image.new("RGB", (40, 20), (255, 255, 255)).save(path)
    got = decode_image(str(path), spec(4, 4, resize="pad", dtype="uint8", interpolation="nearest"))
    assert (got[0] == 0).all() and (got[-1] == 0).all()
    assert (got[1:3] == 255).all()


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e.jpg"
    path.write_bytes(b"")
    with pytest.raises(OSError, match="empty file"):
        decode_image(str(path), spec(2, 2))


def test_truncated_file_is_an_error_not_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.jpg"
    Image.fromarray(gradient(64, 64)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(OSError, match=r"(?i)truncated"):
        decode_image(str(path), spec(8, 8))
