"""Subjects: enrollment with consent, more templates, export, erasure."""

from typing import Annotated

from fastapi import APIRouter, Header, status

from facefed.server.api.deps import Caller, Service, SiteCaller
from facefed.server.api.schemas import (
    ErasureReceipt,
    SubjectCreate,
    SubjectEnrolled,
    SubjectExport,
    TemplatesAdded,
    TemplatesCreate,
)
from facefed.server.service import ConsentInput

router = APIRouter(prefix="/subjects", tags=["subjects"])


@router.post("", response_model=SubjectEnrolled, status_code=status.HTTP_201_CREATED)
def enroll(
    body: SubjectCreate,
    service: Service,
    caller: SiteCaller,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> SubjectEnrolled:
    """Enroll a subject (site key). The subject token is returned only once.

    Repeating the request with the same `Idempotency-Key` returns the first
    answer instead of enrolling twice.
    """
    consent = body.consent
    result = service.enroll(
        caller,
        collection_id=body.collection,
        consent=ConsentInput(
            purpose=consent.purpose,
            lawful_basis=consent.lawful_basis,
            consent_text_version=consent.consent_text_version,
            given_at=consent.given_at,
            retention_days=consent.retention_days,
        ),
        templates=[template.parse() for template in body.templates],
        external_ref=body.external_ref,
        idempotency_key=idempotency_key,
    )
    return SubjectEnrolled(**result)


@router.post("/{subject_id}/templates", response_model=TemplatesAdded)
def add_templates(
    subject_id: str, body: TemplatesCreate, service: Service, caller: SiteCaller
) -> TemplatesAdded:
    """Add templates to a subject of the caller's site."""
    count = service.add_templates(
        caller, subject_id, [template.parse() for template in body.templates]
    )
    return TemplatesAdded(subject_id=subject_id, template_count=count)


@router.get("/{subject_id}/export", response_model=SubjectExport)
def export(subject_id: str, service: Service, caller: Caller) -> SubjectExport:
    """Everything held about a subject (GDPR Art. 15), templates protected.

    Allowed to the subject's own token, the enrolling site's key, an admin key.
    """
    return SubjectExport.model_validate(service.export(caller, subject_id))


@router.delete("/{subject_id}", response_model=ErasureReceipt)
def erase(subject_id: str, service: Service, caller: Caller) -> ErasureReceipt:
    """Erase a subject everywhere (GDPR Art. 17) and return a signed receipt."""
    return ErasureReceipt.model_validate(
        service.erase(caller, subject_id, reason="erasure_request")
    )


@router.post("/{subject_id}/consent/withdraw", response_model=ErasureReceipt)
def withdraw_consent(
    subject_id: str, service: Service, caller: Caller
) -> ErasureReceipt:
    """Withdraw consent (GDPR Art. 7(3)); the subject is erased at once."""
    return ErasureReceipt.model_validate(
        service.erase(caller, subject_id, reason="consent_withdrawn")
    )
