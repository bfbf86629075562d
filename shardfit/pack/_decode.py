"""Decode: one image file -> an oriented, RGB, resized array of the stored dtype.

This is the only costly step of packing; it runs in worker processes. Rules, all documented in
FORMAT.md:

- Only the first frame of an animated or multi-page file is used (later frames are never read).
- The EXIF orientation is applied.
- Modes with transparency (RGBA, LA, PA, palette or grey with a transparent colour) are
  composited onto ``background`` before resizing.
- 8-bit modes are converted to RGB with Pillow, resized with the named filter in 8 bits, then
  stored as ``pixel / 255`` (float32) or as is (uint8).
- 16-bit integer modes keep their range: value / 65535 (``I`` is read as unsigned 16-bit and
  clipped to 0-65535). Float images (mode ``F``) are used as they are when already within [0, 1],
  else rescaled so their minimum is 0 and their maximum 1. These are resized in float32.
- Truncated files are errors (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off): never silent garbage.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

__all__ = ["DecodeSpec", "crop_box", "decode_image", "describe_error", "pad_geometry"]

_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos3": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    """Everything a worker needs to decode one file; small and picklable.

    Attributes:
        height, width: output size in pixels.
        resize: ``"stretch"``, ``"crop"`` or ``"pad"``.
        interpolation: filter name (see ``shardfit.options.INTERPOLATIONS``).
        dtype: ``"float32"`` (values in [0, 1]) or ``"uint8"``.
        background: RGB 0-255 under transparent pixels.
    """

    height: int
    width: int
    resize: str
    interpolation: str
    dtype: str
    background: tuple[int, int, int]


def crop_box(w: int, h: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """Largest centred ``(left, top, right, bottom)`` window of aspect ``tw:th`` in a ``w x h``
    image, computed as Keras's ``crop_to_aspect_ratio`` does."""
    crop_h = max(min(h, int(float(w * th) / tw)), 1)
    crop_w = max(min(w, int(float(h * tw) / th)), 1)
    top = int(float(h - crop_h) / 2)
    left = int(float(w - crop_w) / 2)
    return left, top, left + crop_w, top + crop_h


def pad_geometry(w: int, h: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """``(canvas_w, canvas_h, left, top)``: the smallest canvas of aspect ``tw:th`` holding a
    ``w x h`` image centred, as Keras's ``pad_to_aspect_ratio`` computes it."""
    pad_h = max(h, int(float(w * th) / tw))
    pad_w = max(w, int(float(h * tw) / th))
    return pad_w, pad_h, int(float(pad_w - w) / 2), int(float(pad_h - h) / 2)


def describe_error(err: BaseException) -> str:
    """One line naming the error type and its message, for skip lists and error messages."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _oriented(im: Image.Image) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF: keep the stored orientation
        return im
    return im if oriented is None else oriented


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (
        "transparency" in im.info and im.mode in ("1", "L", "P", "RGB")
    )


def _to_rgb8(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if _has_alpha(im):
        if im.mode == "1":
            im = im.convert("L")  # keeps info["transparency"] (0 or 255)
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _resize8(im: Image.Image, spec: DecodeSpec) -> npt.NDArray[np.uint8]:
    tw, th = spec.width, spec.height
    resample = _FILTERS[spec.interpolation]
    if spec.resize == "crop":
        # crop first, then resize: resizing with box= would let the filter read past the window
        box = crop_box(im.width, im.height, tw, th)
        if box != (0, 0, im.width, im.height):
            im = im.crop(box)
    elif spec.resize == "pad":
        pw, ph, left, top = pad_geometry(im.width, im.height, tw, th)
        if (pw, ph) != im.size:
            canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
            canvas.paste(im, (left, top))
            im = canvas
    if im.size != (tw, th):
        im = im.resize((tw, th), resample)
    return np.asarray(im, dtype=np.uint8)


def _unit_float_plane(im: Image.Image) -> npt.NDArray[np.float32]:
    """A high-bit-depth single-band image as float32 in [0, 1], range kept (see module doc)."""
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError("float image holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            return arr
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    arr = np.asarray(im).astype(np.float32)
    return np.clip(arr, 0.0, 65535.0) / np.float32(65535.0)


def _resize_float(planes: npt.NDArray[np.float32], spec: DecodeSpec) -> npt.NDArray[np.float32]:
    """Resize an ``(h, w, 3)`` float32 image band by band with PIL's ``F`` mode."""
    h, w = planes.shape[:2]
    tw, th = spec.width, spec.height
    resample = _FILTERS[spec.interpolation]
    if spec.resize == "crop":
        left, top, right, bottom = crop_box(w, h, tw, th)
        planes = planes[top:bottom, left:right]
    elif spec.resize == "pad":
        pw, ph, left, top = pad_geometry(w, h, tw, th)
        canvas = np.zeros((ph, pw, 3), dtype=np.float32)
        canvas[top : top + h, left : left + w] = planes
        planes = canvas
    out = np.empty((th, tw, 3), dtype=np.float32)
    for c in range(3):
        band = Image.fromarray(np.ascontiguousarray(planes[:, :, c]), mode="F")
        out[:, :, c] = np.asarray(band.resize((tw, th), resample), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def _decode_high_bit(im: Image.Image, spec: DecodeSpec) -> npt.NDArray[np.float32]:
    plane = _unit_float_plane(im)
    rgb = np.repeat(plane[:, :, None], 3, axis=2)
    trns = im.info.get("transparency")
    if im.mode != "F" and isinstance(trns, int):
        mask = np.asarray(im) == trns
        rgb[mask] = np.asarray(spec.background, dtype=np.float32) / np.float32(255.0)
    return _resize_float(rgb, spec)


def decode_image(
    path: str, spec: DecodeSpec, out: npt.NDArray[Any] | None = None
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint8]:
    """Decode ``path`` into a C-contiguous ``(height, width, 3)`` array of ``spec.dtype``.

    With ``out`` (an array of that shape and dtype, such as a view of shared memory), the
    image is written there and ``out`` is returned; no image-sized array is allocated.

    Raises whatever Pillow raises for a file it cannot decode (``OSError``, ``ValueError``,
    ``SyntaxError``, ``TypeError``, ``DecompressionBombError``, ...), or ``OSError`` for an
    empty file; the caller turns these into skip reasons.
    """
    if os.path.getsize(path) == 0:
        raise OSError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns on odd metadata (corrupt EXIF, palette transparency, large images under
        # the bomb limit); none of these makes the pixels wrong.
        warnings.simplefilter("ignore")
        with Image.open(path) as opened:
            opened.load()  # frame 0 only: later frames of animated files are never decoded
            im = _oriented(opened)
            if im.mode in _HIGH_BIT_MODES:
                unit = _decode_high_bit(im, spec)
                result: npt.NDArray[Any] = (
                    unit if spec.dtype == "float32" else np.rint(unit * np.float32(255.0))
                )
            else:
                result = _resize8(_to_rgb8(im, spec.background), spec)
    if out is None:
        if result.dtype == spec.dtype:
            return result
        out = np.empty(result.shape, dtype=spec.dtype)
    if result.dtype == np.uint8 and out.dtype == np.float32:
        np.divide(result, 255, out=out, dtype=np.float32)  # pixel / 255, computed in float32
    else:
        np.copyto(out, result, casting="unsafe")
    return out
