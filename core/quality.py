"""Face quality gate: size, sharpness, exposure and head pose from five landmarks.

The gate refuses faces an embedding network would encode badly, with one
plain sentence per failed check, so an operator can ask for a better photo.
The checks follow the spirit of ISO/IEC 29794-5 (face image quality) and the
capture guidance of ISO/IEC 19794-5 (enough resolution, focus, even exposure,
near-frontal pose), with thresholds chosen for recognition, not passports.

Sharpness and exposure are measured on the aligned 112x112 ArcFace chip
(central 80x88 pixels), so they do not depend on the face's size in the photo
or on the background. Sharpness is the variance of the Laplacian (Pech-Pacheco
et al., "Diatom autofocusing in brightfield microscopy: a comparative study",
ICPR 2000). On the LFW test photos the sharp faces score 70 or more (5th
percentile), the same faces blurred with a Gaussian of sigma 1.5 pixels score
a median of 36 and with sigma 3 at most 15; the default threshold is 40.
"""

import logging
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from facefed.core.align import align_arcface
from facefed.core.errors import ConfigurationError
from facefed.core.types import Face, ImageArray, QualityReport

logger = logging.getLogger(__name__)

# Pose model, see `estimate_pose`. Ratios of a generic adult face: nose-tip
# protrusion in front of the eyes over half the distance between the eyes,
# and over the eye-to-mouth height; the nose tip's fraction of the way from
# the eyes' midpoint to the mouth's midpoint in a frontal face (the ArcFace
# template's value).
_NOSE_DEPTH_OVER_HALF_EYES = 0.9
_NOSE_DEPTH_OVER_EYE_MOUTH = 0.4
_FRONTAL_NOSE_FRACTION = 0.494

_CHIP_CENTRE = (slice(16, 104), slice(16, 96))
_DARK, _BRIGHT = 5, 250


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality gate; a check passes at its threshold.

    Attributes:
        min_face_size: Shorter side of the face box, in pixels. Below about 40
            pixels recognition accuracy drops quickly.
        min_eye_distance: Distance between the eye centres, in pixels.
        min_detection_score: Detector confidence.
        min_sharpness: Variance of the Laplacian on the aligned chip.
        min_brightness: Mean gray level of the face (0-255).
        max_brightness: Mean gray level of the face (0-255).
        max_clipped_fraction: Share of face pixels that are black (<= 5) or
            blown out (>= 250).
        max_yaw: Head turn left or right, in degrees.
        max_pitch: Head tilt up or down, in degrees.
        max_roll: Head tilt sideways (in the image plane), in degrees.
    """

    min_face_size: float = 40.0
    min_eye_distance: float = 20.0
    min_detection_score: float = 0.5
    min_sharpness: float = 40.0
    min_brightness: float = 40.0
    max_brightness: float = 220.0
    max_clipped_fraction: float = 0.25
    max_yaw: float = 40.0
    max_pitch: float = 30.0
    max_roll: float = 30.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ConfigurationError(
                    f"Quality setting {name} must be a non-negative number; "
                    f"got {value}."
                )
        if self.min_brightness >= self.max_brightness:
            raise ConfigurationError(
                "min_brightness must be below max_brightness; got "
                f"{self.min_brightness} and {self.max_brightness}."
            )
        if self.max_clipped_fraction > 1 or self.min_detection_score > 1:
            raise ConfigurationError(
                "max_clipped_fraction and min_detection_score are fractions in "
                f"[0, 1]; got {self.max_clipped_fraction} and "
                f"{self.min_detection_score}."
            )


@dataclass(frozen=True)
class HeadPose:
    """Approximate head pose, in degrees.

    Attributes:
        yaw: Positive when the nose points towards the image's right.
        pitch: Positive when the face looks down.
        roll: Positive when the eye line rises towards the image's left
            (the head tilts clockwise as seen in the image).
    """

    yaw: float
    pitch: float
    roll: float


def estimate_pose(landmarks: np.ndarray) -> HeadPose:
    """Estimate yaw, pitch and roll from the five landmarks.

    Roll is the angle of the eye line. With roll undone, the face's midline
    runs from the eyes' midpoint to the mouth's midpoint; the nose tip, which
    stands in front of that plane, moves off the midline by depth x sin(yaw)
    and along it by depth x sin(pitch), while the eye distance and the
    eye-to-mouth height shrink by cos(yaw) and cos(pitch). So
    tan(yaw) = offset / (half eye distance x ratio) and likewise for pitch,
    with generic face ratios.

    FIXME: one generic face shape is assumed; a long or flat nose reads as a
    few degrees of extra or missing yaw/pitch, and beyond about 50 degrees
    the landmarks themselves are unreliable. Detectors also disagree on where
    the nose tip is: on the LFW test photos YuNet's gives a median pitch of
    +8 degrees (dlib's 68-point nose tip about 0), well inside `max_pitch`
    but a bias all the same.

    Args:
        landmarks: (5, 2) in facefed's order.

    Returns:
        The pose in degrees.
    """
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye_l, eye_r, nose, mouth_l, mouth_r = points
    eye_vector = eye_r - eye_l
    roll = math.degrees(math.atan2(eye_vector[1], eye_vector[0]))

    # Coordinates in the face's own frame: origin between the eyes, x along
    # the eye line, y perpendicular to it, towards the mouth.
    eye_mid = (eye_l + eye_r) / 2
    half_eyes = max(float(np.linalg.norm(eye_vector)) / 2, 1e-6)
    across = eye_vector / (2 * half_eyes)
    down = np.array([-across[1], across[0]])
    nose_x, nose_y = float((nose - eye_mid) @ across), float((nose - eye_mid) @ down)
    mouth_mid = (mouth_l + mouth_r) / 2 - eye_mid
    mouth_x, mouth_y = float(mouth_mid @ across), max(float(mouth_mid @ down), 1e-6)

    # Yaw: the nose's offset from the eye-mouth midline at the nose's height
    # (not from the eyes' midpoint alone, so a slanted face is not "turned").
    offset = nose_x - mouth_x * nose_y / mouth_y
    yaw = math.degrees(math.atan(offset / (half_eyes * _NOSE_DEPTH_OVER_HALF_EYES)))
    fraction = nose_y / mouth_y
    pitch = math.degrees(
        math.atan((fraction - _FRONTAL_NOSE_FRACTION) / _NOSE_DEPTH_OVER_EYE_MOUTH)
    )
    return HeadPose(yaw=yaw, pitch=pitch, roll=roll)


class QualityGate:
    """Measures a face and says whether it is good enough to embed."""

    def __init__(self, config: QualityConfig | None = None) -> None:
        """Use `config`, or the documented defaults."""
        self.config = config or QualityConfig()

    def assess(self, image: ImageArray, face: Face) -> QualityReport:
        """Measure `face` in `image` and check it against the thresholds.

        Args:
            image: RGB uint8 (H, W, 3), the image the face was found in.
            face: The detected face; without landmarks only size, score and
                exposure of the box can be checked, and a reason says so.

        Returns:
            The report: passed, one sentence per failed check, and metrics.
        """
        cfg = self.config
        metrics: dict[str, float] = {
            "face_size": min(face.width, face.height),
            "detection_score": face.score,
        }
        reasons: list[str] = []
        if metrics["face_size"] < cfg.min_face_size:
            reasons.append(
                f"The face is too small: {metrics['face_size']:.0f} pixels, at "
                f"least {cfg.min_face_size:.0f} are needed."
            )
        if face.score < cfg.min_detection_score:
            reasons.append(
                f"The detector is unsure this is a face (score {face.score:.2f}, "
                f"at least {cfg.min_detection_score:.2f} is needed)."
            )

        if face.landmarks is None:
            gray = _box_gray(image, face)
            reasons.append(
                "The face has no landmarks, so its pose and alignment cannot be "
                "checked."
            )
        else:
            gray = _chip_gray(image, face.landmarks)
            reasons += self._geometry(face.landmarks, metrics)
        reasons += self._appearance(gray, metrics)

        report = QualityReport(passed=not reasons, reasons=reasons, metrics=metrics)
        logger.debug("Quality %s: %s", "passed" if report.passed else "failed", metrics)
        return report

    def _geometry(self, landmarks: np.ndarray, metrics: dict[str, float]) -> list[str]:
        cfg = self.config
        reasons = []
        eye_distance = float(np.linalg.norm(landmarks[1] - landmarks[0]))
        pose = estimate_pose(landmarks)
        metrics.update(
            eye_distance=eye_distance, yaw=pose.yaw, pitch=pose.pitch, roll=pose.roll
        )
        if eye_distance < cfg.min_eye_distance:
            reasons.append(
                f"The eyes are too close together in the image ({eye_distance:.0f} "
                f"pixels, at least {cfg.min_eye_distance:.0f}): the face is too "
                "small or seen from the side."
            )
        if abs(pose.yaw) > cfg.max_yaw:
            side = "right" if pose.yaw > 0 else "left"
            reasons.append(
                f"The head is turned too far to the image's {side} (about "
                f"{abs(pose.yaw):.0f} degrees, at most {cfg.max_yaw:.0f})."
            )
        if abs(pose.pitch) > cfg.max_pitch:
            way = "down" if pose.pitch > 0 else "up"
            reasons.append(
                f"The head is tilted too far {way} (about {abs(pose.pitch):.0f} "
                f"degrees, at most {cfg.max_pitch:.0f})."
            )
        if abs(pose.roll) > cfg.max_roll:
            reasons.append(
                f"The head is tilted sideways by about {abs(pose.roll):.0f} degrees "
                f"(at most {cfg.max_roll:.0f})."
            )
        return reasons

    def _appearance(self, gray: np.ndarray, metrics: dict[str, float]) -> list[str]:
        cfg = self.config
        reasons = []
        sharpness = float(cv2.Laplacian(gray.astype(np.float64), cv2.CV_64F).var())
        brightness = float(gray.mean())
        clipped = float(np.mean((gray <= _DARK) | (gray >= _BRIGHT)))
        metrics.update(sharpness=sharpness, brightness=brightness, clipped=clipped)
        if sharpness < cfg.min_sharpness:
            reasons.append(
                f"The face is blurred (sharpness {sharpness:.0f}, at least "
                f"{cfg.min_sharpness:.0f} is needed)."
            )
        if brightness < cfg.min_brightness:
            reasons.append(
                f"The face is too dark (mean level {brightness:.0f} of 255, at "
                f"least {cfg.min_brightness:.0f})."
            )
        if brightness > cfg.max_brightness:
            reasons.append(
                f"The face is too bright (mean level {brightness:.0f} of 255, at "
                f"most {cfg.max_brightness:.0f})."
            )
        if clipped > cfg.max_clipped_fraction:
            reasons.append(
                f"{clipped:.0%} of the face is pure black or blown-out white (at "
                f"most {cfg.max_clipped_fraction:.0%})."
            )
        return reasons


def _chip_gray(image: ImageArray, landmarks: np.ndarray) -> np.ndarray:
    chip = align_arcface(image, landmarks)
    return cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)[_CHIP_CENTRE]


def _box_gray(image: ImageArray, face: Face) -> np.ndarray:
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (round(float(v)) for v in face.box)
    x1, x2 = max(0, x1), min(width, max(x2, x1 + 1))
    y1, y2 = max(0, y1), min(height, max(y2, y1 + 1))
    crop = image[y1:y2, x1:x2]
    if crop.size == 0:
        return np.zeros((88, 80), np.uint8)
    gray = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (80, 88), interpolation=cv2.INTER_AREA)
