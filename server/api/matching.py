"""Matching: 1:N identification and 1:1 verification of protected probes."""

from fastapi import APIRouter

from facefed.server.api.deps import KeyHolder, Service
from facefed.server.api.schemas import (
    CandidatePublic,
    IdentifyPublic,
    IdentifyRequest,
    VerifyPublic,
    VerifyRequest,
)
from facefed.server.service import Candidate

router = APIRouter(tags=["matching"])


def _candidate(candidate: Candidate) -> CandidatePublic:
    return CandidatePublic(
        subject_id=candidate.subject_id,
        score=candidate.score,
        external_ref=candidate.external_ref,
    )


@router.post("/identify", response_model=IdentifyPublic)
def identify(
    body: IdentifyRequest, service: Service, caller: KeyHolder
) -> IdentifyPublic:
    """Search a collection for the subjects closest to the probe (1:N)."""
    outcome = service.identify(
        caller,
        collection_id=body.collection,
        template=body.template.parse(),
        top_k=body.top_k,
        threshold=body.threshold,
    )
    return IdentifyPublic(
        collection=outcome.collection,
        candidates=[_candidate(c) for c in outcome.candidates],
        threshold=outcome.threshold,
        match=_candidate(outcome.match) if outcome.match else None,
    )


@router.post("/verify", response_model=VerifyPublic)
def verify(body: VerifyRequest, service: Service, caller: KeyHolder) -> VerifyPublic:
    """Compare the probe with one subject's templates (1:1)."""
    outcome = service.verify(
        caller,
        subject_id=body.subject_id,
        template=body.template.parse(),
        threshold=body.threshold,
    )
    return VerifyPublic(
        subject_id=outcome.subject_id,
        score=outcome.score,
        threshold=outcome.threshold,
        match=outcome.match,
    )
