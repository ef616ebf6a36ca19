"""Encrypted matching (CKKS): public context, encrypted probes, encrypted scores.

Bodies are raw bytes (`application/octet-stream`) in the framed formats of
`privacy/he.py`; answers are JSON with the encrypted score set in base64 and
the subject and template of each score, in order.
"""

import asyncio
import base64
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel

from facefed.server.api.deps import Service, SiteCaller
from facefed.server.encrypted import EncryptedMatcher, EncryptedScores

router = APIRouter(prefix="/he", tags=["encrypted matching"])

_BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }
}


class HeContextPublic(BaseModel):
    """A stored public CKKS context."""

    context_id: str
    bytes: int


class EncryptedScoresPublic(BaseModel):
    """Encrypted scores; decrypt with `SiteHEContext.decrypt_scores(scores, count)`."""

    count: int
    scores: str
    subject_ids: list[str]
    template_ids: list[str]


def _matcher(request: Request, service: Service) -> EncryptedMatcher:
    matcher: EncryptedMatcher | None = getattr(request.app.state, "he_matcher", None)
    if matcher is None:
        matcher = EncryptedMatcher(service)
        request.app.state.he_matcher = matcher
    return matcher


def _public(result: EncryptedScores) -> EncryptedScoresPublic:
    return EncryptedScoresPublic(
        count=result.count,
        scores=base64.b64encode(result.scores).decode("ascii"),
        subject_ids=result.subject_ids,
        template_ids=[str(template_id) for template_id in result.template_ids],
    )


@router.post(
    "/contexts",
    response_model=HeContextPublic,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_BINARY_BODY,
)
async def upload_context(
    request: Request, service: Service, caller: SiteCaller
) -> HeContextPublic:
    """Store the site's public CKKS context (no secret key) for later probes."""
    data = await request.body()
    context_id = await asyncio.to_thread(
        _matcher(request, service).register_context, caller, data
    )
    return HeContextPublic(context_id=context_id, bytes=len(data))


@router.post(
    "/contexts/{context_id}/verify/{subject_id}",
    response_model=EncryptedScoresPublic,
    openapi_extra=_BINARY_BODY,
)
async def verify_encrypted(
    context_id: str,
    subject_id: str,
    request: Request,
    service: Service,
    caller: SiteCaller,
) -> EncryptedScoresPublic:
    """Score an encrypted probe against each template of one subject (1:1)."""
    probe = await request.body()
    result = await asyncio.to_thread(
        _matcher(request, service).verify,
        caller,
        context_id=context_id,
        subject_id=subject_id,
        probe=probe,
    )
    return _public(result)


@router.post(
    "/contexts/{context_id}/identify",
    response_model=EncryptedScoresPublic,
    openapi_extra=_BINARY_BODY,
)
async def identify_encrypted(
    context_id: str,
    request: Request,
    service: Service,
    caller: SiteCaller,
    collection: Annotated[str, Query(max_length=64)] = "default",
    candidate: Annotated[list[str] | None, Query(max_length=64)] = None,
    own_site_only: bool = False,
) -> EncryptedScoresPublic:
    """Score an encrypted columns probe against a collection (1:N).

    `candidate` (repeatable) and `own_site_only` limit the subjects scored,
    and so what the site learns (see `privacy/he.py`).
    """
    probe = await request.body()
    result = await asyncio.to_thread(
        _matcher(request, service).identify,
        caller,
        context_id=context_id,
        collection_id=collection,
        probe=probe,
        candidates=candidate,
        own_site_only=own_site_only,
    )
    return _public(result)
