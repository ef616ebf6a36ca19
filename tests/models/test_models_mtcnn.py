"""MTCNN: weights load strictly, cascade finds faces and landmarks on real photos."""

import itertools

import cv2
import numpy as np
import pytest

from facefed.core.errors import ConfigurationError, ImageError
from facefed.models.detectors.mtcnn import (
    MtcnnConfig,
    calibrate,
    create_detector,
    load_mtcnn,
    pyramid_scales,
    square,
)


def _rgb(path):
    return np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])


@pytest.fixture(scope="module")
def detector():
    return create_detector()


def test_every_shipped_tensor_is_loaded():
    import torch

    from facefed.models.detectors.mtcnn import DEFAULT_WEIGHTS_DIR

    for name, network in zip(("pnet", "rnet", "onet"), load_mtcnn(), strict=True):
        state = torch.load(DEFAULT_WEIGHTS_DIR / f"{name}.pt", weights_only=True)
        assert set(network.state_dict()) == set(state)


def test_pyramid_follows_the_paper():
    scales = pyramid_scales(100, 200, min_face_size=20, factor=0.709)
    assert scales[0] == pytest.approx(0.6)
    assert all(b / a == pytest.approx(0.709) for a, b in itertools.pairwise(scales))
    # The smallest level still holds one 12-pixel window.
    assert 100 * scales[-1] >= 12 > 100 * scales[-1] * 0.709
    assert pyramid_scales(10, 10, min_face_size=20, factor=0.709) == []


def test_calibrate_and_square():
    boxes = np.array([[10, 20, 30, 60]], np.float32)
    moved = calibrate(boxes, np.array([[0.1, -0.05, 0.0, 0.5]], np.float32))
    np.testing.assert_allclose(moved, [[12, 18, 30, 80]])
    np.testing.assert_allclose(square(boxes), [[0, 20, 40, 60]])


def test_single_face_landmarks_in_facefed_order(detector, test_data):
    faces = detector.detect(_rgb(test_data / "landmarks" / "takeo.ppm"))
    assert len(faces) == 1
    lines = (test_data / "landmarks" / "takeo.pts").read_text().splitlines()
    pts = np.array([[float(v) for v in line.split()] for line in lines[3:71]])
    truth = np.stack(
        [pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]
    )
    error = np.linalg.norm(faces[0].landmarks - truth, axis=1)
    assert error.mean() / np.linalg.norm(truth[1] - truth[0]) < 0.1


def test_group_photo_six_faces(detector, test_data):
    faces = detector.detect(
        _rgb(test_data / "detection" / "facenet_pytorch_multiface.jpg")
    )
    assert len(faces) == 6
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    assert all(f.landmarks.shape == (5, 2) and f.score >= 0.7 for f in faces)


def test_blank_and_tiny_images_have_no_face(detector):
    assert detector.detect(np.zeros((200, 200, 3), np.uint8)) == []
    assert detector.detect(np.zeros((8, 8, 3), np.uint8)) == []


def test_bad_input_and_settings_are_refused(detector):
    with pytest.raises(ImageError):
        detector.detect(np.zeros((20, 20, 4), np.uint8))
    with pytest.raises(ConfigurationError, match="min_face_size"):
        MtcnnConfig(min_face_size=5)
    with pytest.raises(ConfigurationError, match="thresholds"):
        MtcnnConfig(thresholds=(0.6, 1.5, 0.7))


def test_registry_builds_mtcnn_through_its_entry_point():
    from facefed.core.detection.base import FaceDetector
    from facefed.core.detection.registry import create_detector as from_registry
    from facefed.models.detectors.mtcnn import MtcnnDetector

    detector = from_registry("mtcnn")
    assert isinstance(detector, MtcnnDetector) and isinstance(detector, FaceDetector)


def test_device_choice_is_validated():
    import torch

    from facefed.models.detectors.common import select_device

    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigurationError, match="device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        assert select_device(None) == torch.device("cpu")
        with pytest.raises(ConfigurationError, match="no GPU"):
            select_device("cuda")
