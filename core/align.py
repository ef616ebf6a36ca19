"""Warp a face onto a fixed 5-point template: the chips embedding networks expect.

Both geometries fit a similarity transform (rotation, uniform scale,
translation) to the five landmarks by least squares, in closed form (Umeyama,
"Least-squares estimation of transformation parameters between two point
patterns", IEEE TPAMI 13(4), 1991), and warp with bilinear interpolation.

- `align_arcface`: the 112x112 template of ArcFace / InsightFace models
  (Deng et al., "ArcFace", CVPR 2019).
- `align_dlib_chip`: the 150x150 chip (padding 0.25) dlib's ResNet face
  descriptor was trained on, as `dlib.get_face_chip` cuts it. dlib fits its
  own 5 points (four eye corners and the base of the nose) to its mean face;
  facefed's points are eye centres, nose tip and mouth corners, so the
  template below gives where those points fall, on average, in dlib's chips.
  It was measured on 479 LFW photos: dlib's 68-point model gave the points
  (eye centre = mean of the six eye-contour points, nose tip = point 31,
  mouth corners = points 49 and 55, 1-based), mapped into each photo's chip
  by the transform `dlib.get_face_chip_details` chose for its 5-point shape.
  The chip is then laid out exactly as dlib lays it out (fit from template to
  image, chip centred on the fitted centre, corner pixels on the chip's
  edge), which `tests/core/test_core_align.py` checks against dlib itself.
- `align_dlib_chip_from_dlib5`: the same chip from dlib's OWN 5 points (as
  dlib's `shape_predictor_5_face_landmarks.dat` returns them), which
  reproduces `dlib.get_face_chip` pixel for pixel up to interpolation
  (`tests/core/test_core_align_dlib5.py`). Its template is dlib's reference
  for those points, recovered from dlib's behaviour: on 288 LFW photos
  (deep-funnelled set, one face each), the template T that makes the
  least-squares similarity from T to each photo's points, mapped into dlib's
  chip by dlib's own transform, the identity (the fit dlib must have made).
  The recovered T reproduces dlib's transforms to within 0.0025 face units
  (under 0.4 pixel at size 150; 0.05 pixel RMS); fitting the other way
  round (image to template) cannot explain dlib's chips (0.07 units off).
"""

import logging
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from facefed.core.errors import ConfigurationError, FaceError
from facefed.core.types import FloatArray, ImageArray

logger = logging.getLogger(__name__)

Geometry = Literal["arcface", "dlib"]

# ArcFace's 5-point template for 112x112 chips, in facefed's landmark order.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# Where facefed's 5 points sit in dlib's face chip, in dlib's normalised face
# units (the chip without padding spans [0, 1]); measured as the module
# docstring describes. dlib's own template is not centred at x = 0.5 either.
DLIB_CHIP_TEMPLATE = np.array(
    [
        [0.22375, 0.21503],
        [0.75628, 0.21482],
        [0.48785, 0.51050],
        [0.24871, 0.80354],
        [0.73078, 0.80575],
    ],
    dtype=np.float64,
)

# dlib's reference positions of its own 5-point model's points, in dlib's
# order (outer then inner corner of the eye on the image's right, outer then
# inner corner of the eye on the image's left, base of the nose), in the same
# normalised face units; recovered as the module docstring describes.
DLIB5_TEMPLATE = np.array(
    [
        [0.862163, 0.208834],
        [0.649306, 0.228973],
        [0.117969, 0.208220],
        [0.330327, 0.230561],
        [0.490207, 0.627921],
    ],
    dtype=np.float64,
)

# Shrinking by more than this with bilinear sampling would alias; such chips
# are cut from a pre-shrunk copy of the face region instead (dlib does the
# same with an image pyramid).
_MAX_BILINEAR_SHRINK = 1.5

Matrix = npt.NDArray[np.float64]


def similarity_transform(
    source: npt.ArrayLike,
    target: npt.ArrayLike,
    *,
    weights: npt.ArrayLike | None = None,
) -> Matrix:
    """Least-squares similarity transform mapping `source` points onto `target`.

    Umeyama (1991), weighted: minimises sum_i w_i |s R x_i + t - y_i|^2 over
    rotations R (no reflection), scales s > 0 and translations t.

    Args:
        source: (N, 2) points, N >= 2.
        target: (N, 2) points.
        weights: (N,) non-negative weights; equal weights when None.

    Returns:
        The 2x3 matrix [s R | t].

    Raises:
        FaceError: Degenerate points (all in one place) or bad shapes.
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise FaceError(
            f"Need two (N, 2) point sets of one shape; got {src.shape} and {dst.shape}."
        )
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise FaceError("Landmarks must be finite numbers.")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(src),) or np.any(w < 0) or w.sum() <= 0:
        raise FaceError(f"Weights must be {len(src)} non-negative numbers.")
    w = w / w.sum()

    src_mean = w @ src
    dst_mean = w @ dst
    src_c = src - src_mean
    dst_c = dst - dst_mean
    variance = float(w @ np.sum(src_c**2, axis=1))
    if variance < 1e-12:
        raise FaceError("The landmarks are all in one place; cannot align.")
    covariance = (dst_c * w[:, None]).T @ src_c
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0  # keep a rotation, never a reflection
    rotation = u @ np.diag(sign) @ vt
    scale = float(np.sum(singular * sign)) / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def arcface_template(size: int = 112) -> FloatArray:
    """ArcFace's template scaled to a `size` x `size` chip."""
    return (ARCFACE_TEMPLATE_112 * (size / 112.0)).astype(np.float32)


def dlib_chip_template(size: int = 150, padding: float = 0.25) -> FloatArray:
    """The 5 facefed points in a dlib chip of `size` pixels with `padding`.

    Coordinates are continuous chip coordinates (0 at the chip's left edge,
    `size` at its right), as dlib places its template.
    """
    scaled = (padding + DLIB_CHIP_TEMPLATE) / (1.0 + 2.0 * padding) * size
    return scaled.astype(np.float32)


def arcface_matrix(landmarks: npt.ArrayLike, *, size: int = 112) -> Matrix:
    """The 2x3 image-to-chip matrix `align_arcface` warps with."""
    _check_size(size)
    points = _check_landmarks(landmarks)
    return similarity_transform(points, arcface_template(size))


def dlib_chip_matrix(
    landmarks: npt.ArrayLike, *, size: int = 150, padding: float = 0.25
) -> Matrix:
    """The 2x3 image-to-chip matrix `align_dlib_chip` warps with.

    As dlib does, the similarity is fitted from the template to the image
    (not the reverse: with noisy points the two least-squares fits differ),
    and the chip's corner pixels sit on the edges of the fitted square, so
    chip pixel u = (size - 1) / size times the continuous chip coordinate.
    """
    return _dlib_layout_matrix(DLIB_CHIP_TEMPLATE, landmarks, size, padding)


def dlib5_chip_matrix(
    dlib_points: npt.ArrayLike, *, size: int = 150, padding: float = 0.25
) -> Matrix:
    """The 2x3 image-to-chip matrix `align_dlib_chip_from_dlib5` warps with.

    The layout of `dlib_chip_matrix`, with dlib's own 5-point reference
    (`DLIB5_TEMPLATE`) in place of facefed's points.
    """
    return _dlib_layout_matrix(DLIB5_TEMPLATE, dlib_points, size, padding)


def _dlib_layout_matrix(
    template: Matrix, landmarks: npt.ArrayLike, size: int, padding: float
) -> Matrix:
    # dlib's chip layout for a template in normalised face units: fit from
    # the padded, scaled template to the image, then invert; corner pixels
    # on the square's edges.
    _check_size(size)
    if not 0.0 <= padding <= 4.0:
        raise ConfigurationError(
            f"The chip padding must be between 0 and 4; got {padding}."
        )
    points = _check_landmarks(landmarks)
    chip_template = (padding + template) / (1.0 + 2.0 * padding) * size
    chip_to_image = _homogeneous(similarity_transform(chip_template, points))
    pixel_grid = np.diag([(size - 1) / size, (size - 1) / size, 1.0])
    return (pixel_grid @ np.linalg.inv(chip_to_image))[:2]


def align_arcface(
    image: ImageArray, landmarks: npt.ArrayLike, *, size: int = 112
) -> ImageArray:
    """Cut the ArcFace chip: `size` x `size` RGB, landmarks on ArcFace's template.

    Args:
        image: RGB uint8 (H, W, 3).
        landmarks: (5, 2) in facefed's order (see `facefed.core.types`).
        size: Chip side in pixels; the template scales with it.

    Returns:
        The chip, RGB uint8; pixels outside the image are black.
    """
    return warp_chip(image, arcface_matrix(landmarks, size=size), size)


def align_dlib_chip(
    image: ImageArray,
    landmarks: npt.ArrayLike,
    *,
    size: int = 150,
    padding: float = 0.25,
) -> ImageArray:
    """Cut the chip dlib's ResNet face descriptor expects (150 x 150, padding 0.25).

    Args:
        image: RGB uint8 (H, W, 3).
        landmarks: (5, 2) in facefed's order.
        size: Chip side in pixels.
        padding: Extra border around the face, as a fraction of the face
            size, on each side (dlib's `padding`).

    Returns:
        The chip, RGB uint8; pixels outside the image are black.
    """
    return warp_chip(
        image, dlib_chip_matrix(landmarks, size=size, padding=padding), size
    )


def align_dlib_chip_from_dlib5(
    image: ImageArray,
    dlib_points: npt.ArrayLike,
    *,
    size: int = 150,
    padding: float = 0.25,
) -> ImageArray:
    """Cut dlib's face chip from dlib's own 5-point landmarks.

    Equals `dlib.get_face_chip(image, shape, size, padding)` for the
    `shape` dlib's 5-point model gives, up to interpolation, without calling
    dlib: on 149 LFW photos the mean absolute difference was 0.51 gray levels
    (at most 1.07 for one chip) at 150/0.25, 0.72 (at most 1.63) at 200/0.4.

    Args:
        image: RGB uint8 (H, W, 3).
        dlib_points: (5, 2) x, y in dlib's 5-point order, as
            `dlib.shape_predictor` with `shape_predictor_5_face_landmarks.dat`
            returns them (not facefed's order: see `DLIB5_TEMPLATE`).
        size: Chip side in pixels.
        padding: Extra border around the face, as a fraction of the face
            size, on each side (dlib's `padding`).

    Returns:
        The chip, RGB uint8; pixels outside the image are black.
    """
    return warp_chip(
        image, dlib5_chip_matrix(dlib_points, size=size, padding=padding), size
    )


def align(
    image: ImageArray, landmarks: npt.ArrayLike, *, geometry: Geometry
) -> ImageArray:
    """Cut the default chip of a geometry: `arcface` (112) or `dlib` (150)."""
    if geometry == "arcface":
        return align_arcface(image, landmarks)
    if geometry == "dlib":
        return align_dlib_chip(image, landmarks)
    raise ConfigurationError(
        f"Unknown alignment geometry {geometry!r}; known: arcface, dlib."
    )


def warp_chip(image: ImageArray, matrix: Matrix, size: int) -> ImageArray:
    """Warp `image` by the 2x3 image-to-chip `matrix` into a square chip.

    When the chip shrinks the face by more than 1.5x, the face region is
    first reduced with area averaging, so fine texture does not alias.
    """
    _check_image(image)
    shrink = 1.0 / float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if shrink > _MAX_BILINEAR_SHRINK:
        image, matrix = _prereduce(image, matrix, size, shrink)
    chip = cv2.warpAffine(
        image,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return np.ascontiguousarray(chip, dtype=np.uint8)


def _prereduce(
    image: ImageArray, matrix: Matrix, size: int, shrink: float
) -> tuple[ImageArray, Matrix]:
    # Crop the part of the image the chip covers (plus a margin), shrink it
    # by `shrink` with area averaging, and re-express the matrix on the crop.
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    to_image = np.linalg.inv(_homogeneous(matrix))
    covered = corners @ to_image[:2, :2].T + to_image[:2, 2]
    height, width = image.shape[:2]
    x0 = int(np.clip(np.floor(covered[:, 0].min()) - 2, 0, width - 1))
    y0 = int(np.clip(np.floor(covered[:, 1].min()) - 2, 0, height - 1))
    x1 = int(np.clip(np.ceil(covered[:, 0].max()) + 3, x0 + 1, width))
    y1 = int(np.clip(np.ceil(covered[:, 1].max()) + 3, y0 + 1, height))
    crop = image[y0:y1, x0:x1]
    new_w = max(1, round((x1 - x0) / shrink))
    new_h = max(1, round((y1 - y0) / shrink))
    reduced = cv2.resize(crop, (new_w, new_h), interpolation=cv2.INTER_AREA)
    # reduced pixel p <-> crop pixel (p + 0.5) * f - 0.5, per axis.
    fx, fy = (x1 - x0) / new_w, (y1 - y0) / new_h
    reduced_to_image = np.array(
        [[fx, 0.0, 0.5 * fx - 0.5 + x0], [0.0, fy, 0.5 * fy - 0.5 + y0], [0, 0, 1]]
    )
    return reduced, (_homogeneous(matrix) @ reduced_to_image)[:2]


def _homogeneous(matrix: Matrix) -> Matrix:
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


def _check_landmarks(landmarks: npt.ArrayLike) -> Matrix:
    if landmarks is None:
        raise FaceError("This face has no landmarks; it cannot be aligned.")
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise FaceError(f"Alignment needs (5, 2) landmarks; got shape {points.shape}.")
    if not np.all(np.isfinite(points)):
        raise FaceError("Landmarks must be finite numbers.")
    if float(np.ptp(points, axis=0).max()) < 1e-3:
        raise FaceError("The landmarks are all in one place; cannot align.")
    return points


def _check_size(size: int) -> None:
    if not 16 <= size <= 1024:
        raise ConfigurationError(
            f"The chip size must be between 16 and 1024 pixels; got {size}."
        )


def _check_image(image: ImageArray) -> None:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        raise FaceError(
            "Alignment needs an RGB uint8 (H, W, 3) image; got "
            f"{getattr(image, 'dtype', type(image))} "
            f"{getattr(image, 'shape', '')}."
        )
