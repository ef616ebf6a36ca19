"""Greedy and soft non-maximum suppression of axis-aligned boxes (x1, y1, x2, y2).

Both functions work on boxes in pixels with the continuous area convention
``(x2 - x1) * (y2 - y1)`` (no "+1"), compute in float64 and are vectorised over
the boxes still in play, so each step is one numpy pass.
"""

import logging
import math
from typing import Literal

import numpy as np
import numpy.typing as npt

from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]

SoftNmsMethod = Literal["linear", "gaussian"]
SOFT_NMS_METHODS: tuple[SoftNmsMethod, ...] = ("linear", "gaussian")
OverlapMeasure = Literal["iou", "min"]
OVERLAP_MEASURES: tuple[OverlapMeasure, ...] = ("iou", "min")


class NmsInputError(ConfigurationError):
    """Raised when boxes, scores or a threshold given to NMS are malformed."""


def _validated(
    boxes: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[Float64Array, Float64Array]:
    """Return boxes (N, 4) and scores (N,) as float64 after checking them."""
    box_array = np.asarray(boxes, dtype=np.float64)
    score_array = np.asarray(scores, dtype=np.float64)
    if box_array.size == 0 and score_array.size == 0:
        return box_array.reshape(0, 4), score_array.reshape(0)
    if box_array.ndim != 2 or box_array.shape[1] != 4:
        raise NmsInputError(
            f"Boxes must have shape (N, 4) as x1, y1, x2, y2; got {box_array.shape}."
        )
    if score_array.shape != (box_array.shape[0],):
        raise NmsInputError(
            f"Scores must have shape ({box_array.shape[0]},) to match the boxes; "
            f"got {score_array.shape}."
        )
    if not (np.isfinite(box_array).all() and np.isfinite(score_array).all()):
        raise NmsInputError("Boxes and scores must be finite; got NaN or infinity.")
    widths = box_array[:, 2] - box_array[:, 0]
    heights = box_array[:, 3] - box_array[:, 1]
    if (widths < 0).any() or (heights < 0).any():
        bad = int(np.flatnonzero((widths < 0) | (heights < 0))[0])
        raise NmsInputError(
            f"Box {bad} has x2 < x1 or y2 < y1: {box_array[bad].tolist()}."
        )
    return box_array, score_array


def _check_fraction(name: str, value: float) -> None:
    """Refuse a threshold outside [0, 1]."""
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise NmsInputError(f"{name} must be a number in [0, 1]; got {value!r}.")


def iou_one_to_many(
    box: Float64Array, others: Float64Array, *, overlap: OverlapMeasure = "iou"
) -> Float64Array:
    """Overlap of one box with each of several boxes.

    Args:
        box: (4,) x1, y1, x2, y2.
        others: (M, 4) boxes in the same format.
        overlap: "iou" (intersection over union) or "min" (intersection over
            the smaller area, which flags a box nested inside another).

    Returns:
        (M,) overlaps in [0, 1]; 0 where the denominator is zero.
    """
    inter_w = np.clip(
        np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None
    )
    inter_h = np.clip(
        np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None
    )
    inter = inter_w * inter_h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    denominator = np.minimum(area, areas) if overlap == "min" else union
    # Degenerate boxes have no overlap to speak of: define it as 0.
    return np.divide(
        inter, denominator, out=np.zeros_like(inter), where=denominator > 0
    )


def iou_matrix(boxes_a: npt.ArrayLike, boxes_b: npt.ArrayLike) -> Float64Array:
    """Pairwise intersection over union of two sets of xyxy boxes.

    Args:
        boxes_a: (N, 4) boxes.
        boxes_b: (M, 4) boxes.

    Returns:
        (N, M) IoU values; 0 for pairs whose union is empty.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    inter_w = np.clip(
        np.minimum(a[:, None, 2], b[None, :, 2])
        - np.maximum(a[:, None, 0], b[None, :, 0]),
        0,
        None,
    )
    inter_h = np.clip(
        np.minimum(a[:, None, 3], b[None, :, 3])
        - np.maximum(a[:, None, 1], b[None, :, 1]),
        0,
        None,
    )
    inter = inter_w * inter_h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def hard_nms(
    boxes: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    iou_threshold: float,
    overlap: OverlapMeasure = "iou",
) -> IntArray:
    """Greedy non-maximum suppression.

    Repeatedly keeps the highest-scoring box left and drops every remaining box
    whose overlap with it is strictly greater than ``iou_threshold``. Equal
    scores are taken in input order.

    Args:
        boxes: (N, 4) boxes as x1, y1, x2, y2.
        scores: (N,) confidences.
        iou_threshold: Overlap above which a lower-scoring box is suppressed.
        overlap: "iou", or "min" for intersection over the smaller box, as
            MTCNN's last stage uses (Zhang et al., 2016).

    Returns:
        Indices into ``boxes`` of the kept boxes, by descending score.

    Raises:
        NmsInputError: If the shapes, values or threshold are invalid.
    """
    _check_fraction("iou_threshold", iou_threshold)
    if overlap not in OVERLAP_MEASURES:
        raise NmsInputError(
            f"Unknown overlap measure {overlap!r}; choose one of "
            f"{', '.join(OVERLAP_MEASURES)}."
        )
    box_array, score_array = _validated(boxes, scores)
    order = np.argsort(-score_array, kind="stable")
    kept: list[int] = []
    while order.size:
        best = int(order[0])
        kept.append(best)
        rest = order[1:]
        overlaps = iou_one_to_many(box_array[best], box_array[rest], overlap=overlap)
        order = rest[overlaps <= iou_threshold]
    return np.asarray(kept, dtype=np.int64)


def soft_nms(
    boxes: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    method: SoftNmsMethod,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
) -> tuple[IntArray, Float64Array]:
    """Soft-NMS: decay the scores of overlapping boxes instead of removing them.

    Bodla, Singh, Chellappa and Davis, "Soft-NMS -- Improving Object Detection
    With One Line of Code", ICCV 2017 (Algorithm 1). At each step the box with
    the highest current score is selected and every remaining box ``b_i`` has
    its score rescaled by

    * linear: ``1 - IoU(M, b_i)`` when ``IoU >= iou_threshold``, else 1;
    * gaussian: ``exp(-IoU(M, b_i)^2 / sigma)`` for every box (the threshold is
      not used, as in the paper).

    Boxes whose score falls below ``score_threshold`` are dropped. Equal
    current scores are taken in input order.

    Args:
        boxes: (N, 4) boxes as x1, y1, x2, y2.
        scores: (N,) confidences.
        method: "linear" or "gaussian" decay.
        iou_threshold: Overlap from which the linear decay applies.
        sigma: Width of the Gaussian decay; must be positive.
        score_threshold: Boxes scoring below this after decay are discarded.

    Returns:
        The kept indices in selection order (non-increasing decayed score) and
        their decayed scores.

    Raises:
        NmsInputError: If the shapes, values, method or parameters are invalid.
    """
    if method not in SOFT_NMS_METHODS:
        raise NmsInputError(
            f"Unknown soft-NMS method {method!r}; choose one of "
            f"{', '.join(SOFT_NMS_METHODS)}."
        )
    _check_fraction("iou_threshold", iou_threshold)
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise NmsInputError(f"sigma must be a positive number; got {sigma!r}.")
    if not (isinstance(score_threshold, int | float) and score_threshold >= 0):
        raise NmsInputError(
            f"score_threshold must be a non-negative number; got {score_threshold!r}."
        )
    box_array, score_array = _validated(boxes, scores)
    remaining = np.arange(score_array.shape[0])
    current = score_array.copy()
    kept: list[int] = []
    kept_scores: list[float] = []
    # Only boxes that start above the floor can ever be selected.
    remaining = remaining[current[remaining] >= score_threshold]
    while remaining.size:
        pick = int(np.argmax(current[remaining]))
        best = int(remaining[pick])
        kept.append(best)
        kept_scores.append(float(current[best]))
        remaining = np.delete(remaining, pick)
        if not remaining.size:
            break
        overlaps = iou_one_to_many(box_array[best], box_array[remaining])
        if method == "linear":
            decay = np.where(overlaps >= iou_threshold, 1.0 - overlaps, 1.0)
        else:
            decay = np.exp(-(overlaps * overlaps) / sigma)
        current[remaining] = current[remaining] * decay
        remaining = remaining[current[remaining] >= score_threshold]
    return np.asarray(kept, dtype=np.int64), np.asarray(kept_scores, dtype=np.float64)
