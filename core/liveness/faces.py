"""Finding the face a liveness command checks, through the project's detectors."""

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from facefed.core.errors import ImageError, NoFaceError
from facefed.core.settings import get_core_settings
from facefed.core.types import Face, ImageArray

logger = logging.getLogger(__name__)


class FaceFinder(Protocol):
    """Anything with the `FaceDetector.detect` method of core.detection."""

    def detect(self, image: ImageArray) -> list[Face]:
        """Return the faces in an RGB image, best first."""
        ...


def default_face_finder() -> FaceFinder:
    """Return the configured detector (`FACEFED_DETECTOR`, default YuNet)."""
    from facefed.core.detection.registry import create_detector

    return create_detector(get_core_settings().detector)


def largest_face(finder: FaceFinder, image: ImageArray) -> Face:
    """Return the largest face the finder sees in the image.

    Raises:
        NoFaceError: If there is none.
    """
    faces = finder.detect(image)
    if not faces:
        raise NoFaceError("No face was found in the image.")
    return max(faces, key=lambda face: face.width * face.height)


def whole_image_face(image: ImageArray) -> Face:
    """A face whose box is the whole image, for tight face crops."""
    height, width = image.shape[:2]
    return Face(box=np.array([0, 0, width, height], np.float32), score=1.0)


def read_rgb(path: Path) -> ImageArray:
    """Read an image file as RGB uint8 through `core.image.decode_image`.

    Raises:
        ImageError: If the file cannot be read or decoded.
    """
    from facefed.core.image import decode_image

    return decode_image(path, max_pixels=get_core_settings().max_image_pixels)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def read_frames(
    source: Path, *, max_frames: int = 900, max_total_pixels: int = 600_000_000
) -> list[ImageArray]:
    """Read a recording as RGB frames: a video file or a folder of images.

    Images in a folder are taken in file-name order. Every frame is held in
    memory, so the recording's total size is bounded (600 MP is 1.8 GB of
    RGB: 20 s of 1080p at 15 frames per second) and so is each frame
    (`FACEFED_MAX_IMAGE_PIXELS`, as for photos).

    Args:
        source: Video file or folder.
        max_frames: Refuse recordings longer than this.
        max_total_pixels: Refuse recordings whose frames add up to more pixels.

    Returns:
        The frames in order.

    Raises:
        ImageError: If the source is missing, empty, unreadable or too long.
    """
    budget = _FrameBudget(source, max_frames, max_total_pixels)
    if source.is_dir():
        files = sorted(
            p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ImageError(f"The folder {source} holds no image files.")
        if len(files) > max_frames:
            raise ImageError(
                f"The folder {source} holds {len(files)} frames; the limit is "
                f"{max_frames}."
            )
        return [budget.take(read_rgb(path)) for path in files]
    if not source.is_file():
        raise ImageError(f"There is no video file or folder at {source}.")
    return _read_video(source, budget)


class _FrameBudget:
    """Counts frames and pixels of a recording as they are read."""

    def __init__(self, source: Path, max_frames: int, max_total_pixels: int) -> None:
        self.source = source
        self.max_frames = max_frames
        self.max_total_pixels = max_total_pixels
        self.frame_pixels = get_core_settings().max_image_pixels
        self.frames = 0
        self.pixels = 0

    def check_size(self, height: int, width: int) -> None:
        """Refuse frames over the per-image pixel limit."""
        if height * width > self.frame_pixels:
            raise ImageError(
                f"The recording {self.source} has {width}x{height} frames; the "
                f"limit is {self.frame_pixels} pixels a frame."
            )

    def take(self, frame: ImageArray) -> ImageArray:
        """Count a decoded frame against the budgets and return it."""
        height, width = frame.shape[:2]
        self.check_size(height, width)
        if self.frames + 1 > self.max_frames:
            raise ImageError(
                f"The recording {self.source} is longer than {self.max_frames} frames."
            )
        if self.pixels + height * width > self.max_total_pixels:
            raise ImageError(
                f"The recording {self.source} holds more than "
                f"{self.max_total_pixels} pixels in all; send fewer or smaller "
                "frames."
            )
        self.frames += 1
        self.pixels += height * width
        return frame


def _read_video(path: Path, budget: _FrameBudget) -> list[ImageArray]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames: list[ImageArray] = []
    try:
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width > 0 and height > 0:
            # Refuse huge frames from the container's header, before decoding.
            budget.check_size(height, width)
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(budget.take(np.ascontiguousarray(bgr[..., ::-1])))
    finally:
        capture.release()
    if not frames:
        raise ImageError(f"No frame could be decoded from {path}.")
    return frames
