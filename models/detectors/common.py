"""Helpers the PyTorch detectors share: input checks, weight loading, Face lists."""

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

from facefed.core.errors import ImageError, ModelError
from facefed.core.types import Face, ImageArray

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def check_rgb_image(image: object) -> ImageArray:
    """Return ``image`` if it is an RGB uint8 array of shape (H, W, 3).

    Raises:
        ImageError: If the array has another type, dtype or shape, or is empty.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(
            f"Expected an RGB image as a numpy array; got {type(image).__name__}."
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            "Expected an RGB uint8 image of shape (H, W, 3); got dtype "
            f"{image.dtype} and shape {image.shape}."
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"The image is empty: shape {image.shape}.")
    return image


def load_state_dict(path: Path) -> dict[str, object]:
    """Load a PyTorch state dict from ``path``, dropping a DataParallel prefix.

    Raises:
        ModelError: If the file is missing or is not a state dict.
    """
    import torch

    if not path.is_file():
        raise ModelError(f"Model weights not found at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt file
        raise ModelError(f"Cannot read model weights {path}: {error}") from error
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict.")
    prefix = "module."
    return {
        (key[len(prefix) :] if key.startswith(prefix) else key): value
        for key, value in state.items()
    }


def faces_from_arrays(
    boxes: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    landmarks: npt.NDArray[np.floating] | None,
) -> list[Face]:
    """Build Face objects sorted by descending score.

    Args:
        boxes: (N, 4) x1, y1, x2, y2.
        scores: (N,) confidences.
        landmarks: (N, 5, 2) in facefed's order, or None.

    Returns:
        The faces, highest score first.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    faces = []
    for index in order:
        points = None
        if landmarks is not None:
            points = np.asarray(landmarks[index], dtype=np.float32).reshape(5, 2)
        faces.append(
            Face(
                box=np.asarray(boxes[index], dtype=np.float32).reshape(4),
                score=float(scores[index]),
                landmarks=points,
            )
        )
    return faces
