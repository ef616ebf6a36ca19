"""RetinaFace with a MobileNetV1-0.25 backbone: network, priors, decoding, detector.

Deng, Guo, Ververas, Kotsia and Zafeiriou, "RetinaFace: Single-shot Multi-level
Face Localisation in the Wild", CVPR 2020. The network is a MobileNetV1 at
width 0.25 (Howard et al., 2017) whose stride-8, 16 and 32 feature maps feed a
feature pyramid (Lin et al., 2017), one SSH context module per level (Najibi et
al., "SSH: Single Stage Headless Face Detector", ICCV 2017) and 1x1 heads for
face/background, box offsets and five landmark offsets, two anchors per cell.
The module names mirror the published MobileNet-0.25 state dict so that it
loads with ``strict=True``.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as func
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

DEFAULT_WEIGHTS = WEIGHTS_DIR / "retinaface" / "RetinaFace_mobilenet025.pth"
# Anchor sizes in pixels per pyramid level, and the level strides.
MIN_SIZES: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
STEPS: tuple[int, ...] = (8, 16, 32)
# Box-regression variances of the SSD encoding (centre, size).
VARIANCES: tuple[float, float] = (0.1, 0.2)
# Per-channel BGR mean the network was trained with.
BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 123.0)


def conv_bn(cin: int, cout: int, stride: int, slope: float) -> nn.Sequential:
    """3x3 convolution, batch norm, leaky ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(negative_slope=slope, inplace=True),
    )


def conv_bn_linear(cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution and batch norm without activation."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
    )


