"""Python SDK of the gallery server: enroll, identify, verify, export, erase.

`GalleryClient` speaks the server's `/v1` REST API and carries only protected
templates (`facefed.privacy.templates.ProtectedTemplate`), never images or raw
embeddings. Enrollment sends an `Idempotency-Key` header so that a request
retried after a lost answer returns the first enrollment instead of making a
second subject.
"""

import base64
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from facefed.client.consent import ConsentRecord
from facefed.client.settings import ClientSettings, get_client_settings
from facefed.client.transport import IDEMPOTENCY_HEADER, RetryPolicy, Transport
from facefed.core.errors import GoneError, NotFoundError, ServiceError
from facefed.privacy.protection import ProtectionKey
from facefed.privacy.templates import ProtectedTemplate

logger = logging.getLogger(__name__)

SUBJECT_TOKEN_HEADER = "X-Subject-Token"  # noqa: S105 (a header name, not a secret)


@dataclass(frozen=True)
class EnrollmentReceipt:
    """What the server answers to an enrollment.

    Attributes:
        subject_id: The server's random id of the new subject.
        subject_token: The data subject's own credential, shown once: hand it
            to the person; it lets them export and erase their data.
        template_count: Templates stored for the subject.
        raw: The whole answer, for display.
    """

    subject_id: str
    subject_token: str = field(repr=False)
    template_count: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class CollectionModels:
    """The embedding models of a collection.

    Attributes:
        serving_model_id: The model to embed with now (the latest promoted).
        accepted_model_ids: Every model whose templates the collection
            accepts: the one it started with, then each promoted one.
    """

    serving_model_id: str
    accepted_model_ids: tuple[str, ...]


@dataclass(frozen=True)
class Candidate:
    """One gallery subject returned by a search.

    Attributes:
        subject_id: Subject id.
        score: Similarity score (cosine for float templates).
        subject_ref: The enrolling site's reference, when the caller may see it.
    """

    subject_id: str
    score: float
    subject_ref: str | None = None


@dataclass(frozen=True)
class IdentifyResult:
    """Answer of a 1:N search.

    Attributes:
        candidates: Best candidates first (at most top-k).
        threshold: The decision threshold the server applied.
        match: The best candidate when its score reaches the threshold.
    """

    candidates: list[Candidate]
    threshold: float
    match: Candidate | None


@dataclass(frozen=True)
class VerifyResult:
    """Answer of a 1:1 comparison.

    Attributes:
        subject_id: The claimed subject.
        score: Best similarity between the probe and the subject's templates.
        threshold: The decision threshold the server applied.
        match: Whether the score reaches the threshold.
    """

    subject_id: str
    score: float
    threshold: float
    match: bool


@dataclass(frozen=True)
class EncryptedScores:
    """Encrypted scores the server computed without seeing the probe.

    Attributes:
        count: Number of scores in the set (one per template scored).
        scores: The encrypted score set; only the site's CKKS context opens it.
        subject_ids: Subject of each score, in order.
        template_ids: Template of each score, in order.
    """

    count: int
    scores: bytes = field(repr=False)
    subject_ids: list[str]
    template_ids: list[str]


