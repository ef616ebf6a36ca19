"""Context crops around a face box, the way the Silent-Face models were trained."""

import math

import cv2
import numpy as np

from facefed.core.errors import FaceError
from facefed.core.types import FloatArray, ImageArray


def scaled_box(
    box: FloatArray, image_shape: tuple[int, ...], scale: float
) -> tuple[int, int, int, int]:
    """Grow a face box about its centre and keep it inside the image.

    The factor is first reduced so the grown box fits in the image at all, then
    the box is shifted (not cut) back inside the borders, so the crop keeps the
    aspect ratio of the face box. This is the cropping rule of the
    Silent-Face-Anti-Spoofing training data (minivision-ai, 2020).

    Args:
        box: x1, y1, x2, y2 in pixels.
        image_shape: Shape of the image, (height, width, ...).
        scale: Factor applied to the box width and height (2.7 or 4.0 for the
            shipped MiniFASNet models).

    Returns:
        Integer x1, y1, x2, y2 (exclusive end) of the crop.

    Raises:
        FaceError: If the box is empty or lies outside the image.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    box_w, box_h = x2 - x1, y2 - y1
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise FaceError(f"The face box {[x1, y1, x2, y2]} holds non-finite values.")
    if box_w <= 1 or box_h <= 1 or x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise FaceError(
            f"The face box {[round(v, 1) for v in (x1, y1, x2, y2)]} is empty or "
            f"outside the {width}x{height} image."
        )
    scale = min(scale, (height - 1) / box_h, (width - 1) / box_w)
    new_w, new_h = box_w * scale, box_h * scale
    centre_x, centre_y = x1 + box_w / 2, y1 + box_h / 2
    left = min(max(centre_x - new_w / 2, 0.0), width - 1 - new_w)
    top = min(max(centre_y - new_h / 2, 0.0), height - 1 - new_h)
    return (
        int(left),
        int(top),
        int(left + new_w) + 1,
        int(top + new_h) + 1,
    )


def context_crop(
    image: ImageArray, box: FloatArray, *, scale: float, size: int = 80
) -> ImageArray:
    """Cut the scaled box out of an RGB image and resize it to `size` x `size`.

    Args:
        image: RGB uint8 image.
        box: Face box x1, y1, x2, y2.
        scale: Context factor (see `scaled_box`).
        size: Side of the square output.

    Returns:
        The crop, RGB uint8, `size` x `size`.
    """
    x1, y1, x2, y2 = scaled_box(box, image.shape, scale)
    patch = image[y1:y2, x1:x2]
    resized = cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(resized)
