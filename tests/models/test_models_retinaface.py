"""RetinaFace MobileNet-0.25: weights load strictly, detections on real photos, ONNX."""

import cv2
import numpy as np
import pytest

from facefed.core.errors import ConfigurationError, ImageError, ModelError
from facefed.models.detectors.retinaface import (
    DEFAULT_WEIGHTS,
    RetinaFaceConfig,
    RetinaFaceDetector,
    create_detector,
    decode_boxes,
    export_onnx,
    load_retinaface,
    prior_boxes,
)


def _rgb(path):
    return np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])


def _pts(path):
    lines = path.read_text().splitlines()
    start = lines.index("{") + 1
    return np.array(
        [[float(v) for v in line.split()] for line in lines[start : start + 68]]
    )


def _five(pts68):
    return np.stack(
        [pts68[36:42].mean(0), pts68[42:48].mean(0), pts68[30], pts68[48], pts68[54]]
    )


@pytest.fixture(scope="module")
def detector():
    return create_detector()


def test_state_dict_loads_strictly_and_every_tensor_is_used():
    import torch

    network = load_retinaface()
    state = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    ours = network.state_dict()
    assert set(ours) == set(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def test_priors_cover_every_cell_of_each_level():
    priors = prior_boxes(480, 640)
    # 2 anchors per cell at strides 8, 16, 32.
    assert priors.shape == (2 * (60 * 80 + 30 * 40 + 15 * 20), 4)
    np.testing.assert_allclose(priors[0], [4 / 640, 4 / 480, 16 / 640, 16 / 480])
    np.testing.assert_allclose(priors[1, 2:], [32 / 640, 32 / 480])
    np.testing.assert_allclose(
        priors[-1], [(19.5 * 32) / 640, (14.5 * 32) / 480, 512 / 640, 512 / 480]
    )


def test_zero_offsets_decode_to_the_prior():
    priors = np.array([[0.5, 0.5, 0.2, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(
        decode_boxes(np.zeros((1, 4), np.float32), priors), [[0.4, 0.3, 0.6, 0.7]]
    )


def test_landmarks_match_manual_annotation_in_facefed_order(detector, test_data):
    faces = detector.detect(_rgb(test_data / "landmarks" / "takeo.ppm"))
    assert len(faces) == 1
    truth = _five(_pts(test_data / "landmarks" / "takeo.pts"))
    inter_ocular = np.linalg.norm(truth[1] - truth[0])
    error = np.linalg.norm(faces[0].landmarks - truth, axis=1) / inter_ocular
    # Left eye is left of right eye, mouth corners likewise: facefed order.
    assert faces[0].landmarks[0, 0] < faces[0].landmarks[1, 0]
    assert faces[0].landmarks[3, 0] < faces[0].landmarks[4, 0]
    assert error.mean() < 0.1


def test_group_photo_and_sorted_scores(detector, test_data):
    faces = detector.detect(
        _rgb(test_data / "detection" / "facenet_pytorch_multiface.jpg")
    )
    assert len(faces) == 6
    scores = [face.score for face in faces]
    assert scores == sorted(scores, reverse=True)
    for face in faces:
        assert face.box.dtype == np.float32 and face.landmarks.shape == (5, 2)
        x1, y1, x2, y2 = face.box
        assert (x1 <= face.landmarks[:, 0]).all() and (face.landmarks[:, 0] <= x2).all()
        assert (y1 <= face.landmarks[:, 1]).all() and (face.landmarks[:, 1] <= y2).all()


def test_downscaling_keeps_coordinates_in_the_original_image(test_data):
    image = _rgb(test_data / "detection" / "facenet_pytorch_multiface.jpg")
    full = RetinaFaceDetector(RetinaFaceConfig(max_side=None)).detect(image)
    small = RetinaFaceDetector(RetinaFaceConfig(max_side=800)).detect(image)
    assert len(full) == len(small) == 6
    for face in full:
        ious = [_iou(face.box, other.box) for other in small]
        assert max(ious) > 0.8


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (
        (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    )


def test_blank_image_has_no_face(detector):
    assert detector.detect(np.full((240, 320, 3), 128, np.uint8)) == []


def test_bad_input_and_settings_are_refused(detector, tmp_path):
    with pytest.raises(ImageError, match="shape"):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ConfigurationError, match="score_threshold"):
        RetinaFaceConfig(score_threshold=2.0)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ModelError):
        load_retinaface(bad)


@pytest.mark.slow
def test_onnx_export_matches_torch(tmp_path, test_data):
    import onnxruntime as ort
    import torch

    path = export_onnx(tmp_path / "retinaface.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = _rgb(test_data / "landmarks" / "takeo.ppm")
    blob = image[:, :, ::-1].astype(np.float32) - np.array([104, 117, 123], np.float32)
    blob = np.ascontiguousarray(blob.transpose(2, 0, 1))[None]
    onnx_out = session.run(None, {"input": blob})
    with torch.inference_mode():
        torch_out = load_retinaface()(torch.from_numpy(blob))
    for ours, theirs in zip(onnx_out, torch_out, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-3, atol=1e-4)


def test_registry_builds_retinaface_through_its_entry_point():
    from facefed.core.detection.base import FaceDetector
    from facefed.core.detection.registry import create_detector as from_registry

    detector = from_registry("retinaface")
    assert isinstance(detector, RetinaFaceDetector)
    assert isinstance(detector, FaceDetector) and detector.name == "retinaface"
