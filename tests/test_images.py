import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageTooLarge, InvalidImage
from pipeline.images import ImageLimits, decode_image_bytes, load_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright = decode_image_bytes(encode(image, "JPEG", exif=exif))
    assert upright.size == (40, 80)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (48, 36), 128),
        Image.new("1", (48, 36), 1),
        Image.new("P", (48, 36), 3),
        Image.new("RGBA", (48, 36), (255, 0, 0, 0)),
        Image.new("LA", (48, 36), (10, 255)),
        Image.new("I;16", (48, 36), 65535),
        Image.new("CMYK", (48, 36), (0, 255, 255, 0)),
    ],
    ids=lambda im: im.mode,
)
def test_every_mode_becomes_8_bit_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    out = decode_image_bytes(encode(image, fmt))
    assert out.mode == "RGB" and out.size == (48, 36)


def test_transparency_is_composited_on_white_and_16_bit_is_scaled():
    assert np.asarray(decode_image_bytes(encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0)))))[0, 0].tolist() == [255] * 3
    assert np.asarray(decode_image_bytes(encode(Image.new("I;16", (40, 40), 65535))))[0, 0].tolist() == [255] * 3


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image_bytes(buffer.getvalue())
    assert np.asarray(out)[0, 0, 0] > 200 and np.asarray(out)[0, 0, 1] < 50


@pytest.mark.parametrize(
    "data,needle",
    [(b"", "empty"), (b"definitely not an image", "format this service reads"),
     (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "")],
)
def test_non_images_are_refused(data, needle):
    with pytest.raises(InvalidImage) as info:
        decode_image_bytes(data, field="face_images[0]")
    assert needle in str(info.value) and "face_images[0]" in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_formats_the_api_names_decode(fmt):
    assert decode_image_bytes(encode(Image.new("RGB", (48, 40), (200, 10, 10)), fmt)).size == (48, 40)


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PPM", "TGA", "PCX", "SGI"])
def test_formats_pillow_knows_but_the_api_does_not_name_are_refused(fmt):
    data = encode(Image.new("RGB", (48, 40), (200, 10, 10)), fmt)
    Image.open(io.BytesIO(data))  # Pillow alone would open it (and hand EPS to Ghostscript)
    with pytest.raises(InvalidImage, match="format this service reads"):
        decode_image_bytes(data, field="face_images[0]")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(InvalidImage):
        decode_image_bytes(data[: len(data) // 2])


def test_too_many_bytes_is_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image_bytes(b"x" * 2048, limits=ImageLimits(max_bytes=1024))


@pytest.mark.parametrize("size", [(100_000, 100_000), (60_000, 1)])
def test_declared_dimensions_are_checked_before_decoding(size):
    with pytest.raises(ImageTooLarge):
        decode_image_bytes(png_with_declared_size(*size))


def test_paths_arrays_and_pil_images_are_accepted(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (1, 2, 3)).save(path)
    assert load_image(path).size == (50, 40)
    assert load_image(np.zeros((40, 50, 3), np.uint8)).size == (50, 40)
    assert load_image(Image.new("L", (50, 40))).mode == "RGB"
    with pytest.raises(InvalidImage, match="at least 32 pixels"):
        load_image(Image.new("RGB", (1, 1)))
    with pytest.raises(InvalidImage, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImage, match="directory"):
        load_image(tmp_path)
    with pytest.raises(InvalidImage, match="uint8"):
        load_image(np.zeros((40, 50, 3), np.float32))
