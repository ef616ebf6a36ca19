"""The site agent: the full local face pipeline in front of the gallery SDK.

Every photo is decoded, its largest face detected, quality-checked, checked
for a presentation attack (when a liveness checker is configured), aligned,
embedded and protected with the site's protection key, all on the site's
machine. Only the protected template leaves it; images, embeddings and the
key never do. A capture refused by the quality gate or the liveness check is
reported to the server's audit log by stage and reason only.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

from facefed.client.consent import ConsentRecord
from facefed.client.gallery import (
    EnrollmentReceipt,
    GalleryClient,
    IdentifyResult,
    VerifyResult,
    new_idempotency_key,
)
from facefed.core.errors import (
    ConfigurationError,
    FaceError,
    FacefedError,
    QualityError,
    SpoofError,
)
from facefed.core.types import ImageArray
from facefed.privacy.protection import ProtectionKey

if TYPE_CHECKING:
    from facefed.privacy.he import SiteHEContext
from facefed.privacy.templates import ProtectedTemplate, protect_template

logger = logging.getLogger(__name__)

ImageSource: TypeAlias = bytes | str | Path | ImageArray


class _Analysis(Protocol):
    embedding: Any


class _Metadata(Protocol):
    model_id: str


class _Embedder(Protocol):
    @property
    def metadata(self) -> _Metadata: ...


class Pipeline(Protocol):
    """What the agent needs of `facefed.core.pipeline.FacePipeline`."""

    @property
    def embedder(self) -> _Embedder:
        """The embedder, whose metadata names the model."""
        ...

    def embed_one(self, image: ImageArray, *, check_liveness: bool = True) -> Any:
        """Analyse the largest face of an image; raise when it is unusable."""
        ...


class TrainingDataStore(Protocol):
    """What the agent needs of the site's training data (F's `SiteDataStore`)."""

    def forget(self, subject_ref: str) -> int:
        """Drop a subject's local samples from every later training round."""
        ...


@dataclass(frozen=True)
class CaptureRefusal:
    """Why a capture was refused, without anything that identifies the person.

    Attributes:
        stage: `quality` or `liveness`.
        reasons: The gate's sentences.
    """

    stage: str
    reasons: list[str]


