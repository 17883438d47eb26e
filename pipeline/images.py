"""Decoding untrusted image input into RGB pictures, within limits.

Every way an image enters the pipeline (a path, bytes, a PIL image, an array) goes
through :func:`load_image`, which applies the EXIF orientation, flattens modes the
models cannot take (palette, alpha, CMYK, 16-bit, grayscale) to 8-bit RGB and
refuses data that is not an image or is too large, before anything is decoded in
full.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLarge, InvalidImage


@dataclass(frozen=True)
class ImageLimits:
    """Caps on untrusted images. ``max_pixels`` also stops decompression bombs."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    min_side: int = 32  # a face photo smaller than this cannot show a usable face


DEFAULT_LIMITS = ImageLimits()
# the formats the API names; Pillow would otherwise try every plugin it has (EPS runs
# Ghostscript, PSD, ICNS, ...): untrusted bytes only ever reach these decoders
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


def load_image(source: ImageInput, *, field: str = "image", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Return ``source`` as an upright 8-bit RGB PIL image.

    ``source`` is a path, encoded bytes, a PIL image or an HxWx3 uint8 RGB array.
    Raises :class:`InvalidImage` for anything that does not decode and
    :class:`ImageTooLarge` for data over ``limits``; ``field`` names the input in
    those messages.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(_check_dimensions(source, field, limits), field)
    if isinstance(source, np.ndarray):
        return _from_array(source, field, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(Path(source), field, limits)
    else:
        raise InvalidImage(f"unsupported image input of type {type(source).__name__}", field)
    return decode_image_bytes(data, field=field, limits=limits)


def decode_image_bytes(data: bytes, *, field: str = "image", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, GIF, BMP or TIFF: :data:`FORMATS`) to upright RGB."""
    if len(data) == 0:
        raise InvalidImage("is empty", field)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"is {len(data)} bytes, more than the limit of {limits.max_bytes}", field)
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) and then raises past twice its own
            # limit; our own pixel cap below is what decides, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"declares too many pixels ({error})", field) from None
    except UnidentifiedImageError:
        raise InvalidImage("is not an image in a format this service reads (PNG, JPEG, WebP, GIF, BMP, TIFF)",
                           field) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidImage(f"is not a decodable image ({_short(error)})", field) from None
    _check_dimensions(image, field, limits)
    try:
        image.seek(0)  # animated images: the first frame
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise InvalidImage(f"is truncated or corrupt ({_short(error)})", field) from None
    return _to_rgb(image, field)


def _read_file(path: Path, field: str, limits: ImageLimits) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidImage(f"file not found: {path}", field) from None
    except OSError as error:
        raise InvalidImage(f"cannot read {path}: {error.strerror}", field) from None
    if path.is_dir():
        raise InvalidImage(f"{path} is a directory, not an image file", field)
    if size > limits.max_bytes:
        raise ImageTooLarge(f"{path} is {size} bytes, more than the limit of {limits.max_bytes}", field)
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidImage(f"cannot read {path}: {error.strerror}", field) from None


def _check_dimensions(image: Image.Image, field: str, limits: ImageLimits) -> Image.Image:
    width, height = image.size
    if width > limits.max_side or height > limits.max_side:
        raise ImageTooLarge(f"is {width}x{height}; each side must be at most {limits.max_side}", field)
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"is {width}x{height} = {width * height} pixels, more than the limit of {limits.max_pixels}", field
        )
    if width < limits.min_side or height < limits.min_side:
        raise InvalidImage(f"is {width}x{height}; images must be at least {limits.min_side} pixels on each side", field)
    return image


def _to_rgb(image: Image.Image, field: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        pass  # a broken EXIF block: keep the stored orientation
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        gray = ((array - array.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise InvalidImage(f"has an unsupported pixel mode {image.mode} ({_short(error)})", field) from None


def _from_array(array: np.ndarray, field: str, limits: ImageLimits) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InvalidImage(f"array must be HxW, HxWx3 or HxWx4, got shape {array.shape}", field)
    if array.dtype != np.uint8:
        raise InvalidImage(f"array must be uint8 RGB, got {array.dtype}", field)
    image = Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[2] == 3 else "RGBA")
    return _to_rgb(_check_dimensions(image, field, limits), field)


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
