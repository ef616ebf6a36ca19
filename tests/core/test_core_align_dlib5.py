"""dlib's chip from dlib's own 5 points, checked against `dlib.get_face_chip`."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facefed.core.align import (
    DLIB5_TEMPLATE,
    align_dlib_chip_from_dlib5,
    dlib5_chip_matrix,
)
from facefed.core.detection.dlib_detectors import DlibHogDetector, dlib5_landmarks
from facefed.core.errors import ConfigurationError, FaceError, ImageError
from facefed.core.image import decode_image

dlib = pytest.importorskip("dlib")
face_recognition_models = pytest.importorskip("face_recognition_models")

MODEL_DIR = Path(face_recognition_models.__file__).parent / "models"
# The bar: mean absolute difference per chip, in gray levels.
MAX_MEAN_DIFFERENCE = 2.0


@pytest.fixture(scope="module")
def dlib5_faces():
    """LFW test photos with one HOG face: (name, image, dlib shape, points)."""
    from tests.conftest import TEST_DATA

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(
        str(MODEL_DIR / "shape_predictor_5_face_landmarks.dat")
    )
    faces = []
    for path in sorted((TEST_DATA / "lfw").glob("*/*.jpg")):
        image = decode_image(path)
        boxes = detector(image, 0)
        if len(boxes) != 1:
            continue
        shape = predictor(image, boxes[0])
        points = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
        faces.append((path.name, image, shape, points))
    assert len(faces) >= 100
    return faces


def _difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).mean())


@pytest.mark.parametrize(("size", "padding"), [(150, 0.25), (200, 0.4)])
def test_chip_from_dlib5_points_matches_dlib_get_face_chip(
    dlib5_faces, size: int, padding: float
) -> None:
    differences = []
    for name, image, shape, points in dlib5_faces:
        ours = align_dlib_chip_from_dlib5(image, points, size=size, padding=padding)
        theirs = dlib.get_face_chip(image, shape, size, padding)
        assert ours.shape == theirs.shape == (size, size, 3)
        differences.append(_difference(ours, theirs))
        assert differences[-1] < MAX_MEAN_DIFFERENCE, (name, differences[-1])
    # Interpolation alone, not geometry: typical chips differ far less.
    assert np.mean(differences) < 1.0, np.mean(differences)


def test_dlib5_points_land_on_dlib_template_in_dlib_chip(dlib5_faces) -> None:
    # Our chip and dlib's put each of dlib's points in the same place: map
    # them with our matrix and with dlib's (read back from the chip details).
    for name, _, shape, points in dlib5_faces:
        details = dlib.get_face_chip_details(shape, 150, 0.25)
        matrix = dlib5_chip_matrix(points)
        ours = points @ matrix[:, :2].T + matrix[:, 2]
        rect = details.rect
        centre = np.array(
            [(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2]
        )
        scale = 149 / (rect.right() - rect.left())
        cos, sin = np.cos(-details.angle), np.sin(-details.angle)
        turn = np.array([[cos, -sin], [sin, cos]])
        theirs = (points - centre) @ turn.T * scale + 74.5
        # Measured at most 0.1 pixel; a template off by half a pixel fails.
        assert np.abs(ours - theirs).max() < 0.25, (name, ours - theirs)


def test_wrong_point_order_gives_a_different_chip(dlib5_faces) -> None:
    # The template is dlib's point order: facefed's order (eyes swapped)
    # must not pass for it.
    _, image, shape, points = dlib5_faces[0]
    swapped = points[[2, 3, 0, 1, 4]]
    chip = align_dlib_chip_from_dlib5(image, swapped)
    assert _difference(chip, dlib.get_face_chip(image, shape)) > 10


def test_hog_detector_boxes_give_dlib5_points_dlib_gives(dlib5_faces) -> None:
    # The user's path: facefed's HOG detector, then dlib5_landmarks on its box.
    detector = DlibHogDetector(upsample=0)
    predictor = dlib.shape_predictor(
        str(MODEL_DIR / "shape_predictor_5_face_landmarks.dat")
    )
    raw = dlib.get_frontal_face_detector()
    for _, image, _, _ in dlib5_faces[:10]:
        faces = detector.detect(image)
        boxes = raw(image, 0)
        assert len(faces) == len(boxes) == 1
        shape = predictor(image, boxes[0])
        expected = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
        points = dlib5_landmarks(image, faces[0].box)
        assert np.array_equal(points, expected)
        chip = align_dlib_chip_from_dlib5(image, points)
        assert _difference(chip, dlib.get_face_chip(image, shape)) < 2.0


def test_align_cli_cuts_dlib5_chips(dlib5_faces, tmp_path: Path) -> None:
    from facefed.core import cli
    from tests.conftest import TEST_DATA

    cli._register_commands()
    app = cli.app
    name = dlib5_faces[0][0]
    source = next((TEST_DATA / "lfw").glob(f"*/{name}"))
    out = tmp_path / "chips"
    result = CliRunner().invoke(
        app,
        ["align", str(source), "--out", str(out), "-g", "dlib5", "-d", "hog"],
    )
    assert result.exit_code == 0, result.output
    assert "dlib5 chips" in result.output
    chip = np.asarray(Image.open(out / f"{Path(name).stem}_1.png").convert("RGB"))
    assert chip.shape == (150, 150, 3)
    # `-d hog` upsamples once, as dlib's examples do; its box, dlib's points.
    image = dlib5_faces[0][1]
    (box,) = dlib.get_frontal_face_detector()(image, 1)
    predictor = dlib.shape_predictor(
        str(MODEL_DIR / "shape_predictor_5_face_landmarks.dat")
    )
    theirs = dlib.get_face_chip(image, predictor(image, box))
    assert _difference(chip, theirs) < 2.0


def test_template_is_dlib_point_order() -> None:
    # Eye corners ordered image-right eye outer, inner, then image-left eye
    # outer, inner; the nose below and between the eyes.
    assert DLIB5_TEMPLATE[0, 0] > DLIB5_TEMPLATE[1, 0] > 0.5
    assert DLIB5_TEMPLATE[2, 0] < DLIB5_TEMPLATE[3, 0] < 0.5
    assert DLIB5_TEMPLATE[4, 1] > DLIB5_TEMPLATE[:4, 1].max()


def test_bad_input_is_refused(dlib5_faces) -> None:
    _, image, _, points = dlib5_faces[0]
    with pytest.raises(FaceError, match="shape"):
        align_dlib_chip_from_dlib5(image, points[:4])
    with pytest.raises(FaceError, match="finite"):
        align_dlib_chip_from_dlib5(image, np.full((5, 2), np.nan))
    with pytest.raises(ConfigurationError, match="padding"):
        align_dlib_chip_from_dlib5(image, points, padding=-1)
    with pytest.raises(ConfigurationError, match="size"):
        align_dlib_chip_from_dlib5(image, points, size=4)
    with pytest.raises(FaceError, match="box"):
        dlib5_landmarks(image, [10, 10, 5, 50])
    with pytest.raises(FaceError, match="RGB"):
        align_dlib_chip_from_dlib5(image[..., 0], points)
    with pytest.raises(ImageError):
        dlib5_landmarks(image[..., 0], [10, 10, 50, 50])
