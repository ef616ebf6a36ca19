"""Frame sequences for the interactive-challenge tests, built from real photos.

Blinks and mouth openings are made by editing one photo around its dlib
landmarks; head turns use other real photos of the same person in which the
head is turned (a planar warp of one photo does not move a solvePnP yaw
estimate reliably: it has no depth).
"""

from pathlib import Path

import cv2
import numpy as np
import pytest

from facefed.core.liveness.faces import default_face_finder, largest_face, read_rgb
from facefed.core.liveness.landmarks import landmarks68
from facefed.core.types import ImageArray

LIVENESS_DATA = Path(__file__).parent.parent / "data" / "liveness"
FRONTAL = "Amelie_Mauresmo_0007.jpg"
FACING_IMAGE_RIGHT = "Amelie_Mauresmo_0003.jpg"  # the subject turned to her left
FACING_IMAGE_LEFT = "Amelie_Mauresmo_0018.jpg"  # the subject turned to her right


def _feathered(mask: np.ndarray, sigma: float) -> np.ndarray:
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)
    return soft[..., None]


def close_eyes(image: ImageArray, points: np.ndarray) -> ImageArray:
    """Paint both eyes shut: eyelid skin pulled down over the eye to the lower
    lid, with a dark lash line along the lower lid."""
    out = image.astype(np.float32)
    for indices in (range(36, 42), range(42, 48)):
        eye = points[list(indices)]
        width = float(np.ptp(eye[:, 0]))
        x1 = int(eye[:, 0].min() - 0.2 * width)
        x2 = int(eye[:, 0].max() + 0.2 * width)
        lower_y = float(eye[[4, 5], 1].mean())
        top_y = float(eye[[1, 2], 1].mean())
        y1 = int(top_y - 0.5 * (lower_y - top_y) - 2)
        y2 = int(lower_y + 2)
        # eyelid skin: the band between brow and eye, stretched over the eye
        skin = image[max(0, y1 - (y2 - y1)) : y1, x1:x2]
        patch = cv2.resize(skin, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        canvas = out.copy()
        canvas[y1:y2, x1:x2] = patch
        lid = np.array([eye[0], eye[5], eye[4], eye[3]], np.float32)
        cv2.polylines(
            canvas, [lid.round().astype(np.int32)], False, (25, 15, 15), 2, cv2.LINE_AA
        )
        mask = np.zeros(image.shape[:2], np.float32)
        mask[y1 : y2 + 2, x1:x2] = 1.0
        alpha = _feathered(mask, 0.8)
        out = out * (1 - alpha) + canvas * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def open_mouth(image: ImageArray, points: np.ndarray) -> ImageArray:
    """Open the mouth: move the lower lip and chin down, darken the gap."""
    height, width = image.shape[:2]
    lips = points[48:60]
    mouth_w = float(np.ptp(lips[:, 0]))
    line_y = float(points[[61, 62, 63, 65, 66, 67], 1].mean())
    centre_x = float(lips[:, 0].mean())
    drop = 0.45 * mouth_w
    reach = 1.6 * mouth_w
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    across = np.clip(1 - ((xx - centre_x) / (0.75 * mouth_w)) ** 2, 0, 1)
    below = yy - line_y
    fade = np.clip(1 - below / reach, 0, 1)
    shift = np.where(below > 0, drop * across * fade, 0).astype(np.float32)
    moved = cv2.remap(
        image, xx, yy - shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    gap = np.zeros((height, width), np.float32)
    cv2.ellipse(
        gap,
        (int(centre_x), int(line_y + drop / 2)),
        (int(0.42 * mouth_w), int(drop / 2)),
        0,
        0,
        360,
        1.0,
        -1,
    )
    alpha = _feathered(gap, 1.0)
    dark = np.array([45, 20, 20], np.float32)
    out = moved.astype(np.float32) * (1 - alpha) + dark * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def pose_frames() -> dict[str, ImageArray]:
    """Real photos of one person: frontal, facing the image's left and right."""
    return {
        "frontal": read_rgb(LIVENESS_DATA / FRONTAL),
        "facing_left": read_rgb(LIVENESS_DATA / FACING_IMAGE_LEFT),
        "facing_right": read_rgb(LIVENESS_DATA / FACING_IMAGE_RIGHT),
    }


@pytest.fixture(scope="session")
def action_frames(pose_frames: dict[str, ImageArray]) -> dict[str, ImageArray]:
    """Frames showing each action, keyed by what they show."""
    frontal = pose_frames["frontal"]
    face = largest_face(default_face_finder(), frontal)
    points = landmarks68(frontal, face)
    return {
        "neutral": frontal,
        "blink": close_eyes(frontal, points),
        "open_mouth": open_mouth(frontal, points),
        "turn_left": pose_frames["facing_right"],
        "turn_right": pose_frames["facing_left"],
    }
