"""Detection evaluation: WIDER AP, PASCAL matching, NME on hand-made and real data."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facefed.core.detection.evaluation import (
    AnnotatedImage,
    DetectionsOnImage,
    EvaluationData,
    EvaluationDataError,
    evaluate_landmarks,
    evaluate_pascal,
    five_from_68,
    load_landmark_images,
    load_pascal,
    match_detections,
    normalised_mean_error,
    read_pts,
    voc_ap,
    wider_average_precision,
    wider_image_matches,
)


def _box(x, y, w, h):
    return [x, y, x + w, y + h]


def _wider_case():
    truth = np.array(
        [_box(0, 0, 20, 20), _box(100, 0, 20, 20), _box(200, 0, 20, 20)], float
    )
    image = AnnotatedImage(
        path=Path("case.jpg"),
        boxes=truth,
        ignore=np.zeros(3, bool),
        settings={
            # The third face is outside this setting: an ignore region.
            "easy": np.array([True, True, False]),
            "medium": np.array([True, True, True]),
            "hard": np.array([False, False, False]),
        },
    )
    detections = np.array(
        [
            _box(1, 1, 20, 20),  # face 0
            _box(200, 1, 20, 20),  # face 2
            _box(400, 0, 20, 20),  # nothing
            _box(101, 0, 20, 20),  # face 1
        ],
        float,
    )
    return DetectionsOnImage(image, detections, np.array([0.9, 0.8, 0.7, 0.6]))


def test_wider_matching_ignores_faces_outside_the_setting():
    case = _wider_case()
    counted, found = wider_image_matches(
        case.boxes, case.image.boxes, case.image.settings["easy"]
    )
    assert counted.tolist() == [True, False, True, True]
    assert found.tolist() == [1, 1, 1, 2]


def test_wider_ap_by_hand():
    case = _wider_case()
    # easy: P/R points (1, 0.5), then (1/2, 0.5), then (2/3, 1):
    # AP = 0.5 * 1 + 0.5 * 2/3.
    ap, recall, precision = wider_average_precision([case], "easy")
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert recall[-1] == 1.0 and precision[-1] == pytest.approx(2 / 3)
    # medium: every face counts; points (1, 1/3), (1, 2/3), (2/3, 2/3), (3/4, 1).
    ap, _, _ = wider_average_precision([case], "medium")
    assert ap == pytest.approx(2 / 3 * 1 + 1 / 3 * 0.75)
    with pytest.raises(EvaluationDataError, match="hard"):
        wider_average_precision([case], "hard")


def test_wider_duplicate_detection_is_a_false_positive():
    case = _wider_case()
    dup = DetectionsOnImage(
        case.image,
        np.array([_box(0, 0, 20, 20), _box(0, 0, 20, 20), _box(100, 0, 20, 20)], float),
        np.array([0.9, 0.8, 0.7]),
    )
    ap, recall, precision = wider_average_precision([dup], "easy")
    assert recall[-1] == 1.0 and precision[-1] == pytest.approx(2 / 3)
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_voc_ap_uses_the_precision_envelope():
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([0.5, 1.0, 0.5])) == 0.75
    assert voc_ap(np.array([1.0]), np.array([1.0])) == 1.0


def test_pascal_matching_by_hand():
    truth = np.array(
        [_box(0, 0, 10, 10), _box(50, 50, 10, 10), _box(100, 0, 10, 10)], float
    )
    ignore = np.array([False, False, True])
    preds = np.array(
        [
            _box(0, 0, 10, 10),  # TP
            _box(1, 1, 10, 10),  # duplicate of face 0: FP
            _box(100, 0, 10, 10),  # ignored face: not counted
            _box(100, 1, 10, 10),  # second hit on the ignored face: not counted
            _box(300, 300, 10, 10),  # FP
        ],
        float,
    )
    counts = match_detections(preds, truth, ignore, iou_threshold=0.4)
    assert (counts.true_positives, counts.false_positives, counts.faces) == (1, 2, 2)
    assert counts.recall == 0.5
    assert counts.precision == pytest.approx(1 / 3)


def test_nme_by_hand():
    truth = np.array([[0, 0], [10, 0], [5, 5], [2, 8], [8, 8]], float)
    moved = truth + np.array([[1, 0], [0, 0], [0, 2], [0, 0], [0, 0]])
    assert normalised_mean_error(moved, truth) == pytest.approx(3 / 5 / 10)


def test_five_points_from_ibug_68(test_data):
    points = read_pts(test_data / "landmarks" / "takeo.pts")
    five = five_from_68(points)
    np.testing.assert_allclose(five[0], points[36:42].mean(0))
    np.testing.assert_allclose(five[2], points[30])
    np.testing.assert_allclose(five[4], points[54])
    assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0]


def test_bad_pts_file_is_refused(tmp_path):
    bad = tmp_path / "x.pts"
    bad.write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    with pytest.raises(EvaluationDataError, match="not an iBUG"):
        read_pts(bad)


def test_default_detector_finds_all_pascal_faces(test_data):
    from facefed.core.detection.registry import create_detector

    images = load_pascal(test_data)
    assert sum(len(img.boxes) for img in images) == 18
    counts = evaluate_pascal(create_detector("yunet"), images, [])
    assert counts.true_positives == 18 and counts.recall == 1.0


def test_pytorch_detectors_on_pascal_and_landmarks(test_data):
    from facefed.models.detectors.mtcnn import create_detector as mtcnn
    from facefed.models.detectors.retinaface import create_detector as retinaface

    images = load_pascal(test_data)
    retina = retinaface()
    assert evaluate_pascal(retina, images, []).true_positives == 18
    assert evaluate_pascal(mtcnn(), images, []).true_positives >= 16
    errors, missing = evaluate_landmarks(retina, load_landmark_images(test_data), [])
    assert not missing
    # breakingbad.jpg shows two faces; the annotated right-hand one must be found.
    assert set(errors) == {"breakingbad.jpg", "takeo.ppm"}
    assert errors["takeo.ppm"] < 0.08 and errors["breakingbad.jpg"] < 0.25


def test_absent_data_is_reported_clearly(tmp_path):
    with pytest.raises(EvaluationDataError, match="absent"):
        EvaluationData.load(tmp_path / "nowhere")
    with pytest.raises(EvaluationDataError, match="no detection evaluation data"):
        EvaluationData.load(tmp_path)


def test_cli_eval_detect_writes_json(test_data, tmp_path):
    import typer

    from facefed.core.detection.eval_commands import register

    app, eval_app = typer.Typer(), typer.Typer()
    app.add_typer(eval_app, name="eval")
    register(app, eval_app)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "detect",
            "--data",
            str(test_data),
            "--detectors",
            "retinaface",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "retinaface" in result.output
    report = json.loads(out.read_text())["reports"][0]
    assert report["pascal"]["true_positives"] == 18
    assert report["nme"]["takeo.ppm"] < 0.08
    result = CliRunner().invoke(app, ["eval", "detect", "--data", str(tmp_path / "no")])
    assert result.exit_code != 0
