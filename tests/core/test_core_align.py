"""Alignment geometry, checked against dlib's own face chips on real photos."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefed.core.align import (
    align_arcface,
    align_dlib_chip,
    arcface_matrix,
    arcface_template,
    dlib_chip_matrix,
    dlib_chip_template,
    similarity_transform,
)
from facefed.core.errors import ConfigurationError, FaceError
from facefed.core.image import decode_image

dlib = pytest.importorskip("dlib")
face_recognition_models = pytest.importorskip("face_recognition_models")

MODEL_DIR = Path(face_recognition_models.__file__).parent / "models"


@pytest.fixture(scope="module")
def dlib_models():
    return {
        "detector": dlib.get_frontal_face_detector(),
        "sp5": dlib.shape_predictor(
            str(MODEL_DIR / "shape_predictor_5_face_landmarks.dat")
        ),
        "sp68": dlib.shape_predictor(
            str(MODEL_DIR / "shape_predictor_68_face_landmarks.dat")
        ),
    }


@pytest.fixture(scope="module")
def dlib_faces(dlib_models):
    """Real LFW photos with dlib's 5- and 68-point shapes of their one face."""
    from tests.conftest import TEST_DATA

    photos = sorted((TEST_DATA / "lfw").glob("*/*_0001.jpg"))[:24]
    faces = []
    for path in photos:
        image = decode_image(path)
        boxes = dlib_models["detector"](image, 0)
        if len(boxes) != 1:
            continue
        shape5 = dlib_models["sp5"](image, boxes[0])
        shape68 = dlib_models["sp68"](image, boxes[0])
        p68 = np.array([[p.x, p.y] for p in shape68.parts()], dtype=np.float64)
        ours = np.array(
            [
                p68[36:42].mean(axis=0),
                p68[42:48].mean(axis=0),
                p68[30],
                p68[48],
                p68[54],
            ]
        )
        faces.append((path.name, image, shape5, ours))
    assert len(faces) >= 15
    return faces