class SiteAgent:
    """Runs the local pipeline and talks to the gallery server for one site.

    Args:
        client: The site's gallery client.
        pipeline: The face pipeline (`facefed.models.zoo.default_pipeline()`);
            None for an agent that only erases.
        data_store: The site's training data, told to forget erased subjects;
            None when the site keeps no training data.
        check_liveness: Run the pipeline's liveness check (enrollment and
            matching); turning it off is logged as a WARNING.
        protection_key: Use this key instead of fetching it from the server's
            key service (for a site that keeps its own key).
    """

    def __init__(
        self,
        client: GalleryClient,
        pipeline: Pipeline | None,
        *,
        data_store: TrainingDataStore | None = None,
        check_liveness: bool = True,
        protection_key: ProtectionKey | None = None,
    ) -> None:
        self.client = client
        self.pipeline = pipeline
        self.data_store = data_store
        self.check_liveness = check_liveness
        self._key = protection_key
        if not check_liveness:
            logger.warning("Liveness checks are off: spoofed captures are accepted.")

    def _pipeline(self) -> Pipeline:
        if self.pipeline is None:
            raise ConfigurationError(
                "This site agent was built without a face pipeline."
            )
        return self.pipeline

    @property
    def model_id(self) -> str:
        """Id of the embedding model whose templates this site sends."""
        return str(self._pipeline().embedder.metadata.model_id)

    def protection_key(self) -> ProtectionKey:
        """The site's protection key, fetched once from the key service."""
        if self._key is None:
            self._key = self.client.protection_key()
            logger.info(
                "Using protection key %s v%d (fingerprint %s)",
                self._key.scheme_id,
                self._key.version,
                self._key.fingerprint,
            )
        return self._key

    def template(self, source: ImageSource) -> ProtectedTemplate:
        """Run the whole local pipeline on one photo and protect the embedding.

        Raises:
            ImageError: The photo cannot be decoded.
            NoFaceError: No face was found.
            QualityError: The face failed the quality gate (reported to audit).
            SpoofError: The liveness check refused the face (reported to audit).
        """
        image = _decode(source)
        try:
            analysis = self._pipeline().embed_one(
                image, check_liveness=self.check_liveness
            )
        except SpoofError as error:
            self._report(CaptureRefusal("liveness", list(error.reasons)))
            raise
        except QualityError as error:
            self._report(CaptureRefusal("quality", list(error.reasons)))
            raise
        embedding = np.asarray(analysis.embedding, dtype=np.float32)
        return protect_template(
            embedding, key=self.protection_key(), model_id=self.model_id
        )

    def enroll(
        self,
        sources: Sequence[ImageSource],
        *,
        subject_ref: str,
        consent: ConsentRecord,
        idempotency_key: str | None = None,
        skip_unusable: bool = False,
    ) -> EnrollmentReceipt:
        """Enroll one person from one or more photos.

        A photo refused by the liveness check refuses the whole enrollment,
        so a person is never enrolled next to a presentation attack.

        Args:
            sources: Photos of the person.
            subject_ref: The site's reference for the person.
            consent: The consent record the enrollment rests on.
            idempotency_key: Reuse to retry the same enrollment safely.
            skip_unusable: Leave out photos without a usable face (no face,
                or refused by the quality gate) as long as one photo is
                usable; when False every photo must pass.

        Raises:
            SpoofError: A photo looks like a presentation attack.
            FaceError: A photo is unusable (or, with `skip_unusable`, all are).
        """
        templates = self._templates(sources, skip_unusable=skip_unusable)
        receipt = self.client.enroll(
            templates,
            subject_ref=subject_ref,
            consent=consent,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        logger.info(
            "Enrolled subject %s from %d photo(s)", receipt.subject_id, len(templates)
        )
        return receipt

    def add_templates(
        self,
        sources: Sequence[ImageSource],
        *,
        subject_id: str,
        idempotency_key: str | None = None,
        skip_unusable: bool = False,
    ) -> int:
        """Add photos to a subject this site enrolled; returns its template count.

        The same checks as `enroll` apply (a spoof refuses every photo).

        Raises:
            SpoofError: A photo looks like a presentation attack.
            FaceError: A photo is unusable (or, with `skip_unusable`, all are).
            GoneError: The subject was erased.
        """
        templates = self._templates(sources, skip_unusable=skip_unusable)
        return self.client.add_templates(
            subject_id,
            templates,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )

    def _templates(
        self, sources: Sequence[ImageSource], *, skip_unusable: bool
    ) -> list[ProtectedTemplate]:
        if not sources:
            raise FacefedError("An enrollment needs at least one photo, got none.")
        templates: list[ProtectedTemplate] = []
        unusable: FaceError | None = None
        for source in sources:
            try:
                templates.append(self.template(source))
            except SpoofError:
                raise
            except FaceError as error:
                if not skip_unusable:
                    raise
                unusable = error
        if not templates and unusable is not None:
            raise unusable
        return templates

    def identify(self, source: ImageSource, *, top_k: int = 5) -> IdentifyResult:
        """Search the gallery for the person in a photo (1:N)."""
        return self.client.identify(self.template(source), top_k=top_k)

    def verify(self, source: ImageSource, *, subject_id: str) -> VerifyResult:
        """Check whether the person in a photo is an enrolled subject (1:1)."""
        return self.client.verify(self.template(source), subject_id=subject_id)

    def verify_encrypted(
        self,
        source: ImageSource,
        *,
        subject_id: str,
        he_context: "SiteHEContext",
        context_id: str,
        threshold: float,
    ) -> VerifyResult:
        """1:1 match where the server never sees the probe (CKKS).

        The protected probe is encrypted under the site's CKKS context (whose
        secret key stays here), scored by the server against the subject's
        protected templates, and the scores decrypted here; the site applies
        the threshold itself.

        Args:
            source: The probe photo.
            subject_id: The claimed subject.
            he_context: The site's CKKS context (secret key included).
            context_id: Id under which its public part was uploaded.
            threshold: Decision threshold on the best cosine score.
        """
        template = self.template(source)
        probe = he_context.encrypt_probe(template.data, layout="columns")
        answer = self.client.verify_encrypted(
            probe, context_id=context_id, subject_id=subject_id
        )
        scores = he_context.decrypt_scores(answer.scores, answer.count)
        best = float(np.max(scores))
        return VerifyResult(
            subject_id=subject_id,
            score=best,
            threshold=threshold,
            match=best >= threshold,
        )

    def erase(
        self, subject_id: str, *, subject_ref: str | None = None
    ) -> dict[str, Any]:
        """Erase a subject on the server and from the site's training data.

        Args:
            subject_id: The server's subject id.
            subject_ref: The site's reference of the subject; needed to drop
                their local training samples (taken from the receipt when the
                server returns it).

        Returns:
            The server's erasure receipt.
        """
        receipt = self.client.erase(subject_id)
        ref = subject_ref or receipt.get("external_ref")
        if self.data_store is not None:
            if ref:
                removed = self.data_store.forget(str(ref))
                logger.info(
                    "Dropped %d local training sample(s) of the subject", removed
                )
            else:
                # FIXME: without the site's reference the local training samples
                # cannot be found; they stay until the operator runs `forget`.
                logger.warning(
                    "Subject %s erased on the server, but no subject ref was "
                    "given: its local training samples were not dropped",
                    subject_id,
                )
        return receipt

    def _report(self, refusal: CaptureRefusal) -> None:
        logger.info(
            "Capture refused at %s: %s", refusal.stage, "; ".join(refusal.reasons)
        )
        try:
            self.client.report_refusal(stage=refusal.stage, reasons=refusal.reasons)
        except FacefedError as error:
            # The refusal itself stands; only its count in the audit log is lost.
            logger.warning("Could not report the refusal to the audit log: %s", error)


def _decode(source: ImageSource) -> ImageArray:
    if isinstance(source, np.ndarray):
        return source
    from facefed.core.image import decode_image

    return decode_image(source)
