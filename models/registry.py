"""Registry of embedding models: ids from weight hashes, metadata beside each ONNX.

A model folder (``get_core_settings().model_dir``) holds pairs of files,
``<stem>.onnx`` and ``<stem>.json`` (``ModelMetadata``). The registry lists
them, finds one by id or by what its metadata says (alignment, embedding
size) and never guesses a model's needs from its tensor shapes. User-supplied
models (e.g. an InsightFace ArcFace ONNX) are added by writing their metadata
file, for example with ``register_onnx``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from facefed.core.embedding import (
    Alignment,
    InputNormalisation,
    ModelMetadata,
    OnnxEmbedder,
    file_sha256,
    load_metadata,
    metadata_path_for,
    save_metadata,
)
from facefed.core.errors import ModelError, NotFoundError
from facefed.core.settings import get_core_settings

logger = logging.getLogger(__name__)

DLIB_RESNET_PREFIX = "dlib-resnet-v1"
DLIB_RESNET_LICENCE = (
    "CC0-1.0 (dlib_face_recognition_resnet_model_v1, Davis King; "
    "trained on data of mixed licences)"
)
_CALIBRATION_PACKAGE = "facefed.models.calibration"


def model_id_for(prefix: str, weights_sha256: str) -> str:
    """Return a model id from the weights' hash: ``dlib-resnet-v1-<12 hex>``.

    Raises:
        ModelError: The hash is not a hex SHA-256.
    """
    digest = weights_sha256.lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ModelError(f"Not a hex SHA-256 digest: {weights_sha256!r}.")
    return f"{prefix}-{digest[:12]}"


def shipped_thresholds(prefix: str) -> tuple[dict[str, float], str]:
    """Return the thresholds shipped with the package for a model family.

    The file ``models/calibration/<prefix>.json`` holds ``thresholds`` (by
    target FMR) and ``source`` (the protocol they were measured on).
    """
    try:
        text = (
            resources.files(_CALIBRATION_PACKAGE)
            .joinpath(f"{prefix}.json")
            .read_text(encoding="utf-8")
        )
    except (FileNotFoundError, ModuleNotFoundError):
        logger.warning("No shipped thresholds for %s; calibrate them.", prefix)
        return {}, ""
    raw = json.loads(text)
    thresholds = {str(k): float(v) for k, v in raw["thresholds"].items()}
    return thresholds, str(raw.get("source", ""))


def dlib_resnet_metadata(
    *, weights_sha256: str, onnx_file: str, onnx_sha256: str
) -> ModelMetadata:
    """Return the metadata of the ONNX export of dlib's ResNet.

    The graph normalises pixels itself (dlib's mean colour, divided by 256),
    so the embedder feeds it RGB 0..255 unchanged. Flip test-time
    augmentation is on: on LFW folds 1-7 with YuNet landmarks it raised the
    7-fold accuracy from 98.88% to 99.24% (see README, embedding section).
    """
    thresholds, source = shipped_thresholds(DLIB_RESNET_PREFIX)
    return ModelMetadata(
        model_id=model_id_for(DLIB_RESNET_PREFIX, weights_sha256),
        name="dlib ResNet-29 face descriptor v1 (PyTorch port, ONNX)",
        input_size=150,
        alignment="dlib_chip_150",
        embedding_size=128,
        normalisation=InputNormalisation(),
        licence=DLIB_RESNET_LICENCE,
        thresholds=thresholds,
        threshold_source=source,
        parent_id=None,
        test_time_flip=True,
        onnx_file=onnx_file,
        onnx_sha256=onnx_sha256,
        weights_sha256=weights_sha256,
    )


@dataclass(frozen=True)
class RegisteredModel:
    """A model found in the model folder.

    Attributes:
        metadata: Its metadata.
        metadata_path: The JSON file.
        onnx_path: The ONNX file beside it.
    """

    metadata: ModelMetadata
    metadata_path: Path
    onnx_path: Path


class ModelRegistry:
    """The embedding models of one model folder."""

    def __init__(self, model_dir: Path | None = None) -> None:
        self.model_dir = Path(model_dir or get_core_settings().model_dir)

    def models(self) -> list[RegisteredModel]:
        """Return every model with a readable metadata file and its ONNX present.

        Unreadable metadata files are skipped with a warning.
        """
        found: list[RegisteredModel] = []
        if not self.model_dir.is_dir():
            return found
        for path in sorted(self.model_dir.glob("*.json")):
            try:
                metadata = load_metadata(path)
            except ModelError as error:
                logger.warning("Skipping %s: %s", path.name, error)
                continue
            onnx = path.with_name(metadata.onnx_file or path.with_suffix(".onnx").name)
            if onnx.is_file():
                found.append(RegisteredModel(metadata, path, onnx))
        return found

    def get(self, model_id: str) -> RegisteredModel:
        """Return the model with this id.

        Raises:
            NotFoundError: No such model; the message lists the known ids.
        """
        models = self.models()
        for model in models:
            if model.metadata.model_id == model_id:
                return model
        known = ", ".join(m.metadata.model_id for m in models) or "none"
        raise NotFoundError(
            f"No embedding model {model_id!r} in {self.model_dir}; known: {known}."
        )

    def find(
        self, *, alignment: Alignment | None = None, embedding_size: int | None = None
    ) -> list[RegisteredModel]:
        """Return the models whose metadata match every given criterion."""
        return [
            m
            for m in self.models()
            if (alignment is None or m.metadata.alignment == alignment)
            and (embedding_size is None or m.metadata.embedding_size == embedding_size)
        ]

    def load_embedder(self, model_id: str) -> OnnxEmbedder:
        """Open the embedder of a registered model (checksum verified)."""
        model = self.get(model_id)
        return OnnxEmbedder(model.onnx_path, model.metadata)

    def register_onnx(
        self, onnx_path: Path, metadata: ModelMetadata
    ) -> RegisteredModel:
        """Copy a user-supplied ONNX into the folder and write its metadata.

        The metadata's ``onnx_file`` and ``onnx_sha256`` are filled in from
        the file; the model is opened once to check it fits the metadata.

        Raises:
            ModelError: The file does not fit its metadata.
        """
        target = self.model_dir / f"{metadata.model_id}.onnx"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        if Path(onnx_path).resolve() != target.resolve():
            shutil.copyfile(onnx_path, target)
        values = metadata.__dict__ | {
            "onnx_file": target.name,
            "onnx_sha256": file_sha256(target),
        }
        complete = ModelMetadata(**values)
        OnnxEmbedder(target, complete)  # refuses a graph that contradicts it
        json_path = metadata_path_for(target)
        save_metadata(complete, json_path)
        logger.info("Registered embedding model %s", complete.model_id)
        return RegisteredModel(complete, json_path, target)

    def update_thresholds(
        self, model_id: str, thresholds: dict[str, float], *, source: str
    ) -> ModelMetadata:
        """Store calibrated thresholds in a model's metadata file."""
        model = self.get(model_id)
        updated = model.metadata.with_thresholds(thresholds, source)
        save_metadata(updated, model.metadata_path)
        logger.info("Stored %d thresholds for %s", len(thresholds), model_id)
        return updated
