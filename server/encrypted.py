"""Encrypted matching on the server: public CKKS contexts and encrypted scoring.

The site uploads its public context once (`privacy.he.SiteHEContext.public_bytes`,
no secret key), then encrypted protected probes; the server scores them with
`privacy.he.ServerHEScorer` against the collection's plaintext protected
templates and returns encrypted scores that only the site can decrypt. See
`privacy/he.py` for what each party learns. The server offers two limits on
what a 1:N search reveals to the site: `own_site_only` scores only the
caller's own subjects, and `candidates` scores only named subjects (for
example those a coarse search on an irreversible collection proposed), so
the site decrypts k scores instead of one per gallery template.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import select

from facefed.core.errors import NotFoundError, PermissionDeniedError, TemplateError
from facefed.privacy.he import ServerHEScorer
from facefed.server import audit
from facefed.server.db import Collection, HeContext, Subject, session_scope, utcnow
from facefed.server.security import Principal
from facefed.server.service import GalleryService, LimitExceededError

logger = logging.getLogger(__name__)

_CACHE_SIZE = 4


@dataclass(frozen=True)
class EncryptedScores:
    """Encrypted scores and what they are scores of, in order.

    Attributes:
        scores: The encrypted score set (`SiteHEContext.decrypt_scores`).
        count: Number of scores in the set.
        subject_ids: The subject of each score.
        template_ids: The template of each score.
    """

    scores: bytes
    count: int
    subject_ids: list[str]
    template_ids: list[int]


class EncryptedMatcher:
    """Holds public contexts and scores encrypted probes.

    Args:
        service: The gallery service whose collections are scored.
    """

    def __init__(self, service: GalleryService) -> None:
        self.service = service
        self._lock = threading.Lock()
        # Public contexts with Galois keys are tens of MB: keep only a few loaded.
        self._scorers: OrderedDict[str, ServerHEScorer] = OrderedDict()

    def register_context(self, principal: Principal, data: bytes) -> str:
        """Store a site's public context; return its id."""
        if principal.role != "site" or principal.site_id is None:
            raise PermissionDeniedError("Only a site key may upload a CKKS context.")
        scorer = ServerHEScorer(data)
        context_id = uuid.uuid4().hex
        with self.service.write_lock, session_scope(self.service.sessions) as session:
            session.add(
                HeContext(
                    id=context_id,
                    site_id=principal.site_id,
                    data=data,
                    created_at=utcnow(),
                )
            )
            audit.append_event(
                session,
                action="he.context.create",
                actor=principal.actor,
                site_id=principal.site_id,
                details={"bytes": len(data)},
            )
        self._remember(context_id, scorer)
        return context_id

    def _remember(self, context_id: str, scorer: ServerHEScorer) -> None:
        with self._lock:
            self._scorers[context_id] = scorer
            self._scorers.move_to_end(context_id)
            while len(self._scorers) > _CACHE_SIZE:
                self._scorers.popitem(last=False)

    def _scorer(self, principal: Principal, context_id: str) -> ServerHEScorer:
        with session_scope(self.service.sessions) as session:
            row = session.get(HeContext, context_id)
            if row is None:
                raise NotFoundError(f"There is no CKKS context {context_id!r}.")
            if principal.site_id != row.site_id:
                raise PermissionDeniedError(
                    "This CKKS context belongs to another site."
                )
            data = row.data
        with self._lock:
            scorer = self._scorers.get(context_id)
        if scorer is None:
            scorer = ServerHEScorer(data)
            self._remember(context_id, scorer)
        return scorer

    def verify(
        self, principal: Principal, *, context_id: str, subject_id: str, probe: bytes
    ) -> EncryptedScores:
        """Encrypted scores of a probe against each template of one subject (1:1)."""
        scorer = self._scorer(principal, context_id)
        with session_scope(self.service.sessions) as session:
            subject = session.get(Subject, subject_id)
            if subject is None:
                raise NotFoundError(f"There is no subject {subject_id!r}.")
            collection = session.get(Collection, subject.collection_id)
        if collection is None:
            raise NotFoundError(f"There is no collection {subject.collection_id!r}.")
        index = self._float_index(collection)
        subjects, template_ids, matrix = index.vectors_of([subject_id])
        if not subjects:
            raise NotFoundError("The subject has no template under the current key.")
        if len(subjects) == 1:
            scores = scorer.score_one(probe, matrix[0])
        else:
            scores = scorer.score_many(probe, matrix)
        self._audit(principal, "he.verify", collection.id, len(subjects))
        return EncryptedScores(scores, len(subjects), subjects, template_ids)

    def identify(
        self,
        principal: Principal,
        *,
        context_id: str,
        collection_id: str,
        probe: bytes,
        candidates: list[str] | None,
        own_site_only: bool,
    ) -> EncryptedScores:
        """Encrypted scores of a probe against a collection (1:N), maybe limited."""
        scorer = self._scorer(principal, context_id)
        with session_scope(self.service.sessions) as session:
            collection = session.get(Collection, collection_id)
            if collection is None:
                raise NotFoundError(f"There is no collection {collection_id!r}.")
            chosen = candidates
            if own_site_only:
                own = set(
                    session.scalars(
                        select(Subject.id).where(
                            Subject.collection_id == collection_id,
                            Subject.site_id == principal.site_id,
                        )
                    )
                )
                chosen = sorted(own if chosen is None else own & set(chosen))
        if chosen is not None and len(chosen) > self.service.settings.max_top_k:
            raise LimitExceededError(
                f"At most {self.service.settings.max_top_k} candidates may be "
                f"scored; got {len(chosen)}."
            )
        index = self._float_index(collection)
        subjects, template_ids, matrix = index.vectors_of(chosen)
        if not subjects:
            raise NotFoundError("No template matches the search's limits.")
        scores = scorer.score_many(probe, matrix)
        self._audit(principal, "he.identify", collection_id, len(subjects))
        return EncryptedScores(scores, len(subjects), subjects, template_ids)

    def _float_index(self, collection: Collection):  # type: ignore[no-untyped-def]
        if collection.kind != "float":
            raise TemplateError(
                f"Collection {collection.id!r} holds binary templates; encrypted "
                "matching needs a float scheme."
            )
        return self.service.gallery.ensure(collection.id, "float", collection.dim)

    def _audit(
        self, principal: Principal, action: str, collection_id: str, scored: int
    ) -> None:
        with self.service.write_lock, session_scope(self.service.sessions) as session:
            audit.append_event(
                session,
                action=action,
                actor=principal.actor,
                site_id=principal.site_id,
                details={"collection": collection_id, "scored": scored},
            )
