"""Hard and soft NMS against a brute-force pure-Python reference."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefed.core.detection.nms import NmsInputError, hard_nms, iou_matrix, soft_nms


def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_min_overlap(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def ref_hard(boxes, scores, thr, measure=ref_iou):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(measure(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
    return kept


def ref_soft(boxes, scores, method, thr, sigma, floor):
    current = {i: s for i, s in enumerate(scores) if s >= floor}
    kept, kept_scores = [], []
    while current:
        best = max(sorted(current), key=lambda i: current[i])
        kept.append(best)
        kept_scores.append(current.pop(best))
        for i in list(current):
            o = ref_iou(boxes[best], boxes[i])
            if method == "linear":
                w = 1.0 - o if o >= thr else 1.0
            else:
                w = math.exp(-(o * o) / sigma)
            current[i] *= w
            if current[i] < floor:
                del current[i]
    return kept, kept_scores


@st.composite
def box_sets(draw, max_boxes=25):
    n = draw(st.integers(0, max_boxes))
    boxes = []
    for _ in range(n):
        x = draw(st.integers(0, 60))
        y = draw(st.integers(0, 60))
        w = draw(st.integers(0, 40))
        h = draw(st.integers(0, 40))
        boxes.append([float(x), float(y), float(x + w), float(y + h)])
    scores = draw(
        st.lists(
            st.floats(0.0, 1.0, allow_nan=False, width=32),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    return boxes, scores


@settings(max_examples=300, deadline=None)
@given(box_sets(), st.floats(0.0, 1.0))
def test_hard_nms_matches_reference(data, thr):
    boxes, scores = data
    kept = hard_nms(np.array(boxes).reshape(-1, 4), np.array(scores), iou_threshold=thr)
    assert kept.tolist() == ref_hard(boxes, scores, thr)
    assert kept.dtype == np.int64


@settings(max_examples=200, deadline=None)
@given(box_sets(), st.floats(0.0, 1.0))
def test_min_overlap_nms_matches_reference(data, thr):
    boxes, scores = data
    kept = hard_nms(
        np.array(boxes).reshape(-1, 4),
        np.array(scores),
        iou_threshold=thr,
        overlap="min",
    )
    assert kept.tolist() == ref_hard(boxes, scores, thr, ref_min_overlap)


def test_min_overlap_suppresses_a_nested_box():
    boxes = [[0, 0, 100, 100], [10, 10, 30, 30]]
    # IoU is only 0.04, but the small box lies wholly inside the large one.
    assert hard_nms(boxes, [0.9, 0.8], iou_threshold=0.7).tolist() == [0, 1]
    assert hard_nms(boxes, [0.9, 0.8], iou_threshold=0.7, overlap="min").tolist() == [0]


@settings(max_examples=300, deadline=None)
@given(
    box_sets(),
    st.sampled_from(["linear", "gaussian"]),
    st.floats(0.0, 1.0),
    st.floats(0.05, 2.0),
    st.sampled_from([0.0, 0.001, 0.1]),
)
def test_soft_nms_matches_reference(data, method, thr, sigma, floor):
    boxes, scores = data
    kept, kept_scores = soft_nms(
        np.array(boxes).reshape(-1, 4),
        np.array(scores),
        method=method,
        iou_threshold=thr,
        sigma=sigma,
        score_threshold=floor,
    )
    ref_kept, ref_scores = ref_soft(boxes, scores, method, thr, sigma, floor)
    assert kept.tolist() == ref_kept
    np.testing.assert_allclose(kept_scores, ref_scores, rtol=1e-12, atol=1e-15)
    # Selection order is by non-increasing decayed score.
    assert all(np.diff(kept_scores) <= 1e-12)


def test_hard_nms_known_case():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # IoU(box 3, box 1) = 85.5 / 119.5 = 0.7155; IoU(box 3, box 0) = 100 / 105.
    assert hard_nms(boxes, scores, iou_threshold=0.5).tolist() == [3, 2]
    assert hard_nms(boxes, scores, iou_threshold=0.72).tolist() == [3, 1, 2]


def test_soft_nms_linear_known_case():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]]
    kept, scores = soft_nms(boxes, [0.9, 0.8, 0.5], method="linear")
    # The half-overlapping box keeps 0.8 * (1 - 0.5) = 0.4 and ranks last.
    assert kept.tolist() == [0, 2, 1]
    np.testing.assert_allclose(scores, [0.9, 0.5, 0.4])


def test_soft_nms_gaussian_known_case():
    kept, scores = soft_nms(
        [[0, 0, 10, 10], [0, 0, 10, 5]], [0.9, 0.8], method="gaussian", sigma=0.5
    )
    assert kept.tolist() == [0, 1]
    np.testing.assert_allclose(scores, [0.9, 0.8 * math.exp(-0.25 / 0.5)])


def test_empty_input():
    assert hard_nms(np.zeros((0, 4)), np.zeros(0), iou_threshold=0.5).size == 0
    kept, scores = soft_nms([], [], method="linear")
    assert kept.size == 0 and scores.size == 0


def test_iou_matrix():
    m = iou_matrix([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 21, 21]])
    np.testing.assert_allclose(m, [[1.0, 50 / 150, 0.0]])


@pytest.mark.parametrize(
    ("boxes", "scores", "match"),
    [
        ([[0, 0, 1]], [0.5], "shape"),
        ([[0, 0, 1, 1]], [0.5, 0.2], "match the boxes"),
        ([[0, 0, 1, float("nan")]], [0.5], "finite"),
        ([[5, 0, 1, 1]], [0.5], "x2 < x1"),
    ],
)
def test_bad_input_is_refused(boxes, scores, match):
    with pytest.raises(NmsInputError, match=match):
        hard_nms(boxes, scores, iou_threshold=0.5)


def test_bad_parameters_are_refused():
    with pytest.raises(NmsInputError, match="iou_threshold"):
        hard_nms([[0, 0, 1, 1]], [1.0], iou_threshold=1.5)
    with pytest.raises(NmsInputError, match="linear, gaussian"):
        soft_nms([[0, 0, 1, 1]], [1.0], method="box")  # type: ignore[arg-type]
    with pytest.raises(NmsInputError, match="iou, min"):
        hard_nms([[0, 0, 1, 1]], [1.0], iou_threshold=0.5, overlap="union")  # type: ignore[arg-type]
    with pytest.raises(NmsInputError, match="sigma"):
        soft_nms([[0, 0, 1, 1]], [1.0], method="gaussian", sigma=0)
