"""Face embedding at inference time: model metadata and the onnxruntime embedder.

An embedding model is an ONNX file with a JSON metadata file beside it
(``<name>.onnx`` and ``<name>.json``). The metadata, never the tensor shapes,
says how to feed the model: chip size, alignment geometry, channel order and
pixel normalisation, embedding size, decision thresholds by target false match
rate (FMR), licence and lineage. Every template carries the ``model_id`` of
the model that made it, and templates of different models are never compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from facefed.core.errors import ModelError
from facefed.core.settings import get_core_settings
from facefed.core.types import FloatArray

logger = logging.getLogger(__name__)

Alignment = Literal["dlib_chip_150", "arcface_112"]
ChannelOrder = Literal["RGB", "BGR"]
ALIGNMENTS: tuple[Alignment, ...] = ("dlib_chip_150", "arcface_112")
METADATA_VERSION = 2
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_BATCH = 64


@dataclass(frozen=True)
class InputNormalisation:
    """How uint8 RGB chips become the model's float input.

    ``input = (pixel - mean) / std`` per channel, after reordering the
    channels to ``channel_order``; layout NCHW float32.

    Attributes:
        mean: Per-channel mean, in the model's channel order, 0..255 scale.
        std: Per-channel divisor.
        channel_order: Channel order the model expects.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: ChannelOrder = "RGB"


@dataclass(frozen=True)
class ModelMetadata:
    """Everything needed to use an embedding model correctly.

    Attributes:
        model_id: Stable id derived from the weights' hash, e.g.
            ``dlib-resnet-v1-1a2b3c4d5e6f``; templates carry it.
        name: Human-readable name.
        input_size: Side of the square input chip in pixels.
        alignment: Geometry of the chip (``dlib_chip_150``: dlib's
            get_face_chip, 150 px, padding 0.25; ``arcface_112``: the
            5-point ArcFace template, 112 px).
        embedding_size: Length of the embedding.
        normalisation: Pixel normalisation applied before the graph.
        licence: Licence of the weights.
        thresholds: Cosine-similarity decision thresholds by target FMR
            (keys such as ``"0.001"``), calibrated on a named protocol.
        threshold_source: Where the thresholds were measured.
        parent_id: Model this one was fine-tuned or exported from, if any.
        test_time_flip: Embed the mirrored chip too and sum the two outputs
            before normalising (flip test-time augmentation, as in the LFW
            evaluations of ArcFace, Deng et al. 2019); twice the compute.
        onnx_file: File name of the ONNX graph beside the metadata.
        onnx_sha256: Hex SHA-256 of the ONNX file, checked on load.
        weights_sha256: Hex SHA-256 of the original weights.
        version: Metadata format version.
    """

    model_id: str
    name: str
    input_size: int
    alignment: Alignment
    embedding_size: int
    normalisation: InputNormalisation = field(default_factory=InputNormalisation)
    licence: str = "unknown"
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_source: str = ""
    parent_id: str | None = None
    test_time_flip: bool = False
    onnx_file: str = ""
    onnx_sha256: str = ""
    weights_sha256: str = ""
    version: int = METADATA_VERSION

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ModelError(
                f"Unknown alignment {self.alignment!r} for model {self.model_id}; "
                f"known: {', '.join(ALIGNMENTS)}."
            )
        if self.input_size <= 0 or self.embedding_size <= 0:
            raise ModelError(
                f"Model {self.model_id} has input size {self.input_size} and "
                f"embedding size {self.embedding_size}; both must be positive."
            )

    def threshold_for(self, fmr: float) -> float:
        """Return the calibrated threshold for a target false match rate.

        Raises:
            ModelError: No threshold was calibrated for that FMR.
        """
        key = fmr_key(fmr)
        if key not in self.thresholds:
            known = ", ".join(sorted(self.thresholds)) or "none"
            raise ModelError(
                f"Model {self.model_id} has no threshold for FMR {fmr:g}; "
                f"calibrated: {known}. Run `facefed eval verify --calibrate`."
            )
        return self.thresholds[key]

    def with_thresholds(
        self, thresholds: dict[str, float], source: str
    ) -> ModelMetadata:
        """Return a copy with new calibrated thresholds."""
        values = {**asdict(self), "thresholds": dict(thresholds)}
        values["threshold_source"] = source
        values["normalisation"] = self.normalisation
        return ModelMetadata(**values)

    def to_json(self) -> str:
        """Serialise to JSON text."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse metadata JSON, validating every field.

        Raises:
            ModelError: The JSON is malformed or misses a required field.
        """
        try:
            raw: dict[str, Any] = json.loads(text)
            norm = raw.pop("normalisation", {})
            normalisation = InputNormalisation(
                mean=tuple(float(v) for v in norm.get("mean", (0, 0, 0))),  # type: ignore[arg-type]
                std=tuple(float(v) for v in norm.get("std", (1, 1, 1))),  # type: ignore[arg-type]
                channel_order=norm.get("channel_order", "RGB"),
            )
            if normalisation.channel_order not in ("RGB", "BGR"):
                raise ModelError(
                    f"Unknown channel order {normalisation.channel_order!r}."
                )
            raw["thresholds"] = {
                str(k): float(v) for k, v in raw.get("thresholds", {}).items()
            }
            return cls(normalisation=normalisation, **raw)
        except (ValueError, TypeError, AttributeError) as error:
            raise ModelError(f"Invalid model metadata: {error}") from error


