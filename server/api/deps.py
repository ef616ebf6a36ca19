"""Dependencies shared by the routers: the service and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from facefed.core.errors import PermissionDeniedError
from facefed.server.security import Principal
from facefed.server.service import AuthenticationError, GalleryService

SUBJECT_TOKEN_HEADER = "X-Subject-Token"  # noqa: S105 (a header name)


def get_service(request: Request) -> GalleryService:
    """The app's `GalleryService`."""
    service: GalleryService = request.app.state.service
    return service


Service = Annotated[GalleryService, Depends(get_service)]


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key (ffk_...) or a subject token (ffs_...).",
)
_subject_token = APIKeyHeader(
    name=SUBJECT_TOKEN_HEADER,
    auto_error=False,
    description="A subject token (ffs_...), as an alternative to Bearer.",
)


def get_principal(
    service: Service,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    subject_token: Annotated[str | None, Depends(_subject_token)],
) -> Principal:
    """Authenticate the caller from `Authorization: Bearer` or `X-Subject-Token`.

    Raises:
        AuthenticationError: No credential, or an invalid one.
    """
    key = bearer.credentials.strip() if bearer is not None else None
    principal = service.authenticate(key or None, subject_token)
    if principal is None:
        raise AuthenticationError(
            "This endpoint needs 'Authorization: Bearer <API key or subject "
            "token>' or an X-Subject-Token header."
        )
    return principal


Caller = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: Caller) -> Principal:
    """The caller, who must hold an admin key."""
    if principal.role != "admin":
        raise PermissionDeniedError("This endpoint needs an admin key.")
    return principal


def require_site(principal: Caller) -> Principal:
    """The caller, who must hold a site key."""
    if principal.role != "site":
        raise PermissionDeniedError("This endpoint needs a site key.")
    return principal


def require_key(principal: Caller) -> Principal:
    """The caller, who must hold a site or admin key (not a subject token)."""
    if principal.role not in ("site", "admin"):
        raise PermissionDeniedError("This endpoint needs a site or admin key.")
    return principal


Admin = Annotated[Principal, Depends(require_admin)]
SiteCaller = Annotated[Principal, Depends(require_site)]
KeyHolder = Annotated[Principal, Depends(require_key)]
