"""dlib's 68-point landmarks and the facial measures the challenge relies on.

Point indices follow the iBUG 300-W 68-point scheme (0-based): jaw 0-16, nose
27-35, eyes 36-41 and 42-47, outer lips 48-59, inner lips 60-67.
"""

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from facefed.core.errors import ModelError
from facefed.core.types import Face, FloatArray, ImageArray

logger = logging.getLogger(__name__)

EYE_POINTS = (tuple(range(36, 42)), tuple(range(42, 48)))
INNER_MOUTH = tuple(range(60, 68))
OUTER_MOUTH = tuple(range(48, 60))

# A generic head in millimetres, in the camera's axes for a frontal face
# (x to the image's right, y down, z away from the camera), nose tip at the
# origin. Rounded anthropometric averages; the yaw it gives is a relative
# measure (we compare frames of one person), so a model that is off by a few
# millimetres shifts every frame alike.
_MODEL_POINTS = np.array(
    [
        (0.0, 0.0, 0.0),  # 30 nose tip
        (0.0, 65.0, 15.0),  # 8 chin
        (-45.0, -35.0, 30.0),  # 36 outer corner of the eye on the image's left
        (45.0, -35.0, 30.0),  # 45 outer corner of the eye on the image's right
        (-25.0, 30.0, 22.0),  # 48 mouth corner on the image's left
        (25.0, 30.0, 22.0),  # 54 mouth corner on the image's right
    ],
    dtype=np.float64,
)
_POSE_INDICES = (30, 8, 36, 45, 48, 54)
_EYE_SPAN_MM = 90.0


@lru_cache(maxsize=1)
def _shape_predictor() -> Any:
    import dlib

    try:
        import face_recognition_models
    except ImportError as error:
        raise ModelError(
            "The 68-point landmark model needs the face_recognition_models package."
        ) from error
    return dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())


def landmarks68(image: ImageArray, face: Face) -> FloatArray:
    """Predict dlib's 68 landmarks inside a detected face box.

    dlib's predictor (Kazemi and Sullivan, "One millisecond face alignment with
    an ensemble of regression trees", CVPR 2014) was trained on boxes from
    dlib's HOG detector, which are tighter than YuNet's; the box is shrunk about
    its centre to match (see `HOG_BOX_FACTOR`).

    Args:
        image: RGB uint8 image.
        face: The face whose box to use.

    Returns:
        (68, 2) float32 x, y points.
    """
    import dlib

    x1, y1, x2, y2 = (float(v) for v in face.box[:4])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + (y2 - y1) * HOG_BOX_SHIFT
    half = max(x2 - x1, y2 - y1) * HOG_BOX_FACTOR / 2
    rect = dlib.rectangle(
        round(cx - half), round(cy - half), round(cx + half), round(cy + half)
    )
    shape = _shape_predictor()(np.ascontiguousarray(image), rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


# YuNet boxes (forehead to chin) against dlib HOG boxes (brows to chin):
# HOG boxes are square, about 0.87 of the YuNet box and centred 3 % of its
# height lower (medians over 20 LFW photos and the 3 Silent-Face frames).
HOG_BOX_FACTOR = 0.87
HOG_BOX_SHIFT = 0.03


def eye_aspect_ratio(points: FloatArray) -> float:
    """Mean eye aspect ratio of both eyes.

    EAR = (|p2 - p6| + |p3 - p5|) / (2 |p1 - p4|) for the six points of an eye
    (Soukupova and Cech, "Real-time eye blink detection using facial
    landmarks", CVWW 2016); about 0.3 for an open eye, near 0 when closed.
    """
    ratios = []
    for indices in EYE_POINTS:
        p = points[list(indices)]
        vertical = np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])
        horizontal = 2.0 * np.linalg.norm(p[0] - p[3])
        ratios.append(float(vertical) / max(float(horizontal), 1e-6))
    return float(np.mean(ratios))


def mouth_aspect_ratio(points: FloatArray) -> float:
    """Inner-lip opening over mouth width.

    MAR = (|p61 - p67| + |p62 - p66| + |p63 - p65|) / (3 |p60 - p64|), the
    mouth analogue of the eye aspect ratio on the inner lip points; near 0
    for a closed mouth, above about 0.3 when clearly open.
    """
    p = points
    vertical = (
        np.linalg.norm(p[61] - p[67])
        + np.linalg.norm(p[62] - p[66])
        + np.linalg.norm(p[63] - p[65])
    )
    horizontal = 3.0 * np.linalg.norm(p[60] - p[64])
    return float(vertical) / max(float(horizontal), 1e-6)


def head_yaw(points: FloatArray, image_shape: tuple[int, ...]) -> float:
    """Yaw of the head in degrees from six landmarks, by `cv2.solvePnP`.

    The camera is modelled as a pinhole with focal length equal to the image
    width and its principal point at the image centre. Positive yaw means the
    face points towards the image's right, which for an unmirrored camera is
    the subject turning to their own left.

    Args:
        points: (68, 2) landmarks.
        image_shape: Shape of the image the points are in.

    Returns:
        Yaw in degrees, in (-90, 90).
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    camera = np.array(
        [[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], dtype=np.float64
    )
    image_points = points[list(_POSE_INDICES)].astype(np.float64)
    # Start from a frontal head at the distance the eye span suggests: from a
    # free start, six points of a generic model often converge to the
    # depth-reversed pose (nose behind the eyes), which flips the yaw's sign.
    focal = float(camera[0, 0])
    span = max(float(np.linalg.norm(image_points[3] - image_points[2])), 1.0)
    depth = focal * _EYE_SPAN_MM / span
    nose_x, nose_y = image_points[0]
    start_translation = np.array(
        [
            [(nose_x - width / 2) * depth / focal],
            [(nose_y - height / 2) * depth / focal],
            [depth],
        ]
    )
    ok, rotation_vector, _ = cv2.solvePnP(
        _MODEL_POINTS,
        image_points,
        camera,
        None,
        np.zeros((3, 1)),
        start_translation,
        True,
        cv2.SOLVEPNP_ITERATIVE,
    )
    if not ok:
        return math.nan
    rotation, _ = cv2.Rodrigues(rotation_vector)
    # The face looks along -z of the model; rotate that into camera axes.
    facing = rotation @ np.array([0.0, 0.0, -1.0])
    return float(math.degrees(math.atan2(facing[0], -facing[2])))


@dataclass(frozen=True)
class FaceMeasures:
    """Per-frame measures the challenge compares.

    Attributes:
        ear: Eye aspect ratio.
        mar: Mouth aspect ratio.
        yaw: Head yaw in degrees (positive: face towards the image's right).
    """

    ear: float
    mar: float
    yaw: float


def measure_face(image: ImageArray, face: Face) -> FaceMeasures:
    """Landmark the face and compute its eye, mouth and pose measures."""
    points = landmarks68(image, face)
    return FaceMeasures(
        ear=eye_aspect_ratio(points),
        mar=mouth_aspect_ratio(points),
        yaw=head_yaw(points, image.shape),
    )
