"""MTCNN: the P-Net / R-Net / O-Net cascade for faces and five landmarks.

Zhang, Zhang, Li and Qiao, "Joint Face Detection and Alignment Using Multitask
Cascaded Convolutional Networks", IEEE Signal Processing Letters 23(10), 2016.
An image pyramid (scale factor 0.709, smallest face 20 px) feeds the fully
convolutional P-Net, whose 12x12 windows at stride 2 are calibrated and
suppressed, squared and re-scored by R-Net on 24x24 crops, then by O-Net on
48x48 crops, which also gives the landmarks. The networks are defined here and
load the facenet-pytorch conversion of the original weights; like those, they
take RGB scaled to [-1, 1] and flatten their last feature map in (W, H, C)
order, inherited from the Caffe models.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from facefed.core.detection.base import check_image
from facefed.core.detection.nms import hard_nms
from facefed.core.errors import ConfigurationError, ModelError
from facefed.core.types import Face, ImageArray
from facefed.models.detectors.common import (
    WEIGHTS_DIR,
    apply_thread_setting,
    faces_from_arrays,
    load_state_dict,
    select_device,
)

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = WEIGHTS_DIR / "mtcnn"
PNET_CELL = 12
PNET_STRIDE = 2

FloatArray = npt.NDArray[np.float32]


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12x12 receptive field."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return face probability maps (N, 2, h, w) and offsets (N, 4, h, w)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1), self.conv4_2(x)


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return face probabilities (N, 2) and box offsets (N, 4)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The converted Caffe weights expect a (W, H, C) flattening order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.dense5_1(x), dim=1), self.dense5_2(x)


class ONet(nn.Module):
    """Output network on 48x48 crops, with five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return probabilities (N, 2), offsets (N, 4), landmarks (N, 10)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return (
            torch.softmax(self.dense6_1(x), dim=1),
            self.dense6_2(x),
            self.dense6_3(x),
        )


def load_mtcnn(folder: Path = DEFAULT_WEIGHTS_DIR) -> tuple[PNet, RNet, ONet]:
    """Build P-Net, R-Net and O-Net and load ``{pnet,rnet,onet}.pt`` strictly.

    Raises:
        ModelError: If a file is missing or does not fit its network.
    """
    networks = (PNet(), RNet(), ONet())
    for name, network in zip(("pnet", "rnet", "onet"), networks, strict=True):
        path = folder / f"{name}.pt"
        try:
            network.load_state_dict(load_state_dict(path), strict=True)
        except RuntimeError as error:
            raise ModelError(f"{path} does not fit MTCNN's {name}: {error}") from error
        network.eval()
    return networks


@dataclass(frozen=True)
class MtcnnConfig:
    """Cascade settings, defaulting to the paper's.

    Attributes:
        min_face_size: Smallest face searched for, in pixels.
        scale_factor: Ratio between consecutive pyramid levels.
        thresholds: Face probability kept after P-Net, R-Net and O-Net.
        nms_iou: Overlap thresholds of the suppression within a scale, across
            scales, after R-Net (IoU) and after O-Net (intersection over the
            smaller box, as in the paper's code, so a box nested in a face
            is suppressed).
    """

    min_face_size: int = 20
    scale_factor: float = 0.709
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    nms_iou: tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7)

    def __post_init__(self) -> None:
        """Validate the settings."""
        if self.min_face_size < PNET_CELL:
            raise ConfigurationError(
                f"min_face_size must be at least {PNET_CELL} pixels; "
                f"got {self.min_face_size}."
            )
        if not 0.1 <= self.scale_factor < 1.0:
            raise ConfigurationError(
                f"scale_factor must be in [0.1, 1); got {self.scale_factor}."
            )
        for name, values in (
            ("thresholds", self.thresholds),
            ("nms_iou", self.nms_iou),
        ):
            if not all(0.0 <= value <= 1.0 for value in values):
                raise ConfigurationError(
                    f"Every value of {name} must be in [0, 1]; got {values}."
                )


