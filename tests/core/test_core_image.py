"""decode_image on real photos and on the broken inputs users send."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from facefed.core.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedImageError,
)
from facefed.core.image import decode_image

PHOTO = "lfw/Ann_Veneman/Ann_Veneman_0001.jpg"


@pytest.fixture
def photo_bytes(test_data: Path) -> bytes:
    return (test_data / PHOTO).read_bytes()


@pytest.fixture
def photo(test_data: Path) -> Image.Image:
    return Image.open(test_data / PHOTO).convert("RGB")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_jpeg_from_path_and_bytes_agree(test_data: Path, photo_bytes: bytes) -> None:
    from_path = decode_image(test_data / PHOTO)
    from_str = decode_image(str(test_data / PHOTO))
    from_bytes = decode_image(photo_bytes)
    assert from_path.shape == (250, 250, 3)
    assert from_path.dtype == np.uint8
    assert from_path.flags.c_contiguous
    assert np.array_equal(from_path, from_bytes)
    assert np.array_equal(from_path, from_str)
    # Pillow's own RGB decode is the reference.
    reference = np.asarray(Image.open(io.BytesIO(photo_bytes)).convert("RGB"))
    assert np.array_equal(from_path, reference)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_round_trip(photo: Image.Image, fmt: str) -> None:
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(_encode(photo, fmt, **kwargs))
    assert np.array_equal(decoded, np.asarray(photo))


def test_grayscale_becomes_three_equal_channels(photo: Image.Image) -> None:
    gray = photo.convert("L")
    decoded = decode_image(_encode(gray, "PNG"))
    assert decoded.shape == (250, 250, 3)
    for channel in range(3):
        assert np.array_equal(decoded[:, :, channel], np.asarray(gray))


def test_sixteen_bit_png_keeps_its_range(photo: Image.Image) -> None:
    eight = np.asarray(photo.convert("L")).astype(np.uint16)
    sixteen = eight * 257  # 0..255 spread over 0..65535
    image16 = Image.fromarray(sixteen)
    data = _encode(image16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = decode_image(data)
    # Clipping at 255 (Pillow's plain convert) would make almost all white.
    assert np.array_equal(decoded[:, :, 0], eight.astype(np.uint8))


def test_rgba_is_composited_on_white(photo: Image.Image) -> None:
    rgba = photo.convert("RGBA")
    alpha = np.full((250, 250), 255, np.uint8)
    alpha[:, :125] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    decoded = decode_image(_encode(rgba, "PNG"))
    assert np.all(decoded[:, :125] == 255)
    assert np.array_equal(decoded[:, 125:], np.asarray(photo)[:, 125:])


def test_cmyk_jpeg_is_converted_to_rgb(photo: Image.Image) -> None:
    cmyk = photo.convert("CMYK")
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data)
    assert decoded.shape == (250, 250, 3)
    difference = np.abs(decoded.astype(int) - np.asarray(photo).astype(int))
    assert difference.mean() < 8  # JPEG loss only, colours not inverted


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [(6, "ROTATE_90"), (8, "ROTATE_270"), (3, "ROTATE_180")],
)
def test_exif_orientation_is_applied(
    photo: Image.Image, orientation: int, transpose: str
) -> None:
    # Store the pixels as a camera would (sensor order) with the tag that
    # tells viewers how to turn them upright.
    wide = photo.crop((0, 40, 250, 200))  # not square, so rotation shows
    stored = wide.transpose(getattr(Image.Transpose, transpose).value)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "JPEG", quality=98, exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.shape == (160, 250, 3)
    difference = np.abs(decoded.astype(int) - np.asarray(wide).astype(int))
    assert difference.mean() < 4


def test_empty_input() -> None:
    with pytest.raises(EmptyImageError):
        decode_image(b"")


def test_text_is_not_an_image() -> None:
    with pytest.raises(UnsupportedImageError, match="not an image"):
        decode_image(b"name,identity\nAnn_Veneman_0001.jpg,Ann_Veneman\n")


def test_gif_is_refused(photo: Image.Image) -> None:
    with pytest.raises(UnsupportedImageError, match="GIF"):
        decode_image(_encode(photo, "GIF"))


def test_truncated_jpeg(photo_bytes: bytes) -> None:
    with pytest.raises(TruncatedImageError):
        decode_image(photo_bytes[: len(photo_bytes) // 2])


def test_truncated_png(photo: Image.Image) -> None:
    data = _encode(photo, "PNG")
    with pytest.raises(TruncatedImageError):
        decode_image(data[: len(data) // 2])


def test_corrupt_jpeg(photo_bytes: bytes) -> None:
    # Keep the header, replace the entropy-coded data with garbage markers.
    header_end = photo_bytes.index(b"\xff\xda")
    data = photo_bytes[:header_end] + b"\xff\xda" + b"\xff\x00\x13" * 200
    with pytest.raises(CorruptImageError):
        decode_image(data)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def test_png_bomb_is_refused_from_its_header() -> None:
    # A 100000 x 100000 RGB PNG whose data is a few kB of compressed zeros:
    # decoding it would need 30 GB. The header alone must get it refused.
    width = height = 100_000
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" * (1 + 3 * width)
    compressor = zlib.compressobj(9)
    payload = compressor.compress(row * 20) + compressor.flush()
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", payload)
        + _png_chunk(b"IEND", b"")
    )
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb)


def test_pixel_limit_is_checked_before_decoding(photo_bytes: bytes) -> None:
    with pytest.raises(ImageTooLargeError, match="62500"):
        decode_image(photo_bytes, max_pixels=250 * 250 - 1)
    assert decode_image(photo_bytes, max_pixels=250 * 250).shape == (250, 250, 3)


def test_pixel_limit_default_comes_from_settings(
    photo_bytes: bytes, monkeypatch
) -> None:
    from facefed.core.settings import get_core_settings

    monkeypatch.setenv("FACEFED_MAX_IMAGE_PIXELS", "1000")
    get_core_settings.cache_clear()
    with pytest.raises(ImageTooLargeError):
        decode_image(photo_bytes)


def test_byte_limit(test_data: Path, photo_bytes: bytes) -> None:
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(photo_bytes, max_bytes=len(photo_bytes) - 1)
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(test_data / PHOTO, max_bytes=100)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="No image file"):
        decode_image(tmp_path / "absent.jpg")


def test_bad_limits_are_refused(photo_bytes: bytes) -> None:
    with pytest.raises(ValueError, match="positive"):
        decode_image(photo_bytes, max_pixels=0)


def test_ppm_test_image_decodes(test_data: Path) -> None:
    decoded = decode_image(test_data / "landmarks" / "takeo.ppm")
    assert decoded.ndim == 3 and decoded.shape[2] == 3


_REAL_JPEG = (Path(__file__).parents[1] / "data" / PHOTO).read_bytes()
_SMALL = Image.open(io.BytesIO(_REAL_JPEG)).resize((64, 64))
_REAL_IMAGES = [_REAL_JPEG] + [_encode(_SMALL, fmt) for fmt in ("PNG", "WEBP", "BMP")]


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from(_REAL_IMAGES),
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
        min_size=1,
        max_size=12,
    ),
    cut=st.floats(0.05, 1.0),
)
def test_damaged_real_images_never_crash(
    base: bytes, edits: list[tuple[float, int]], cut: float
) -> None:
    # Flip bytes of a real photo (header included) and cut it short: the
    # result decodes to a valid array or raises one of facefed's image errors.
    data = bytearray(base[: max(1, int(len(base) * cut))])
    for where, value in edits:
        data[int(where * len(data))] = value
    try:
        decoded = decode_image(bytes(data))
    except ImageError:
        return
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3
