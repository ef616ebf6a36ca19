"""Helpers the PyTorch detectors share: weight loading and Face lists."""

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from facefed.core.detection.base import make_face, sort_by_score
from facefed.core.errors import ConfigurationError, ModelError
from facefed.core.settings import get_core_settings
from facefed.core.types import Face

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def apply_thread_setting() -> None:
    """Give torch the thread count of FACEFED_THREADS, when one is set.

    torch's thread pool is process-wide, so this affects every torch model in
    the process; 0 (the default) leaves torch's own choice alone.
    """
    import torch

    threads = get_core_settings().threads
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.debug("torch uses %d threads (FACEFED_THREADS)", threads)


def select_device(preferred: str | None = None) -> "torch.device":
    """The torch device a detector runs on: CUDA when torch sees a GPU, else CPU.

    Args:
        preferred: "cpu" or "cuda" to force one; None picks automatically.

    Raises:
        ConfigurationError: If ``preferred`` is another value, or "cuda" is
            asked for without a GPU.
    """
    import torch

    if preferred not in (None, "cpu", "cuda"):
        raise ConfigurationError(
            f"device must be 'cpu', 'cuda' or None; got {preferred!r}."
        )
    if preferred == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device='cuda' was asked for but torch sees no GPU.")
    if preferred == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preferred is None:
        _log_cpu_fallback()
    return torch.device("cpu")


@lru_cache(maxsize=1)
def _log_cpu_fallback() -> None:
    """Say once per process that the detector networks fall back to the CPU."""
    logger.info("No CUDA GPU visible to torch; detector networks run on the CPU.")


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
        scores: (N,) confidences in [0, 1].
        landmarks: (N, 5, 2) in facefed's order, or None.

    Returns:
        The faces, highest score first.
    """
    faces = [
        make_face(
            boxes[i], float(scores[i]), None if landmarks is None else landmarks[i]
        )
        for i in range(len(boxes))
    ]
    return sort_by_score(faces)