def new_idempotency_key() -> str:
    """A fresh random idempotency key (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


class GalleryClient:
    """Client of one gallery server, authenticated as one site (or admin).

    Args:
        transport: The HTTP layer (see `GalleryClient.from_settings`).
        collection: Gallery collection to enroll into and search.
    """

    def __init__(self, transport: Transport, *, collection: str = "default") -> None:
        self._transport = transport
        self.collection = collection

    @classmethod
    def from_settings(
        cls,
        settings: ClientSettings | None = None,
        *,
        api_key: str | None = None,
        anonymous: bool = False,
        rng: np.random.Generator | None = None,
        http: httpx.Client | None = None,
    ) -> "GalleryClient":
        """Build a client from `FACEFED_*` settings.

        Args:
            settings: Settings to use; read from the environment when None.
            api_key: Overrides the settings' key (admin tools pass their own).
            anonymous: Send no API key at all (a data subject, who
                authenticates with their subject token instead).
            rng: Jitter source of the retry backoff; a fresh OS-seeded
                generator when None.
            http: A prepared httpx client (tests pass one bound to an app).
        """
        settings = settings or get_client_settings()
        key = None if anonymous else api_key or settings.resolved_api_key()
        verify: bool | str = str(settings.ca_file) if settings.ca_file else True
        transport = Transport(
            settings.server_url,
            api_key=key,
            policy=RetryPolicy(
                max_attempts=settings.max_attempts,
                base_delay_s=settings.backoff_base_s,
                max_delay_s=settings.backoff_max_s,
            ),
            rng=rng or np.random.default_rng(),
            timeout_s=settings.timeout_s,
            verify=verify,
            http=http,
            unauthorized_hint=None
            if anonymous or key
            else "No API key is configured: set FACEFED_API_KEY_FILE "
            "(or FACEFED_API_KEY) to the site's key.",
        )
        return cls(transport, collection=settings.collection)

    @property
    def transport(self) -> Transport:
        """The HTTP layer (shared with `AdminClient`)."""
        return self._transport

    def close(self) -> None:
        """Close the underlying connections."""
        self._transport.close()

    def __enter__(self) -> "GalleryClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- keys ------------------------------------------------------------------

    def protection_key(self) -> ProtectionKey:
        """The key the collection's templates are protected with (key service).

        Raises:
            NotFoundError: The collection does not exist (an admin creates it,
                with its protection key, before sites can enroll or search).
        """
        try:
            body = self._transport.request(
                "GET",
                "/keys/protection",
                params={"collection": self.collection},
                retry=True,
            )
        except GoneError:
            raise
        except NotFoundError as error:
            raise NotFoundError(
                f"{error} The gallery collection '{self.collection}'"
                " (FACEFED_COLLECTION)"
                " or its protection key does not exist on the server: an admin must "
                "create them first (AdminClient.create_protection_key and "
                "create_collection; deploy/local/up.sh does it)."
            ) from None
        return ProtectionKey.from_dict(body)

    def models(self) -> "CollectionModels":
        """Which embedding models the collection takes templates of.

        A site embeds with `serving_model_id`; after the admin promotes a
        backward-compatible model the collection still matches templates of
        the models before it, so a site may switch when it is ready.

        Raises:
            NotFoundError: The collection does not exist.
        """
        body = self._transport.request(
            "GET", f"/collections/{self.collection}", retry=True
        )
        return CollectionModels(
            serving_model_id=str(body["serving_model_id"]),
            accepted_model_ids=tuple(str(m) for m in body["accepted_model_ids"]),
        )

    # -- enrollment ------------------------------------------------------------

    def enroll(
        self,
        templates: list[ProtectedTemplate],
        *,
        subject_ref: str,
        consent: ConsentRecord,
        idempotency_key: str | None = None,
    ) -> EnrollmentReceipt:
        """Enroll a new subject with their consent record and templates.

        Args:
            templates: One or more protected templates of the same person.
            subject_ref: The site's own reference for the person.
            consent: The consent record the enrollment rests on.
            idempotency_key: Reuse it to retry the same enrollment; a fresh
                one is drawn when None. Retries inside this call reuse it.

        Returns:
            The receipt, with the subject token to hand to the person.
        """
        if not templates:
            raise ValueError("An enrollment needs at least one template, got none.")
        key = idempotency_key or new_idempotency_key()
        body = self._transport.request(
            "POST",
            "/subjects",
            json={
                "collection": self.collection,
                "external_ref": subject_ref,
                "consent": consent.to_wire(),
                "templates": [template.to_wire() for template in templates],
            },
            headers={IDEMPOTENCY_HEADER: key},
            retry=True,
        )
        return _receipt(body)

    def add_templates(
        self,
        subject_id: str,
        templates: list[ProtectedTemplate],
        *,
        idempotency_key: str | None = None,
    ) -> int:
        """Add templates to an enrolled subject; returns how many it now holds."""
        key = idempotency_key or new_idempotency_key()
        body = self._transport.request(
            "POST",
            f"/subjects/{subject_id}/templates",
            json={"templates": [template.to_wire() for template in templates]},
            headers={IDEMPOTENCY_HEADER: key},
            retry=True,
        )
        return int(body["template_count"])

    # -- matching --------------------------------------------------------------

    def identify(
        self,
        template: ProtectedTemplate,
        *,
        top_k: int = 5,
        threshold: float | None = None,
    ) -> IdentifyResult:
        """Search the collection for the subjects closest to a probe (1:N)."""
        payload: dict[str, Any] = {
            "collection": self.collection,
            "template": template.to_wire(),
            "top_k": top_k,
        }
        if threshold is not None:
            payload["threshold"] = threshold
        body = self._transport.request("POST", "/identify", json=payload, retry=True)
        return _identify_result(body)

    def verify(
        self,
        template: ProtectedTemplate,
        *,
        subject_id: str,
        threshold: float | None = None,
    ) -> VerifyResult:
        """Compare a probe with one enrolled subject (1:1)."""
        payload: dict[str, Any] = {
            "subject_id": subject_id,
            "template": template.to_wire(),
        }
        if threshold is not None:
            payload["threshold"] = threshold
        body = self._transport.request("POST", "/verify", json=payload, retry=True)
        return VerifyResult(
            subject_id=str(body["subject_id"]),
            score=float(body["score"]),
            threshold=float(body["threshold"]),
            match=bool(body["match"]),
        )

    # -- encrypted matching (CKKS) ----------------------------------------------

    def upload_he_context(self, public_context: bytes) -> str:
        """Store the site's public CKKS context (no secret key); returns its id."""
        body = self._transport.request(
            "POST", "/he/contexts", content=public_context, retry=True
        )
        return str(body["context_id"])

    def verify_encrypted(
        self, probe: bytes, *, context_id: str, subject_id: str
    ) -> EncryptedScores:
        """Have the server score an encrypted probe against one subject (1:1)."""
        body = self._transport.request(
            "POST",
            f"/he/contexts/{context_id}/verify/{subject_id}",
            content=probe,
            retry=True,
        )
        return EncryptedScores(
            count=int(body["count"]),
            scores=base64.b64decode(body["scores"]),
            subject_ids=[str(item) for item in body["subject_ids"]],
            template_ids=[str(item) for item in body["template_ids"]],
        )

    # -- data subject rights ---------------------------------------------------

    def export(self, subject_id: str, *, subject_token: str) -> dict[str, Any]:
        """Everything the server holds about a subject (GDPR Art. 15)."""
        body = self._transport.request(
            "GET",
            f"/subjects/{subject_id}/export",
            headers={SUBJECT_TOKEN_HEADER: subject_token},
            retry=True,
        )
        return dict(body)

    def erase(
        self, subject_id: str, *, subject_token: str | None = None
    ) -> dict[str, Any]:
        """Erase a subject (GDPR Art. 17), as the enrolling site or as the subject.

        Returns:
            The server's signed erasure receipt.
        """
        headers = {SUBJECT_TOKEN_HEADER: subject_token} if subject_token else None
        body = self._transport.request(
            "DELETE", f"/subjects/{subject_id}", headers=headers, retry=False
        )
        return dict(body)

    # -- audit -----------------------------------------------------------------

    def report_refusal(self, *, stage: str, reasons: list[str]) -> None:
        """Tell the server's audit log that the site refused a capture.

        Only the stage and the reasons are sent (no image, no template, no
        subject reference), so the audit log counts refusals without holding
        personal data.
        """
        self._transport.request(
            "POST",
            "/audit/refusals",
            json={"stage": stage, "reasons": reasons},
            retry=True,
        )


def _receipt(body: Any) -> EnrollmentReceipt:
    if not isinstance(body, dict) or "subject_id" not in body:
        raise ServiceError(f"The server's enrollment answer is malformed: {body!r}.")
    return EnrollmentReceipt(
        subject_id=str(body["subject_id"]),
        subject_token=str(body.get("subject_token", "")),
        template_count=int(body.get("template_count", 0)),
        raw=body,
    )


def _identify_result(body: Any) -> IdentifyResult:
    candidates = [
        Candidate(
            subject_id=str(item["subject_id"]),
            score=float(item["score"]),
            subject_ref=item.get("external_ref"),
        )
        for item in body["candidates"]
    ]
    threshold = float(body["threshold"])
    best = candidates[0] if candidates else None
    match = best if best is not None and best.score >= threshold else None
    return IdentifyResult(candidates=candidates, threshold=threshold, match=match)
