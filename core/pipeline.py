"""The local face pipeline: detect, check quality, check liveness, align, embed.

`FacePipeline` wires a detector, an embedder and optional quality and
liveness checks into the order every site uses (DESIGN.md, "Enroll"):
quality comes before liveness because presentation-attack cues are unreliable
on blurred or tiny faces, and alignment follows the geometry the embedding
model declares in its metadata.
"""

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from facefed.core.align import align_arcface, align_dlib_chip
from facefed.core.detection.base import FaceDetector
from facefed.core.embedding import Embedder
from facefed.core.errors import ModelError, NoFaceError, QualityError, SpoofError
from facefed.core.quality import QualityGate
from facefed.core.types import (
    Face,
    FloatArray,
    ImageArray,
    LivenessResult,
    QualityReport,
)

logger = logging.getLogger(__name__)


class LivenessChecker(Protocol):
    """What the pipeline needs of a presentation-attack checker."""

    def check(self, image: ImageArray, face: Face) -> LivenessResult:
        """Decide whether `face` in `image` is a live person."""
        ...


@dataclass(frozen=True)
class FaceAnalysis:
    """Everything the pipeline learnt about one face.

    Attributes:
        face: The detection (box, score, landmarks).
        quality: The quality report, or None without a quality gate.
        liveness: The liveness result, or None when not checked.
        chip: The aligned chip the embedder saw, or None for a face without
            landmarks.
        embedding: The L2-normalised embedding, or None without a chip.
    """

    face: Face
    quality: QualityReport | None
    liveness: LivenessResult | None
    chip: ImageArray | None
    embedding: FloatArray | None


class FacePipeline:
    """Detect, check, align and embed faces, in that order."""

    def __init__(
        self,
        detector: FaceDetector,
        embedder: Embedder,
        *,
        quality_gate: QualityGate | None = None,
        liveness: LivenessChecker | None = None,
    ) -> None:
        """Wire the parts.

        Args:
            detector: Finds faces and their five landmarks.
            embedder: Turns aligned chips into embeddings; its metadata says
                which alignment (`dlib_chip_150` or `arcface_112`) it needs.
            quality_gate: Refuses poor faces in `embed_one`; None skips it.
            liveness: Presentation-attack checker; None disables the check.

        Raises:
            ModelError: The embedder asks for an alignment facefed lacks.
        """
        self.detector = detector
        self.embedder = embedder
        self.quality_gate = quality_gate
        self.liveness = liveness
        self._alignment = str(embedder.metadata.alignment)
        if self._alignment not in ("dlib_chip_150", "arcface_112"):
            raise ModelError(
                f"The embedder needs alignment {self._alignment!r}; facefed "
                "provides dlib_chip_150 and arcface_112."
            )
        if quality_gate is None:
            logger.warning("Face pipeline without a quality gate: poor faces pass.")
        if liveness is None:
            logger.warning(
                "Face pipeline without a liveness checker: presentation attacks "
                "are not detected."
            )

    def align(self, image: ImageArray, face: Face) -> ImageArray | None:
        """Cut the chip the embedder expects, or None for a face without landmarks."""
        if face.landmarks is None:
            return None
        size = int(self.embedder.metadata.input_size)
        if self._alignment == "dlib_chip_150":
            return align_dlib_chip(image, face.landmarks, size=size)
        return align_arcface(image, face.landmarks, size=size)

    def analyse(self, image: ImageArray) -> list[FaceAnalysis]:
        """Analyse every face in the image, refusing none.

        Each face gets its quality report, its liveness result (when a
        checker is set) and, if it has landmarks, its chip and embedding;
        callers decide what to do with faces that fail a check.

        Args:
            image: RGB uint8 (H, W, 3).

        Returns:
            One analysis per detected face, by detector score.
        """
        faces = self.detector.detect(image)
        chips = [self.align(image, face) for face in faces]
        embeddings = self._embed([chip for chip in chips if chip is not None])
        results = []
        next_embedding = iter(embeddings)
        for face, chip in zip(faces, chips, strict=True):
            results.append(
                FaceAnalysis(
                    face=face,
                    quality=self._quality(image, face),
                    liveness=None
                    if self.liveness is None
                    else self.liveness.check(image, face),
                    chip=chip,
                    embedding=None if chip is None else next(next_embedding),
                )
            )
        return results

    def embed_one(
        self, image: ImageArray, *, check_liveness: bool = True
    ) -> FaceAnalysis:
        """Embed the largest face of the image, refusing it if unusable.

        Args:
            image: RGB uint8 (H, W, 3).
            check_liveness: Run the liveness checker (when one is set). Turn
                off only for trusted sources, such as a site's own training
                photos.

        Returns:
            The analysis of the largest face, with its chip and embedding.

        Raises:
            NoFaceError: No face was found.
            QualityError: The face failed the quality gate, or has no
                landmarks to align it; `reasons` says why.
            SpoofError: The liveness checker judged it an attack.
        """
        face = self._largest_face(image)
        quality = self._quality(image, face)
        if quality is not None and not quality.passed:
            raise QualityError(
                "The face is not good enough to use: " + " ".join(quality.reasons),
                quality.reasons,
            )
        liveness = self._liveness(image, face, check_liveness)
        chip = self.align(image, face)
        if chip is None:
            reason = "The detector gave no landmarks, so the face cannot be aligned."
            raise QualityError(reason, [reason])
        embedding = self._embed([chip])[0]
        return FaceAnalysis(
            face=face,
            quality=quality,
            liveness=liveness,
            chip=chip,
            embedding=embedding,
        )

    def _largest_face(self, image: ImageArray) -> Face:
        faces = self.detector.detect(image)
        if not faces:
            raise NoFaceError("No face was found in the image.")
        # Largest box area; among equal areas the detector's higher score.
        return max(faces, key=lambda face: (face.width * face.height, face.score))

    def _quality(self, image: ImageArray, face: Face) -> QualityReport | None:
        if self.quality_gate is None:
            return None
        return self.quality_gate.assess(image, face)

    def _liveness(
        self, image: ImageArray, face: Face, check: bool
    ) -> LivenessResult | None:
        if not check or self.liveness is None:
            return None
        result = self.liveness.check(image, face)
        if not result.is_live:
            reasons = result.reasons or [
                f"The liveness score {result.score:.2f} is below the threshold "
                f"{result.threshold:.2f}."
            ]
            raise SpoofError(
                "The face looks like a presentation attack: " + " ".join(reasons),
                reasons,
            )
        return result

    def _embed(self, chips: list[ImageArray]) -> list[FloatArray]:
        if not chips:
            return []
        vectors = self.embedder.embed(np.stack(chips))
        return [np.asarray(vector, dtype=np.float32) for vector in vectors]
