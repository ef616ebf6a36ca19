"""Administration: sites, API keys, collections, protection keys, audit, purge."""

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Query, status

from facefed.core.errors import ProtectionError
from facefed.server.api.deps import Admin, Service, SiteCaller
from facefed.server.api.schemas import (
    Acknowledged,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    AuditEventPublic,
    AuditVerifyPublic,
    CollectionCreate,
    CollectionPublic,
    ProtectionKeyCreate,
    ProtectionKeyPublic,
    PurgePublic,
    RefusalCreate,
    RotationCreate,
    RotationPublic,
    SiteCreate,
    SitePublic,
)

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/sites", response_model=SitePublic, status_code=status.HTTP_201_CREATED
)
def create_site(body: SiteCreate, service: Service, caller: Admin) -> SitePublic:
    """Register a branch site."""
    return SitePublic.model_validate(service.create_site(caller, body.name))


@router.get("/admin/sites", response_model=list[SitePublic])
def list_sites(service: Service, caller: Admin) -> list[SitePublic]:
    """Every site."""
    return [SitePublic.model_validate(site) for site in service.list_sites()]


@router.post(
    "/admin/api-keys",
    response_model=ApiKeyCreated,
    status_code=status.HTTP_201_CREATED,
)
def create_api_key(
    body: ApiKeyCreate, service: Service, caller: Admin
) -> ApiKeyCreated:
    """Create an API key; the key is in this answer only."""
    row, secret = service.create_api_key(
        caller.actor, role=body.role, site_id=body.site_id, name=body.name
    )
    return ApiKeyCreated(**ApiKeyPublic.model_validate(row).model_dump(), key=secret)


@router.get("/admin/api-keys", response_model=list[ApiKeyPublic])
def list_api_keys(service: Service, caller: Admin) -> list[ApiKeyPublic]:
    """Every API key's metadata."""
    return [ApiKeyPublic.model_validate(row) for row in service.list_api_keys()]


@router.delete("/admin/api-keys/{key_id}", response_model=ApiKeyPublic)
def revoke_api_key(key_id: str, service: Service, caller: Admin) -> ApiKeyPublic:
    """Revoke an API key."""
    return ApiKeyPublic.model_validate(service.revoke_api_key(caller, key_id))


@router.post(
    "/admin/collections",
    response_model=CollectionPublic,
    status_code=status.HTTP_201_CREATED,
)
def create_collection(
    body: CollectionCreate, service: Service, caller: Admin
) -> CollectionPublic:
    """Create a collection at its scheme's newest key version."""
    row = service.create_collection(
        caller,
        collection_id=body.id,
        model_id=body.model_id,
        scheme=body.scheme,
        dim=body.dim,
    )
    return CollectionPublic.of(row, 0)


@router.post(
    "/admin/protection-keys",
    response_model=ProtectionKeyPublic,
    status_code=status.HTTP_201_CREATED,
)
def create_protection_key(
    body: ProtectionKeyCreate, service: Service, caller: Admin
) -> ProtectionKeyPublic:
    """Add the next key version of a scheme (generated, or uploaded as base64)."""
    secret = None
    if body.secret is not None:
        try:
            secret = base64.b64decode(body.secret, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ProtectionError("The key secret is not valid base64.") from error
    row = service.create_protection_key(caller, scheme=body.scheme, secret=secret)
    return ProtectionKeyPublic.model_validate(row)


@router.get("/admin/protection-keys", response_model=list[ProtectionKeyPublic])
def list_protection_keys(service: Service, caller: Admin) -> list[ProtectionKeyPublic]:
    """Every protection key's metadata (never a secret)."""
    return [
        ProtectionKeyPublic.model_validate(row)
        for row in service.list_protection_keys()
    ]


@router.post("/admin/collections/{collection_id}/rotate", response_model=RotationPublic)
def rotate(
    collection_id: str, body: RotationCreate, service: Service, caller: Admin
) -> RotationPublic:
    """Re-key a collection to a newer key version (see the README)."""
    outcome = service.rotate(
        caller,
        collection_id=collection_id,
        to_version=body.to_version,
        transform=body.transform,
    )
    return RotationPublic(
        collection=outcome.collection,
        scheme=outcome.scheme,
        from_version=outcome.from_version,
        to_version=outcome.to_version,
        rekeyed_templates=outcome.rekeyed_templates,
        reenroll_subjects=outcome.reenroll_subjects,
    )


@router.post("/admin/purge-expired", response_model=PurgePublic)
def purge_expired(service: Service, caller: Admin) -> PurgePublic:
    """Erase every subject whose consent has expired."""
    return PurgePublic(erased=service.purge_expired(actor=caller.actor))


@router.get("/admin/audit", response_model=list[AuditEventPublic])
def audit_events(
    service: Service,
    caller: Admin,
    action: Annotated[str | None, Query(max_length=64)] = None,
    since_seq: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventPublic]:
    """Audit events after `since_seq`, oldest first, optionally of one action."""
    return [
        AuditEventPublic.model_validate(event)
        for event in service.audit_events(
            action=action, since_seq=since_seq, limit=limit
        )
    ]


@router.get("/admin/audit/verify", response_model=AuditVerifyPublic)
def audit_verify(service: Service, caller: Admin) -> AuditVerifyPublic:
    """Recompute the audit hash chain and report any edited or removed event."""
    result = service.verify_audit()
    return AuditVerifyPublic(
        ok=result.ok, events=result.events, problems=result.problems
    )


@router.post("/audit/refusals", response_model=Acknowledged)
def report_refusal(
    body: RefusalCreate, service: Service, caller: SiteCaller
) -> Acknowledged:
    """Record that a site refused a capture (stage and reasons only)."""
    service.report_refusal(caller, stage=body.stage, reasons=body.reasons)
    return Acknowledged()
