"""The interface every face detector implements, and helpers they share."""

from typing import Protocol, runtime_checkable

import numpy as np

from facefed.core.errors import ImageError
from facefed.core.types import Face, ImageArray


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in an RGB image.

    Attributes:
        name: Short name of the detector, as given to `create_detector`.
    """

    name: str

    def detect(self, image: ImageArray) -> list[Face]:
        """Return the faces in `image`, sorted by score, highest first.

        Args:
            image: RGB uint8 array of shape (H, W, 3).

        Returns:
            Faces with boxes (and landmarks where the detector gives them) in
            pixel coordinates of `image`.
        """
        ...


def check_image(image: ImageArray) -> None:
    """Refuse anything but an RGB uint8 (H, W, 3) array with a clear sentence.

    Args:
        image: The array a detector was given.

    Raises:
        ImageError: Wrong type, dtype, shape, or an empty image.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"A detector needs a numpy array; got {type(image).__name__}.")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            "A detector needs an RGB uint8 array of shape (H, W, 3); got dtype "
            f"{image.dtype} and shape {image.shape}."
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"The image is empty: shape {image.shape}.")


def make_face(
    box: np.ndarray, score: float, landmarks: np.ndarray | None = None
) -> Face:
    """Build a Face with float32 arrays of the documented shapes.

    Args:
        box: x1, y1, x2, y2 in pixels.
        score: Confidence in [0, 1]; clipped into that range.
        landmarks: (5, 2) x, y in facefed's landmark order, or None.
    """
    return Face(
        box=np.asarray(box, dtype=np.float32).reshape(4),
        score=float(min(max(score, 0.0), 1.0)),
        landmarks=None
        if landmarks is None
        else np.asarray(landmarks, dtype=np.float32).reshape(5, 2),
    )


def sort_by_score(faces: list[Face]) -> list[Face]:
    """Sort faces by score, highest first (ties keep their order)."""
    return sorted(faces, key=lambda face: -face.score)
