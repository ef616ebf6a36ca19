"""Plain data types shared by every stage of the face pipeline.

Images are numpy arrays of shape (height, width, 3), dtype uint8, in RGB order.
Five facial landmarks always come in this order, as seen in the image (not
from the subject's point of view):

    0. centre of the eye on the image's left (the subject's right eye)
    1. centre of the eye on the image's right (the subject's left eye)
    2. nose tip
    3. mouth corner on the image's left
    4. mouth corner on the image's right

This is the order of the ArcFace alignment template, so landmarks can be
warped onto it without reordering.
"""

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]

LANDMARK_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: (4,) float32 array, x1, y1, x2, y2 in pixels of the input image.
        score: Detector confidence in [0, 1].
        landmarks: (5, 2) float32 array of x, y in the order documented above,
            or None for a detector that gives none.
    """

    box: FloatArray
    score: float
    landmarks: FloatArray | None = None

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return float(self.box[3] - self.box[1])


@dataclass(frozen=True)
class QualityReport:
    """Result of the quality gate.

    Attributes:
        passed: True when every check passed.
        reasons: One sentence per failed check; empty when passed.
        metrics: The measured values, for display and logging.
    """

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LivenessResult:
    """Result of a presentation attack check.

    Attributes:
        is_live: The decision at the checker's threshold.
        score: Fused liveness score in [0, 1]; higher means more likely live.
        threshold: The threshold the decision used.
        reasons: Sentences explaining a refusal; empty when live.
        cues: Score of each individual cue, by name.
    """

    is_live: bool
    score: float
    threshold: float
    reasons: list[str] = field(default_factory=list)
    cues: dict[str, float] = field(default_factory=dict)
