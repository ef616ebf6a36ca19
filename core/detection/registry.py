"""Create a face detector from a short spec such as `yunet` or `scrfd:model.onnx`.

Detectors that need only core's dependencies are built in. Detectors whose
networks are defined in PyTorch (RetinaFace, MTCNN) live in `facefed.models`
and are found through the `facefed.detectors` entry-point group, whose
entries are zero-argument factories, so `core` never imports `models`.
"""

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from facefed.core.detection.base import FaceDetector
from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "facefed.detectors"


def _yunet() -> FaceDetector:
    from facefed.core.detection.yunet import YuNetDetector

    return YuNetDetector()


def _hog() -> FaceDetector:
    from facefed.core.detection.dlib_detectors import DlibHogDetector

    return DlibHogDetector()


def _cnn() -> FaceDetector:
    from facefed.core.detection.dlib_detectors import DlibCnnDetector

    return DlibCnnDetector()


_BUILT_IN: dict[str, Callable[[], FaceDetector]] = {
    "yunet": _yunet,
    "hog": _hog,
    "cnn": _cnn,
}


def known_detectors() -> list[str]:
    """Names `create_detector` accepts, with `scrfd:PATH` for SCRFD files."""
    plugins = {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return [*sorted(set(_BUILT_IN) | plugins), "scrfd:PATH"]


def create_detector(spec: str) -> FaceDetector:
    """Create the detector a spec names.

    Args:
        spec: `yunet` (default), `hog`, `cnn` (dlib's HOG and MMOD CNN
            detectors), `scrfd:PATH` (an InsightFace SCRFD ONNX file), or the
            name of a `facefed.detectors` entry point (`retinaface`, `mtcnn`).

    Returns:
        A ready detector.

    Raises:
        ConfigurationError: An unknown name, naming the known choices, or an
            SCRFD spec without a path.
    """
    name, _, argument = spec.strip().partition(":")
    name = name.lower()
    if name == "scrfd":
        return _scrfd(argument)
    if argument:
        raise ConfigurationError(f"Detector {name!r} takes no argument; got {spec!r}.")
    if name in _BUILT_IN:
        return _BUILT_IN[name]()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return _load_plugin(entry.name, entry.load)
    raise ConfigurationError(
        f"Unknown detector {spec!r}; known detectors: {', '.join(known_detectors())}."
    )


def _scrfd(argument: str) -> FaceDetector:
    if not argument:
        raise ConfigurationError(
            "The SCRFD detector needs the path of its ONNX file: scrfd:PATH."
        )
    from facefed.core.detection.scrfd import ScrfdDetector

    return ScrfdDetector(Path(argument).expanduser())


def _load_plugin(name: str, load: Callable[[], object]) -> FaceDetector:
    try:
        factory = load()
    except ImportError as error:
        raise ConfigurationError(
            f"Detector {name!r} is registered but cannot be imported: {error}"
        ) from error
    if not callable(factory):
        raise ConfigurationError(
            f"The factory registered for {name!r} is not callable."
        )
    detector = factory()
    if not isinstance(detector, FaceDetector):
        raise ConfigurationError(
            f"The factory registered for {name!r} did not return a face detector."
        )
    logger.debug("Created detector %s from its entry point", name)
    return detector