def conv1x1_bn(cin: int, cout: int, slope: float) -> nn.Sequential:
    """1x1 convolution, batch norm, leaky ReLU (pyramid lateral)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(negative_slope=slope, inplace=True),
    )


def depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNetV1 block: depthwise 3x3 then pointwise 1x1, each BN + leaky."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.LeakyReLU(negative_slope=0.1, inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(negative_slope=0.1, inplace=True),
    )


class Backbone(nn.Module):
    """MobileNetV1 at width 0.25, cut into three stages (strides 8, 16, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, 0.1),
            depthwise_separable(8, 16, 1),
            depthwise_separable(16, 32, 2),
            depthwise_separable(32, 32, 1),
            depthwise_separable(32, 64, 2),
            depthwise_separable(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            depthwise_separable(64, 128, 2),
            *[depthwise_separable(128, 128, 1) for _ in range(5)],
        )
        self.stage3 = nn.Sequential(
            depthwise_separable(128, 256, 2), depthwise_separable(256, 256, 1)
        )

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the three stage outputs."""
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return c3, c4, c5


class Pyramid(nn.Module):
    """Top-down feature pyramid with nearest upsampling and 3x3 merges."""

    def __init__(self, channels: tuple[int, int, int], width: int) -> None:
        super().__init__()
        self.output1 = conv1x1_bn(channels[0], width, 0.1)
        self.output2 = conv1x1_bn(channels[1], width, 0.1)
        self.output3 = conv1x1_bn(channels[2], width, 0.1)
        self.merge1 = conv_bn(width, width, 1, 0.1)
        self.merge2 = conv_bn(width, width, 1, 0.1)

    def forward(
        self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> list[torch.Tensor]:
        """Merge coarse levels into finer ones; return the three levels."""
        p3 = self.output1(feats[0])
        p4 = self.output2(feats[1])
        p5 = self.output3(feats[2])
        p4 = self.merge2(p4 + func.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + func.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class ContextModule(nn.Module):
    """SSH context module: 3x3, stacked 5x5 and 7x7 receptive fields."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv3X3 = conv_bn_linear(width, width // 2)
        self.conv5X5_1 = conv_bn(width, width // 4, 1, 0.1)
        self.conv5X5_2 = conv_bn_linear(width // 4, width // 4)
        self.conv7X7_2 = conv_bn(width // 4, width // 4, 1, 0.1)
        self.conv7x7_3 = conv_bn_linear(width // 4, width // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the three branches and apply ReLU."""
        branch3 = self.conv3X3(x)
        shared = self.conv5X5_1(x)
        branch5 = self.conv5X5_2(shared)
        branch7 = self.conv7x7_3(self.conv7X7_2(shared))
        return func.relu(torch.cat([branch3, branch5, branch7], dim=1))


class Head(nn.Module):
    """1x1 convolution giving ``values`` numbers per anchor, flattened."""

    def __init__(self, width: int, anchors: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(width, anchors * values, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (N, H * W * anchors, values) in row-major cell order."""
        out = self.conv1x1(x).permute(0, 2, 3, 1).contiguous()
        return out.view(out.shape[0], -1, self.values)


class RetinaFaceNet(nn.Module):
    """RetinaFace MobileNet-0.25 returning box, class and landmark outputs.

    Input: (N, 3, H, W) float BGR minus ``BGR_MEAN``. Outputs: box offsets
    (N, A, 4), face/background probabilities after softmax (N, A, 2) and
    landmark offsets (N, A, 10), A = 2 anchors x cells of the 3 levels.
    """

    def __init__(self) -> None:
        super().__init__()
        width, anchors = 64, 2
        self.body = Backbone()
        self.fpn = Pyramid((64, 128, 256), width)
        self.ssh1 = ContextModule(width)
        self.ssh2 = ContextModule(width)
        self.ssh3 = ContextModule(width)
        self.ClassHead = nn.ModuleList(Head(width, anchors, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(width, anchors, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(width, anchors, 10) for _ in range(3))

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the detector; see the class docstring for the shapes."""
        levels = self.fpn(self.body(x))
        feats = [
            self.ssh1(levels[0]),
            self.ssh2(levels[1]),
            self.ssh3(levels[2]),
        ]
        boxes = torch.cat(
            [head(f) for head, f in zip(self.BboxHead, feats, strict=True)], 1
        )
        logits = torch.cat(
            [head(f) for head, f in zip(self.ClassHead, feats, strict=True)], 1
        )
        marks = torch.cat(
            [head(f) for head, f in zip(self.LandmarkHead, feats, strict=True)],
            1,
        )
        return boxes, func.softmax(logits, dim=-1), marks


def load_retinaface(path: Path = DEFAULT_WEIGHTS) -> RetinaFaceNet:
    """Build the network and load a MobileNet-0.25 state dict strictly.

    Args:
        path: A ``.pth`` state dict (a ``module.`` prefix is accepted).

    Returns:
        The network in eval mode on the CPU.

    Raises:
        ModelError: If the file is missing or does not fit the architecture.
    """
    network = RetinaFaceNet()
    state = load_state_dict(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelError(
            f"{path} is not a RetinaFace MobileNet-0.25 state dict: {error}"
        ) from error
    return network.eval()


def prior_boxes(height: int, width: int) -> npt.NDArray[np.float32]:
    """Anchor boxes for an input of ``height`` x ``width`` pixels.

    One anchor per (level, cell, size), ordered level by level, cells in
    row-major order, sizes in ``MIN_SIZES`` order, matching the heads' output.

    Returns:
        (A, 4) centre x, centre y, width, height, normalised by the input size.
    """
    parts = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid(
            (np.arange(rows) + 0.5) * step / height,
            (np.arange(cols) + 0.5) * step / width,
            indexing="ij",
        )
        level = np.empty((rows, cols, len(sizes), 4), dtype=np.float64)
        level[..., 0] = cx[..., None]
        level[..., 1] = cy[..., None]
        level[..., 2] = np.asarray(sizes, dtype=np.float64) / width
        level[..., 3] = np.asarray(sizes, dtype=np.float64) / height
        parts.append(level.reshape(-1, 4))
    return np.concatenate(parts).astype(np.float32)


def decode_boxes(
    offsets: npt.NDArray[np.float32], priors: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Invert the SSD box encoding (Liu et al., 2016) with variances (0.1, 0.2).

    Returns:
        (A, 4) x1, y1, x2, y2 normalised by the input size.
    """
    centres = priors[:, :2] + offsets[:, :2] * VARIANCES[0] * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(offsets[:, 2:] * VARIANCES[1])
    return np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)


def decode_landmarks(
    offsets: npt.NDArray[np.float32], priors: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Decode five landmark offsets per anchor (centre variance 0.1).

    Returns:
        (A, 5, 2) x, y normalised by the input size, in the network's order
        (eye, eye, nose, mouth, mouth, left to right in the image), which is
        facefed's order.
    """
    points = offsets.reshape(-1, 5, 2)
    return (priors[:, None, :2] + points * VARIANCES[0] * priors[:, None, 2:]).astype(
        np.float32
    )


@dataclass(frozen=True)
class RetinaFaceConfig:
    """Inference settings of the RetinaFace detector.

    Attributes:
        score_threshold: Minimum face probability kept.
        nms_iou: IoU above which lower-scoring boxes are suppressed.
        max_side: Images whose longer side exceeds this are downscaled first
            (None: always run at full resolution).
        top_k: Candidates kept before NMS, by score.
    """

    score_threshold: float = 0.5
    nms_iou: float = 0.4
    max_side: int | None = 1280
    top_k: int = 5000

    def __post_init__(self) -> None:
        """Validate the settings."""
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigurationError(
                f"score_threshold must be in [0, 1]; got {self.score_threshold}."
            )
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ConfigurationError(f"nms_iou must be in [0, 1]; got {self.nms_iou}.")
        if self.max_side is not None and self.max_side < 32:
            raise ConfigurationError(
                f"max_side must be at least 32 pixels; got {self.max_side}."
            )
        if self.top_k < 1:
            raise ConfigurationError(f"top_k must be positive; got {self.top_k}.")


class RetinaFaceDetector:
    """Face detector running RetinaFace MobileNet-0.25 in PyTorch on the CPU.

    Attributes:
        name: "retinaface".
        config: The inference settings.
    """

    name = "retinaface"

    def __init__(
        self,
        config: RetinaFaceConfig | None = None,
        *,
        weights: Path = DEFAULT_WEIGHTS,
        device: str | None = None,
    ) -> None:
        """Load the network.

        Args:
            config: Inference settings; defaults as in ``RetinaFaceConfig``.
            weights: State dict to load.
            device: "cpu" or "cuda"; None uses a GPU when torch sees one.
        """
        self.config = config or RetinaFaceConfig()
        apply_thread_setting()
        self.device = select_device(device)
        self.network = load_retinaface(weights).to(self.device)

    def detect(self, image: ImageArray) -> list[Face]:
        """Detect faces in an RGB uint8 image.

        Returns:
            Faces with boxes and landmarks in image pixels, by descending score.

        Raises:
            ImageError: If ``image`` is not an RGB uint8 array.
        """
        check_image(image)
        height, width = image.shape[:2]
        scale = 1.0
        if self.config.max_side is not None and max(height, width) > (
            self.config.max_side
        ):
            scale = self.config.max_side / max(height, width)
            image = cv2.resize(
                image,
                (max(1, round(width * scale)), max(1, round(height * scale))),
                interpolation=cv2.INTER_AREA,
            )
        net_h, net_w = image.shape[:2]
        # The network was trained on BGR minus the dataset mean, unscaled.
        blob = image[:, :, ::-1].astype(np.float32) - np.asarray(
            BGR_MEAN, dtype=np.float32
        )
        tensor = torch.from_numpy(np.ascontiguousarray(blob.transpose(2, 0, 1)))
        with torch.inference_mode():
            offsets, probs, marks = self.network(tensor[None].to(self.device))
        return self._postprocess(
            offsets[0].cpu().numpy(),
            probs[0, :, 1].cpu().numpy(),
            marks[0].cpu().numpy(),
            (net_h, net_w),
            scale,
        )

    def _postprocess(
        self,
        offsets: npt.NDArray[np.float32],
        scores: npt.NDArray[np.float32],
        marks: npt.NDArray[np.float32],
        size: tuple[int, int],
        scale: float,
    ) -> list[Face]:
        """Threshold, decode, suppress and rescale to the original image."""
        keep = np.flatnonzero(scores >= self.config.score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: self.config.top_k]
        if keep.size == 0:
            return []
        priors = prior_boxes(*size)[keep]
        pixels = np.asarray([size[1], size[0]], dtype=np.float32)
        boxes = decode_boxes(offsets[keep], priors) * np.tile(pixels, 2) / scale
        points = decode_landmarks(marks[keep], priors) * pixels / scale
        kept = hard_nms(boxes, scores[keep], iou_threshold=self.config.nms_iou)
        return faces_from_arrays(boxes[kept], scores[keep][kept], points[kept])


def export_onnx(path: Path, *, weights: Path = DEFAULT_WEIGHTS) -> Path:
    """Export the network (without prior decoding) to ONNX with dynamic H, W.

    The graph takes ``input`` (N, 3, H, W) float BGR minus ``BGR_MEAN`` and
    returns ``boxes``, ``scores`` (softmax) and ``landmarks`` as in
    ``RetinaFaceNet``; decode them with ``prior_boxes`` and the decoders here.

    Returns:
        ``path``.
    """
    network = load_retinaface(weights)
    height = torch.export.Dim("height", min=32, max=8192)
    width = torch.export.Dim("width", min=32, max=8192)
    torch.onnx.export(
        network,
        (torch.zeros(1, 3, 320, 320),),
        str(path),
        input_names=["input"],
        output_names=["boxes", "scores", "landmarks"],
        dynamic_shapes=({2: height, 3: width},),
        opset_version=18,
        dynamo=True,
        verbose=False,
    )
    logger.info("Exported RetinaFace MobileNet-0.25 to %s", path)
    return path


def create_detector() -> RetinaFaceDetector:
    """Return a RetinaFace detector with the shipped weights and default settings."""
    return RetinaFaceDetector()
