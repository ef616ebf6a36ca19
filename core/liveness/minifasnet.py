"""MiniFASNet V2 and V1SE (Silent-Face anti-spoofing) run with onnxruntime."""

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from facefed.core.errors import ModelError
from facefed.core.liveness.crops import context_crop
from facefed.core.liveness.settings import ExecutionMode
from facefed.core.settings import get_core_settings
from facefed.core.types import FloatArray, ImageArray

logger = logging.getLogger(__name__)

INPUT_SIZE = 80
LIVE_CLASS = 1


@dataclass(frozen=True)
class MiniFASNetSpec:
    """One shipped MiniFASNet model and the crop it was trained on.

    Attributes:
        name: Short name used in cues and reports.
        filename: ONNX file in `core/liveness/assets/`.
        scale: Context factor applied to the face box before cropping.
    """

    name: str
    filename: str
    scale: float


MODELS = (
    MiniFASNetSpec("minifasnet_v2", "MiniFASNetV2.onnx", 2.7),
    MiniFASNetSpec("minifasnet_v1se", "MiniFASNetV1SE.onnx", 4.0),
)


def asset_path(filename: str) -> Path:
    """Return the path of a file shipped in `core/liveness/assets/`."""
    return Path(str(resources.files("facefed.core.liveness") / "assets" / filename))


def providers_for(device: ExecutionMode) -> list[str]:
    """Choose onnxruntime execution providers for a device setting.

    Args:
        device: `auto`, `cpu` or `cuda`.

    Returns:
        The provider list to pass to an `InferenceSession`.

    Raises:
        ModelError: If `cuda` is asked for and onnxruntime has no CUDA provider.
    """
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ModelError(
            "CUDA was requested for liveness but this onnxruntime offers only "
            f"{available}."
        )
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        logger.info("Liveness networks run on the CPU (no CUDA provider available).")
    return ["CPUExecutionProvider"]


def _softmax(logits: FloatArray) -> FloatArray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


class MiniFASNet:
    """One MiniFASNet network: crop, run, return the live probability.

    Args:
        spec: Which model and crop.
        providers: onnxruntime execution providers.
    """

    def __init__(self, spec: MiniFASNetSpec, *, providers: list[str]) -> None:
        path = asset_path(spec.filename)
        if not path.is_file():
            raise ModelError(f"The liveness model file {path} is missing.")
        options = ort.SessionOptions()
        threads = get_core_settings().threads
        if threads:
            options.intra_op_num_threads = threads
        self.spec = spec
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers
        )
        self.input_name = self.session.get_inputs()[0].name

    def crop(self, image: ImageArray, box: FloatArray) -> ImageArray:
        """Return the 80x80 RGB context crop this model expects for a face box."""
        return context_crop(image, box, scale=self.spec.scale, size=INPUT_SIZE)

    def live_probability(self, crops_rgb: ImageArray) -> FloatArray:
        """Run the network on crops and return the probability of the live class.

        Args:
            crops_rgb: (N, 80, 80, 3) RGB uint8 crops.

        Returns:
            (N,) float32 probabilities of class 1 (live) after a softmax over
            the three classes.
        """
        # The networks were trained on OpenCV (BGR) images scaled 0..255 with no
        # mean or deviation normalisation.
        bgr = crops_rgb[..., ::-1].astype(np.float32)
        batch = np.ascontiguousarray(bgr.transpose(0, 3, 1, 2))
        probs = []
        for item in batch:  # the exported graphs have a fixed batch of one
            (logits,) = self.session.run(None, {self.input_name: item[None]})
            probs.append(_softmax(np.asarray(logits, dtype=np.float32))[0])
        return np.asarray(probs, dtype=np.float32)[:, LIVE_CLASS]


def load_minifasnets(device: ExecutionMode = "auto") -> list[MiniFASNet]:
    """Load the two shipped MiniFASNet models (V2 at 2.7x, V1SE at 4.0x)."""
    providers = providers_for(device)
    return [MiniFASNet(spec, providers=providers) for spec in MODELS]