def fmr_key(fmr: float) -> str:
    """Return the metadata key of a target false match rate (e.g. ``"0.001"``).

    Raises:
        ModelError: The rate is not in (0, 1).
    """
    if not 0.0 < fmr < 1.0:
        raise ModelError(f"A target false match rate must be in (0, 1), got {fmr}.")
    return f"{fmr:g}" if fmr >= 1e-4 else f"{fmr:.0e}"


def metadata_path_for(onnx_path: Path) -> Path:
    """Return the metadata file that belongs beside an ONNX file."""
    return onnx_path.with_suffix(".json")


def save_metadata(metadata: ModelMetadata, path: Path) -> None:
    """Write metadata JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{_unique_suffix()}.tmp")
    temporary.write_text(metadata.to_json() + "\n", encoding="utf-8")
    temporary.replace(path)


def load_metadata(path: Path) -> ModelMetadata:
    """Read a metadata JSON file.

    Raises:
        ModelError: The file is missing or invalid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ModelError(f"Cannot read model metadata {path}: {error}") from error
    return ModelMetadata.from_json(text)


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique_suffix() -> str:
    import os

    return f"{os.getpid()}-{os.urandom(4).hex()}"


def l2_normalise(embeddings: npt.NDArray[np.floating[Any]]) -> FloatArray:
    """Scale every row to unit length (rows of zeros stay zero)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


@runtime_checkable
class Embedder(Protocol):
    """Turns aligned face chips into L2-normalised embeddings."""

    @property
    def metadata(self) -> ModelMetadata:
        """The model's metadata (id, input geometry, thresholds)."""
        ...

    def embed(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """Embed chips of shape (N, S, S, 3), RGB uint8; return (N, d) unit rows."""
        ...


def _choose_providers(available: list[str]) -> list[str]:
    gpu = [name for name in _GPU_PROVIDERS if name in available]
    if not gpu:
        logger.debug("No CUDA or TensorRT provider installed; embedding on CPU.")
    return [*gpu, "CPUExecutionProvider"]


class OnnxEmbedder:
    """Embedding model on onnxruntime, fed as its metadata says.

    TensorRT and CUDA providers are used when installed; if they fail to
    start, the embedder logs a warning and falls back to the CPU. Threads come
    from ``get_core_settings().threads`` (0 lets onnxruntime decide).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        metadata: ModelMetadata,
        *,
        verify_checksum: bool = True,
        providers: list[str] | None = None,
    ) -> None:
        """Open a model.

        Args:
            onnx_path: The ONNX graph.
            metadata: Its metadata.
            verify_checksum: Refuse the file unless its SHA-256 matches
                ``metadata.onnx_sha256`` (when the metadata has one).
            providers: onnxruntime providers to try, best first; default:
                TensorRT, CUDA (when installed), then CPU.

        Raises:
            ModelError: The file is missing, altered, or its graph does not
                take and give what the metadata says.
        """
        self._path = Path(onnx_path)
        self._metadata = metadata
        if not self._path.is_file():
            raise ModelError(f"The ONNX model {self._path} does not exist.")
        if verify_checksum and metadata.onnx_sha256:
            actual = file_sha256(self._path)
            if actual != metadata.onnx_sha256:
                raise ModelError(
                    f"The ONNX model {self._path.name} has SHA-256 {actual[:12]}..., "
                    f"its metadata says {metadata.onnx_sha256[:12]}...; refusing it."
                )
        self._session = self._open_session(providers)
        self._input_name = self._session.get_inputs()[0].name
        self._check_graph()
        norm = metadata.normalisation
        self._mean = np.asarray(norm.mean, np.float32).reshape(1, 3, 1, 1)
        self._scale = (1.0 / np.asarray(norm.std, np.float32)).reshape(1, 3, 1, 1)

    @classmethod
    def from_metadata_file(cls, metadata_path: str | Path) -> OnnxEmbedder:
        """Open the model described by a metadata JSON file (ONNX beside it)."""
        path = Path(metadata_path)
        metadata = load_metadata(path)
        onnx_name = metadata.onnx_file or path.with_suffix(".onnx").name
        return cls(path.with_name(onnx_name), metadata)

    @property
    def metadata(self) -> ModelMetadata:
        """The model's metadata."""
        return self._metadata

    @property
    def providers(self) -> list[str]:
        """The onnxruntime providers the session runs on."""
        return list(self._session.get_providers())

    def _open_session(self, providers: list[str] | None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        threads = get_core_settings().threads
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        wanted = providers or _choose_providers(ort.get_available_providers())
        try:
            return ort.InferenceSession(str(self._path), options, providers=wanted)
        except Exception as error:  # onnxruntime raises its own untyped errors
            if wanted == ["CPUExecutionProvider"]:
                raise ModelError(
                    f"onnxruntime cannot load {self._path.name}: {error}"
                ) from error
            logger.warning(
                "Providers %s failed for %s (%s); falling back to CPU.",
                wanted,
                self._path.name,
                error,
            )
            try:
                return ort.InferenceSession(
                    str(self._path), options, providers=["CPUExecutionProvider"]
                )
            except Exception as cpu_error:
                raise ModelError(
                    f"onnxruntime cannot load {self._path.name}: {cpu_error}"
                ) from cpu_error

    def _check_graph(self) -> None:
        meta = self._metadata
        in_shape = self._session.get_inputs()[0].shape
        out_shape = self._session.get_outputs()[0].shape
        if len(in_shape) != 4 or in_shape[1] != 3:
            raise ModelError(
                f"{self._path.name} takes input of shape {in_shape}; an embedder "
                "needs N x 3 x H x W."
            )
        if any(isinstance(d, int) and d != meta.input_size for d in in_shape[2:]):
            raise ModelError(
                f"{self._path.name} takes {in_shape[2]}x{in_shape[3]} input but its "
                f"metadata says {meta.input_size}."
            )
        if isinstance(out_shape[-1], int) and out_shape[-1] != meta.embedding_size:
            raise ModelError(
                f"{self._path.name} gives {out_shape[-1]}-d output but its metadata "
                f"says {meta.embedding_size}."
            )

    def _validate(self, chips: npt.NDArray[np.uint8]) -> None:
        size = self._metadata.input_size
        if not isinstance(chips, np.ndarray) or chips.dtype != np.uint8:
            raise ModelError(
                f"Chips must be a uint8 numpy array, got {type(chips).__name__} "
                f"of {getattr(chips, 'dtype', None)}."
            )
        if chips.ndim != 4 or chips.shape[1:] != (size, size, 3):
            raise ModelError(
                f"Model {self._metadata.model_id} needs chips of shape "
                f"(N, {size}, {size}, 3), got {chips.shape}."
            )

    def _prepare(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        batch = chips.transpose(0, 3, 1, 2).astype(np.float32)
        if self._metadata.normalisation.channel_order == "BGR":
            batch = batch[:, ::-1]
        return np.ascontiguousarray((batch - self._mean) * self._scale)

    def embed(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """Embed aligned chips.

        Args:
            chips: (N, S, S, 3) RGB uint8, S = ``metadata.input_size``, aligned
                with ``metadata.alignment``.

        Returns:
            (N, embedding_size) float32, each row of unit length.

        Raises:
            ModelError: The chips have the wrong type or shape.
        """
        self._validate(chips)
        if len(chips) == 0:
            return np.zeros((0, self._metadata.embedding_size), np.float32)
        outputs = []
        flip = self._metadata.test_time_flip
        for start in range(0, len(chips), _BATCH):
            batch = self._prepare(chips[start : start + _BATCH])
            count = len(batch)
            if flip:  # mirrored copies run in the same batch
                batch = np.concatenate([batch, np.ascontiguousarray(batch[..., ::-1])])
            result = self._session.run(None, {self._input_name: batch})[0]
            result = np.asarray(result, np.float32).reshape(len(batch), -1)
            outputs.append(result[:count] + result[count:] if flip else result)
        return l2_normalise(np.concatenate(outputs))

    def embed_raw(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """One pass of the network, no flip, no normalisation (as dlib computes)."""
        self._validate(chips)
        batch = self._prepare(chips)
        result = self._session.run(None, {self._input_name: batch})[0]
        return np.asarray(result, np.float32)