def pyramid_scales(
    height: int, width: int, *, min_face_size: int, factor: float
) -> list[float]:
    """Scales at which P-Net's 12-pixel window covers faces of min_face_size up.

    Returns:
        Decreasing scales; empty when the image is smaller than one window.
    """
    scale = PNET_CELL / min_face_size
    side = min(height, width) * scale
    scales = []
    while side >= PNET_CELL:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def calibrate(boxes: FloatArray, offsets: FloatArray) -> FloatArray:
    """Move box corners by offsets given as fractions of the box size."""
    sizes = np.stack(
        [boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1
    ).astype(np.float32)
    return (boxes + offsets * np.tile(sizes, 2)).astype(np.float32)


def square(boxes: FloatArray) -> FloatArray:
    """Grow each box to a square of its longer side around the same centre."""
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack(
        [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1
    ).astype(np.float32)


def crop_patches(image: ImageArray, boxes: FloatArray, size: int) -> FloatArray:
    """Cut each box out of the image (zero padding outside) and resize it.

    Returns:
        (N, 3, size, size) float32 scaled to [-1, 1], as the networks expect.
    """
    height, width = image.shape[:2]
    patches = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    for i, box in enumerate(np.round(boxes).astype(np.int64)):
        x1, y1, x2, y2 = (int(v) for v in box)
        canvas = np.zeros((max(1, y2 - y1), max(1, x2 - x1), 3), dtype=np.uint8)
        sx1, sy1 = max(0, x1), max(0, y1)
        sx2, sy2 = min(width, x2), min(height, y2)
        if sx2 > sx1 and sy2 > sy1:
            canvas[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
        patches[i] = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return _normalise(patches)


def _normalise(pixels: npt.NDArray[np.generic]) -> FloatArray:
    """HWC uint8 values to NCHW-ready float32 in [-1, 1]."""
    scaled = (pixels.astype(np.float32) - 127.5) * (1.0 / 128.0)
    return np.ascontiguousarray(np.moveaxis(scaled, -1, -3))


class MtcnnDetector:
    """Three-stage MTCNN face detector with five landmarks, in PyTorch on the CPU.

    Attributes:
        name: "mtcnn".
        config: The cascade settings.
    """

    name = "mtcnn"

    def __init__(
        self,
        config: MtcnnConfig | None = None,
        *,
        weights: Path = DEFAULT_WEIGHTS_DIR,
        device: str | None = None,
    ) -> None:
        """Load the three networks.

        Args:
            config: Cascade settings; defaults as in ``MtcnnConfig``.
            weights: Folder holding ``pnet.pt``, ``rnet.pt`` and ``onet.pt``.
            device: "cpu" or "cuda"; None uses a GPU when torch sees one.
        """
        self.config = config or MtcnnConfig()
        apply_thread_setting()
        self.device = select_device(device)
        pnet, rnet, onet = load_mtcnn(weights)
        self.pnet = pnet.to(self.device)
        self.rnet = rnet.to(self.device)
        self.onet = onet.to(self.device)

    def detect(self, image: ImageArray) -> list[Face]:
        """Detect faces in an RGB uint8 image.

        Returns:
            Faces with boxes and landmarks in image pixels, by descending score.

        Raises:
            ImageError: If ``image`` is not an RGB uint8 array.
        """
        check_image(image)
        with torch.inference_mode():
            boxes, _ = self._propose(image)
            if len(boxes):
                boxes, _ = self._refine(image, boxes)
            if len(boxes):
                return self._output(image, boxes)
        return []

    def _tensor(self, array: FloatArray) -> torch.Tensor:
        """A float32 batch on the detector's device."""
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _propose(self, image: ImageArray) -> tuple[FloatArray, FloatArray]:
        """Stage 1: P-Net over the pyramid, NMS per scale then across scales."""
        height, width = image.shape[:2]
        config = self.config
        found_boxes, found_scores = [], []
        for scale in pyramid_scales(
            height,
            width,
            min_face_size=config.min_face_size,
            factor=config.scale_factor,
        ):
            size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
            level = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            probs, offsets = self.pnet(self._tensor(_normalise(level)[None]))
            face = probs[0, 1].cpu().numpy()
            rows, cols = np.nonzero(face >= config.thresholds[0])
            if rows.size == 0:
                continue
            # Each output cell is a 12x12 window at stride 2 of this level.
            corners = np.stack([cols, rows], axis=1).astype(np.float32) * PNET_STRIDE
            boxes = np.concatenate([corners, corners + PNET_CELL], axis=1) / scale
            scores = face[rows, cols]
            kept = hard_nms(boxes, scores, iou_threshold=config.nms_iou[0])
            level_offsets = offsets[0].cpu().numpy()[:, rows, cols].T
            found_boxes.append(calibrate(boxes[kept], level_offsets[kept]))
            found_scores.append(scores[kept])
        if not found_boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        boxes = np.concatenate(found_boxes)
        scores = np.concatenate(found_scores)
        kept = hard_nms(boxes, scores, iou_threshold=config.nms_iou[1])
        return square(boxes[kept]), scores[kept]

    def _refine(
        self, image: ImageArray, boxes: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Stage 2: R-Net re-scores and calibrates 24x24 crops."""
        probs, offsets = self.rnet(self._tensor(crop_patches(image, boxes, 24)))
        scores = probs[:, 1].cpu().numpy()
        keep = scores >= self.config.thresholds[1]
        boxes = calibrate(boxes[keep], offsets.cpu().numpy()[keep])
        scores = scores[keep]
        kept = hard_nms(boxes, scores, iou_threshold=self.config.nms_iou[2])
        return square(boxes[kept]), scores[kept]

    def _output(self, image: ImageArray, boxes: FloatArray) -> list[Face]:
        """Stage 3: O-Net scores, calibrates and places the landmarks."""
        probs, offsets, marks = self.onet(self._tensor(crop_patches(image, boxes, 48)))
        scores = probs[:, 1].cpu().numpy()
        keep = scores >= self.config.thresholds[2]
        boxes, scores, marks_np = boxes[keep], scores[keep], marks.cpu().numpy()[keep]
        # O-Net gives the five x fractions then the five y fractions of the
        # square input box, left to right in the image: facefed's order.
        sizes = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
        points = np.stack([marks_np[:, :5], marks_np[:, 5:]], axis=2)
        points = boxes[:, None, :2] + points * sizes[:, None, :]
        boxes = calibrate(boxes, offsets.cpu().numpy()[keep])
        kept = hard_nms(
            boxes, scores, iou_threshold=self.config.nms_iou[3], overlap="min"
        )
        return faces_from_arrays(boxes[kept], scores[kept], points[kept])


def create_detector() -> MtcnnDetector:
    """Return an MTCNN detector with the shipped weights and the paper's settings."""
    return MtcnnDetector()
