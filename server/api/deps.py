"""Dependencies shared by the routers: the service and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from facefed.core.errors import PermissionDeniedError
from facefed.server.security import Principal
from facefed.server.service import AuthenticationError, GalleryService

SUBJECT_TOKEN_HEADER = "X-Subject-Token"  # noqa: S105 (a header name)


def get_service(request: Request) -> GalleryService:
    """The app's `GalleryService`."""
    service: GalleryService = request.app.state.service
    return service


Service = Annotated[GalleryService, Depends(get_service)]


def get_principal(
    service: Service,
    authorization: Annotated[str | None, Header()] = None,
    x_subject_token: Annotated[str | None, Header()] = None,
) -> Principal:
    """Authenticate the caller from `Authorization: Bearer` or `X-Subject-Token`.

    Raises:
        AuthenticationError: No credential, or an invalid one.
    """
    bearer = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationError("Use 'Authorization: Bearer <key>'.")
        bearer = value.strip()
    principal = service.authenticate(bearer, x_subject_token)
    if principal is None:
        raise AuthenticationError("This endpoint needs an API key or subject token.")
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
