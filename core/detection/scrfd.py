"""SCRFD detectors from InsightFace's model zoo, loaded from a file the user brings.

SCRFD (Guo et al., "Sample and Computation Redistribution for Efficient Face
Detection", ICLR 2022) is an anchor-based single-stage detector. Its ONNX
files (weights for non-commercial use, so facefed ships none) share one
layout, which this module decodes:

- input: 1x3xHxW float, RGB, (pixel - 127.5) / 128, the image letterboxed
  into a 640x640 square (scaled to fit, placed top-left, zero padding);
- outputs: for each stride 8, 16 and 32, a score per anchor (N, 1), box
  distances (N, 4) and, in the "kps" models, landmark offsets (N, 10), all in
  units of the stride. There are two anchors per feature-map location, and
  the anchor centre of location (x, y) is (x * stride, y * stride).
- A box is (cx - d0, cy - d1, cx + d2, cy + d3); landmark k is
  (cx + o_2k, cy + o_2k+1), already in facefed's landmark order.

Overlapping boxes are removed with `hard_nms`.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from facefed.core.detection.base import check_image, make_face, sort_by_score
from facefed.core.detection.nms import hard_nms
from facefed.core.errors import ConfigurationError, ModelError
from facefed.core.settings import get_core_settings
from facefed.core.types import Face, ImageArray

logger = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2
_GPU_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network's square input.

    Attributes:
        scale: Network pixels per image pixel.
        size: Side of the square input.
    """

    scale: float
    size: int


def letterbox(
    image: ImageArray, size: int
) -> tuple[npt.NDArray[np.float32], Letterbox]:
    """Scale `image` to fit a `size` square (top-left, zero pad) and normalise.

    Args:
        image: RGB uint8 (H, W, 3).
        size: Side of the network input.

    Returns:
        The 1x3xSxS float32 tensor, (pixel - 127.5) / 128, and the fit.
    """
    height, width = image.shape[:2]
    scale = min(size / height, size / width)
    new_w = max(1, min(size, round(width * scale)))
    new_h = max(1, min(size, round(height * scale)))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # The padding is black (pixel 0) before normalisation, as in the
    # preprocessing the models were trained and exported with.
    canvas = np.full((size, size, 3), -127.5 / 128.0, dtype=np.float32)
    canvas[:new_h, :new_w] = (resized.astype(np.float32) - 127.5) / 128.0
    tensor = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None])
    return tensor, Letterbox(scale=new_h / height, size=size)


def anchor_centres(size: int, stride: int) -> npt.NDArray[np.float64]:
    """Anchor centres of one stride, two per location, row by row.

    Args:
        size: Side of the square network input.
        stride: Feature-map stride in pixels.

    Returns:
        (N, 2) x, y with N = (size / stride)^2 * 2.
    """
    cells = size // stride
    ys, xs = np.mgrid[0:cells, 0:cells]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float64) * stride
    return np.repeat(centres, ANCHORS_PER_LOCATION, axis=0)


def decode_stride(
    scores: npt.ArrayLike,
    distances: npt.ArrayLike,
    offsets: npt.ArrayLike | None,
    *,
    size: int,
    stride: int,
    score_threshold: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Turn one stride's raw outputs into boxes, scores and landmarks.

    Returns:
        Boxes (K, 4), scores (K,) and landmarks (K, 5, 2) (NaN without a
        landmark head) of the anchors scoring at least `score_threshold`, in
        network input pixels.
    """
    centres = anchor_centres(size, stride)
    score = _per_anchor(scores, 1, len(centres), stride=stride, what="scores")[:, 0]
    box_d = _per_anchor(distances, 4, len(centres), stride=stride, what="boxes")
    box_d = box_d * stride
    # A broken or overflowing model can give NaN or infinity: such anchors
    # are not faces (NaN scores already fail the threshold).
    keep = (score >= score_threshold) & np.isfinite(box_d).all(axis=1)
    c = centres[keep]
    d = box_d[keep]
    boxes = np.stack(
        [c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]],
        axis=1,
    )
    if offsets is None:
        landmarks = np.full((len(c), 5, 2), np.nan)
    else:
        o = _per_anchor(offsets, 10, len(centres), stride=stride, what="landmarks")
        landmarks = c[:, None, :] + o[keep].reshape(-1, 5, 2) * stride
    return boxes, score[keep], landmarks


def _per_anchor(
    values: npt.ArrayLike, width: int, anchors: int, *, stride: int, what: str
) -> npt.NDArray[np.float64]:
    """One stride's output as (anchors, width) floats, refusing any other size.

    Raises:
        ModelError: The output does not hold `width` numbers per anchor.
    """
    array = np.asarray(values)
    if array.dtype.kind not in "fiu" or array.size != anchors * width:
        raise ModelError(
            f"SCRFD stride {stride} should give {anchors} anchors x {width} "
            f"{what}; the model gave {array.size} values of type {array.dtype}."
        )
    return array.astype(np.float64).reshape(anchors, width)


class ScrfdDetector:
    """An SCRFD ONNX model from InsightFace's model zoo, on onnxruntime."""

    name = "scrfd"

    def __init__(
        self,
        model_path: Path,
        *,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        input_size: int = 640,
        expected_sha256: str | None = None,
    ) -> None:
        """Open the model.

        Args:
            model_path: The ONNX file; a relative path not found from the
                working folder is looked up in the model folder
                (`get_core_settings().model_dir`).
            score_threshold: Anchors scoring below this are dropped.
            nms_threshold: IoU above which the weaker of two boxes is dropped.
            input_size: Side of the square network input (a multiple of 32).
            expected_sha256: Refuse the file unless its SHA-256 matches.

        Raises:
            ModelError: Missing file, wrong checksum, or not an SCRFD layout.
            ConfigurationError: A threshold or the input size out of range.
        """
        for label, value in (("score", score_threshold), ("nms", nms_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(
                    f"SCRFD's {label} threshold must be in [0, 1]; got {value}."
                )
        if input_size % 32 or not 64 <= input_size <= 2048:
            raise ConfigurationError(
                f"SCRFD's input size must be a multiple of 32 in [64, 2048]; "
                f"got {input_size}."
            )
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.input_size = input_size
        self.path = _resolve(model_path)
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        if expected_sha256 is not None and expected_sha256.lower() != self.sha256:
            raise ModelError(
                f"{self.path.name} has SHA-256 {self.sha256}, not the expected "
                f"{expected_sha256}."
            )
        self._session = _open_session(self.path)
        self._input_name = self._check_input()
        self._outputs = self._map_outputs()
        logger.info("Loaded SCRFD model %s (sha256 %s)", self.path.name, self.sha256)

    @property
    def providers(self) -> list[str]:
        """The onnxruntime providers the session runs on."""
        return list(self._session.get_providers())

    def detect(self, image: ImageArray) -> list[Face]:
        """Detect faces; see `FaceDetector.detect`."""
        check_image(image)
        tensor, fit = letterbox(image, self.input_size)
        try:
            raw = self._session.run(None, {self._input_name: tensor})
        except Exception as error:  # onnxruntime raises its own untyped errors
            raise ModelError(
                f"onnxruntime cannot run {self.path.name} on a "
                f"{self.input_size}x{self.input_size} image: {error}"
            ) from None
        boxes, scores, landmarks = [], [], []
        for stride in STRIDES:
            score_i, box_i, kps_i = self._outputs[stride]
            b, s, k = decode_stride(
                raw[score_i],
                raw[box_i],
                None if kps_i is None else raw[kps_i],
                size=self.input_size,
                stride=stride,
                score_threshold=self.score_threshold,
            )
            boxes.append(b)
            scores.append(s)
            landmarks.append(k)
        all_boxes = np.concatenate(boxes) / fit.scale
        all_scores = np.concatenate(scores)
        all_landmarks = np.concatenate(landmarks) / fit.scale
        if not len(all_scores):
            return []
        kept = hard_nms(all_boxes, all_scores, iou_threshold=self.nms_threshold)
        faces = [
            make_face(
                all_boxes[i],
                float(all_scores[i]),
                None if np.isnan(all_landmarks[i]).any() else all_landmarks[i],
            )
            for i in kept
        ]
        return sort_by_score(faces)

    def _check_input(self) -> str:
        """Return the name of the one image input, refusing other layouts.

        Raises:
            ModelError: Not exactly one float input of rank 4 whose fixed
                dimensions fit a 1x3xSxS image.
        """
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(
                f"{self.path.name} has {len(inputs)} inputs; an SCRFD model has "
                "one image input."
            )
        shape = list(inputs[0].shape or [])
        wanted = [1, 3, self.input_size, self.input_size]
        fixed_ok = len(shape) == 4 and all(
            not isinstance(dim, int) or dim == want
            for dim, want in zip(shape, wanted, strict=True)
        )
        if inputs[0].type != "tensor(float)" or not fixed_ok:
            raise ModelError(
                f"{self.path.name} takes {inputs[0].type} of shape {shape}; an "
                f"SCRFD model with a {self.input_size} input takes tensor(float) "
                f"of shape {wanted}."
            )
        return str(inputs[0].name)

    def _map_outputs(self) -> dict[int, tuple[int, int, int | None]]:
        """Find which output is which.

        Outputs with static shapes are matched by anchor count and width.
        Exports with symbolic shapes are taken in InsightFace's order (scores,
        boxes, then landmarks, each for strides 8, 16, 32); `decode_stride`
        still checks the anchor counts at run time.
        """
        outputs = self._session.get_outputs()
        by_kind: dict[int, dict[int, int]] = {1: {}, 4: {}, 10: {}}
        for index, output in enumerate(outputs):
            shape = list(output.shape or [])
            if not shape or not all(isinstance(dim, int) for dim in shape):
                return self._map_by_position(len(outputs))
            if len(shape) >= 2 and shape[-1] in by_kind:
                by_kind[shape[-1]][int(np.prod(shape[:-1]))] = index
        mapping: dict[int, tuple[int, int, int | None]] = {}
        for stride in STRIDES:
            anchors = (self.input_size // stride) ** 2 * ANCHORS_PER_LOCATION
            score_i = by_kind[1].get(anchors)
            box_i = by_kind[4].get(anchors)
            if score_i is None or box_i is None:
                raise ModelError(
                    f"{self.path.name} is not an SCRFD model with a "
                    f"{self.input_size} input: no score and box outputs with "
                    f"{anchors} anchors for stride {stride}."
                )
            mapping[stride] = (score_i, box_i, by_kind[10].get(anchors))
        return mapping

    def _map_by_position(self, count: int) -> dict[int, tuple[int, int, int | None]]:
        if count not in (6, 9):
            raise ModelError(
                f"{self.path.name} has {count} outputs; an SCRFD model has 6 "
                "(without landmarks) or 9."
            )
        levels = len(STRIDES)
        return {
            stride: (i, i + levels, i + 2 * levels if count == 9 else None)
            for i, stride in enumerate(STRIDES)
        }


def _resolve(model_path: Path) -> Path:
    path = Path(model_path)
    if not path.is_file() and not path.is_absolute():
        path = get_core_settings().model_dir / path
    if not path.is_file():
        raise ModelError(f"No SCRFD model file at {model_path}.")
    return path


def choose_providers(available: list[str]) -> list[str]:
    """CUDA first when onnxruntime offers it, with the CPU as the fallback.

    Args:
        available: `onnxruntime.get_available_providers()`.

    Returns:
        The providers to ask for, in order of preference.
    """
    if _GPU_PROVIDER in available:
        return [_GPU_PROVIDER, "CPUExecutionProvider"]
    logger.info("CUDA is not available to onnxruntime; SCRFD runs on the CPU.")
    return ["CPUExecutionProvider"]


def _open_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = get_core_settings().threads
    if threads:
        options.intra_op_num_threads = threads
    providers = choose_providers(ort.get_available_providers())
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise ModelError(f"onnxruntime cannot load {path.name}: {error}") from error