def _dlib_image_to_chip(details) -> np.ndarray:
    """The image-to-chip matrix of dlib's chip_details (rect turned by angle)."""
    rect = details.rect
    left, top, right, bottom = rect.left(), rect.top(), rect.right(), rect.bottom()
    centre = np.array([(left + right) / 2, (top + bottom) / 2])
    cos, sin = np.cos(details.angle), np.sin(details.angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    corners = np.array([[left, top], [right, top], [right, bottom]], np.float64)
    source = (corners - centre) @ rotation.T + centre
    target = np.array(
        [[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]],
        np.float64,
    )
    return cv2.getAffineTransform(source.astype(np.float32), target.astype(np.float32))


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _invert(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]


def test_dlib_chip_layout_reproduces_dlib_get_face_chip(dlib_faces) -> None:
    # Landmarks placed where dlib's own transform puts facefed's template
    # isolate the chip layout (fit direction, centring, pixel grid, padding
    # and size scaling, interpolation) from landmark disagreement. The chip
    # at another size and padding is only equal if the template's
    # normalisation matches dlib's.
    for name, image, shape5, _ in dlib_faces:
        details = dlib.get_face_chip_details(shape5, 150, 0.25)
        to_image = _invert(_dlib_image_to_chip(details))
        landmarks = _apply(to_image, dlib_chip_template(150, 0.25) * 149 / 150)
        for size, padding in ((150, 0.25), (200, 0.4), (96, 0.1)):
            ours = align_dlib_chip(image, landmarks, size=size, padding=padding)
            theirs = dlib.get_face_chip(image, shape5, size, padding)
            difference = np.abs(ours.astype(float) - theirs.astype(float)).mean()
            assert difference < 2.0, (name, size, padding, difference)


def test_dlib_chip_template_places_real_landmarks_where_dlib_does(
    dlib_faces,
) -> None:
    # With landmarks from dlib's 68-point model, facefed's chip and dlib's
    # chip (from dlib's 5-point model) must agree on average: the template
    # is where these points fall in dlib's chips.
    offsets = []
    for _, _, shape5, ours in dlib_faces:
        in_dlib_chip = _apply(
            _dlib_image_to_chip(dlib.get_face_chip_details(shape5, 150, 0.25)), ours
        )
        in_our_chip = _apply(dlib_chip_matrix(ours), ours)
        offsets.append(in_our_chip - in_dlib_chip)
    offsets = np.array(offsets)  # (photos, 5, 2)
    bias = np.abs(offsets.mean(axis=0))
    assert bias.max() < 1.5, bias
    eye_error = np.linalg.norm(offsets[:, :2], axis=2)
    assert np.median(eye_error) < 2.5, np.median(eye_error)


def test_dlib_chip_gives_dlib_descriptor(dlib_faces) -> None:
    # What matters downstream: dlib's ResNet sees the same face. Descriptor
    # distance between our chip and dlib's chip of the same photo must be
    # far below dlib's same-person threshold of 0.6.
    model = dlib.face_recognition_model_v1(
        str(MODEL_DIR / "dlib_face_recognition_resnet_model_v1.dat")
    )
    distances = []
    for _, image, shape5, ours in dlib_faces[:12]:
        theirs = np.asarray(
            model.compute_face_descriptor(dlib.get_face_chip(image, shape5))
        )
        mine = np.asarray(model.compute_face_descriptor(align_dlib_chip(image, ours)))
        distances.append(np.linalg.norm(theirs - mine))
    assert np.median(distances) < 0.2, distances
    assert max(distances) < 0.35, distances


def test_dlib_chip_of_a_large_photo_is_not_aliased(dlib_faces) -> None:
    _, image, _, ours = dlib_faces[0]
    big = cv2.resize(image, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    small_chip = align_dlib_chip(image, ours).astype(float)
    big_chip = align_dlib_chip(big, ours * 4 + 1.5).astype(float)
    assert np.abs(small_chip - big_chip).mean() < 3.0


def test_arcface_chip_puts_landmarks_on_the_template(dlib_faces) -> None:
    for _, image, _, ours in dlib_faces:
        chip = align_arcface(image, ours)
        assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
        mapped = _apply(arcface_matrix(ours), ours)
        # dlib's 68-point landmarks are not the ones ArcFace's template was
        # made from, so least squares leaves a residual of a few pixels; the
        # chip must still be upright with the eyes near their places.
        residual = np.linalg.norm(mapped - arcface_template(), axis=1)
        assert residual.max() < 10, residual
        assert mapped[0, 0] < 56 < mapped[1, 0]
        assert abs(mapped[0, 1] - mapped[1, 1]) < 5
        # Optimality: nudging the fitted transform never lowers the error.
        best = float(np.sum(residual**2))
        for nudge in (np.array([[1.01, 0, 0], [0, 1.01, 0]]),):
            worse = _apply(nudge @ np.vstack([arcface_matrix(ours), [0, 0, 1]]), ours)
            assert np.sum((worse - arcface_template()) ** 2) >= best
    chip224 = align_arcface(dlib_faces[0][1], dlib_faces[0][3], size=224)
    chip112 = align_arcface(dlib_faces[0][1], dlib_faces[0][3])
    shrunk = cv2.resize(chip224, (112, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(float) - chip112.astype(float)).mean() < 6


@settings(max_examples=60, deadline=None)
@given(
    angle=st.floats(-np.pi, np.pi),
    scale=st.floats(0.1, 10.0),
    shift=st.tuples(st.floats(-500, 500), st.floats(-500, 500)),
    seed=st.integers(0, 2**31),
)
def test_similarity_transform_recovers_an_exact_similarity(
    angle: float, scale: float, shift: tuple[float, float], seed: int
) -> None:
    points = np.random.default_rng(seed).uniform(0, 200, size=(5, 2))
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    )
    target = points @ (scale * rotation).T + np.array(shift)
    matrix = similarity_transform(points, target)
    assert np.allclose(matrix[:, :2], scale * rotation, atol=1e-6 * scale + 1e-9)
    assert np.allclose(_apply(matrix, points), target, atol=1e-6 * (1 + scale) * 500)


def test_similarity_transform_never_reflects() -> None:
    points = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 3]], float)
    mirrored = points * [-1, 1]
    matrix = similarity_transform(points, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_weights_ignore_a_zero_weight_point() -> None:
    points = np.array([[0, 0], [10, 0], [5, 8], [3, 12], [7, 12]], float)
    target = points * 2 + 5
    target[4] = [100, -50]  # an outlier, weight 0
    matrix = similarity_transform(points, target, weights=[1, 1, 1, 1, 0])
    assert np.allclose(_apply(matrix, points[:4]), target[:4])


def test_bad_landmarks_are_refused(dlib_faces) -> None:
    image = dlib_faces[0][1]
    with pytest.raises(FaceError, match="5, 2"):
        align_arcface(image, np.zeros((4, 2)))
    with pytest.raises(FaceError, match="one place"):
        align_dlib_chip(image, np.full((5, 2), 40.0))
    with pytest.raises(FaceError, match="no landmarks"):
        align_arcface(image, None)  # type: ignore[arg-type]
    with pytest.raises(FaceError, match="finite"):
        align_arcface(image, np.full((5, 2), np.nan))
    with pytest.raises(ConfigurationError, match="chip size"):
        align_arcface(image, dlib_faces[0][3], size=4)
    with pytest.raises(FaceError, match="uint8"):
        align_arcface(image.astype(np.float32), dlib_faces[0][3])  # type: ignore[arg-type]
