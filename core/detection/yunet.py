"""YuNet, the default face detector: a tiny anchor-free CNN run by OpenCV.

YuNet (Wu, Peng and Yu, "YuNet: A Tiny Millisecond-level Face Detector",
Machine Intelligence Research 2023) gives a box, a score and five landmarks
per face. The ONNX file with a dynamic input size ships with facefed
(`assets/yunet/`, Apache-2.0); `cv2.FaceDetectorYN` decodes its outputs and
runs non-maximum suppression.
"""

import logging
import threading
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np

from facefed.core.detection.base import check_image, make_face, sort_by_score
from facefed.core.errors import ConfigurationError, ModelError
from facefed.core.types import Face, ImageArray

logger = logging.getLogger(__name__)

YUNET_FILE = "yunet_n_dynamic.onnx"


def yunet_model_path() -> Path:
    """Path of the YuNet ONNX file shipped inside the package."""
    resource = files("facefed.core.detection").joinpath("assets", "yunet", YUNET_FILE)
    return Path(str(resource))


class YuNetDetector:
    """Face detector backed by YuNet through `cv2.FaceDetectorYN`.

    YuNet's five points are, in the image, the eye on the left, the eye on the
    right, the nose tip, the left and the right mouth corner (its own names,
    "right eye" first, are from the subject's point of view), which is
    already facefed's order; no reordering is needed.

    Images whose longer side exceeds `max_side` are shrunk before detection
    and the results mapped back to the original pixels: the network's cost
    grows with the pixel count, and faces smaller than about 10 pixels after
    shrinking are missed, so raise `max_side` (or set None) for crowds.
    """

    name = "yunet"

    def __init__(
        self,
        *,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        max_side: int | None = 1600,
        model_path: Path | None = None,
    ) -> None:
        """Load the network.

        Args:
            score_threshold: Faces scoring below this are dropped.
            nms_threshold: IoU above which the weaker of two boxes is dropped.
            max_side: Longest image side the network sees; None for no limit.
            model_path: Another YuNet ONNX file; defaults to the shipped one.

        Raises:
            ConfigurationError: A threshold outside [0, 1] or a bad `max_side`.
            ModelError: The model file cannot be loaded.
        """
        for label, value in (("score", score_threshold), ("nms", nms_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(
                    f"YuNet's {label} threshold must be in [0, 1]; got {value}."
                )
        if max_side is not None and max_side < 32:
            raise ConfigurationError(
                f"YuNet's max_side must be at least 32 pixels; got {max_side}."
            )
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        path = model_path or yunet_model_path()
        if not path.is_file():
            raise ModelError(f"The YuNet model file is missing: {path}.")
        # OpenCV 5 warns on every load that its new graph engine ignores the
        # target that FaceDetectorYN sets internally; it is noise to a user.
        previous_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), score_threshold, nms_threshold, 5000
            )
        except cv2.error as error:
            raise ModelError(
                f"OpenCV cannot load YuNet from {path}: {error}"
            ) from error
        finally:
            cv2.utils.logging.setLogLevel(previous_level)
        # FaceDetectorYN keeps per-size state; one call at a time per instance.
        self._lock = threading.Lock()

    def detect(self, image: ImageArray) -> list[Face]:
        """Detect faces; see `FaceDetector.detect`."""
        check_image(image)
        scale = self._scale_for(image)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        if scale != 1.0:
            size = (
                max(1, round(image.shape[1] * scale)),
                max(1, round(image.shape[0] * scale)),
            )
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        with self._lock:
            self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._net.detect(bgr)
        if rows is None:
            return []
        return sort_by_score([self._to_face(row, scale) for row in rows])

    def _scale_for(self, image: ImageArray) -> float:
        longest = max(image.shape[0], image.shape[1])
        if self.max_side is None or longest <= self.max_side:
            return 1.0
        return self.max_side / longest

    @staticmethod
    def _to_face(row: np.ndarray, scale: float) -> Face:
        # Row: x, y, w, h, five landmark x/y pairs, score (in network pixels).
        x, y, w, h = (float(value) / scale for value in row[:4])
        landmarks = np.asarray(row[4:14], dtype=np.float64).reshape(5, 2) / scale
        return make_face(np.array([x, y, x + w, y + h]), float(row[14]), landmarks)
