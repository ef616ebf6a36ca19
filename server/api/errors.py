"""HTTP mapping of facefed errors: the one place that knows status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from facefed.core.errors import (
    ConfigurationError,
    ConflictError,
    FacefedError,
    GoneError,
    NotFoundError,
    PermissionDeniedError,
    ProtectionError,
    TemplateError,
)
from facefed.privacy.envelope import DecryptionError
from facefed.server.service import AuthenticationError, LimitExceededError

logger = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of wins.
_STATUS: list[tuple[type[FacefedError], int, str]] = [
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "forbidden"),
    (GoneError, 410, "gone"),
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (TemplateError, 422, "invalid_template"),
    (ProtectionError, 422, "invalid_protection"),
    (LimitExceededError, 422, "limit_exceeded"),
    (ConfigurationError, 400, "bad_request"),
    (DecryptionError, 500, "decryption_failed"),
]


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message}}


def status_of(error: FacefedError) -> tuple[int, str]:
    """Return the HTTP status and error code for a facefed error."""
    for kind, status, code in _STATUS:
        if isinstance(error, kind):
            return status, code
    return 500, "internal_error"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with `{"error": {"code", "message"}}`."""

    @app.exception_handler(FacefedError)
    async def _facefed(_request: Request, error: FacefedError) -> JSONResponse:
        status, code = status_of(error)
        if status >= 500:
            logger.error("Request failed: %s", type(error).__name__)
            return JSONResponse(
                error_body(code, "The server could not complete the request."),
                status_code=status,
            )
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(
            error_body(code, str(error)), status_code=status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(
        _request: Request, error: RequestValidationError
    ) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg')}"
            for item in error.errors()[:5]
        )
        return JSONResponse(
            error_body("invalid_request", f"The request is invalid: {problems}."),
            status_code=422,
        )

    @app.exception_handler(DataError)
    async def _data(_request: Request, error: DataError) -> JSONResponse:
        # A value the database refuses (out of range, bad text) that the
        # request models let through: the transaction rolled back, so this is
        # the client's bad input, not a server fault.
        logger.warning("The database refused a value: %s", type(error.orig).__name__)
        return JSONResponse(
            error_body("invalid_request", "A value is out of the accepted range."),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(f"http_{error.status_code}", str(error.detail)),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )
