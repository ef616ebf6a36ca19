"""The FastAPI application factory of the gallery server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facefed.server.api import ROUTER_MODULES
from facefed.server.api.errors import error_body, install_error_handlers
from facefed.server.service import GalleryService
from facefed.server.settings import ServerSettings, get_server_settings

logger = logging.getLogger(__name__)

API_PREFIX = "/v1"
_LARGE_BODY_PREFIX = "/v1/he/"


class BodyLimitMiddleware:
    """Refuse request bodies over a limit with 413, before the app reads them.

    Encrypted-matching routes (`/v1/he/...`) carry CKKS contexts of tens of
    megabytes and get their own, larger limit.

    Args:
        app: The wrapped ASGI app.
        max_bytes: Limit for ordinary requests.
        max_large_bytes: Limit for `/v1/he/` requests.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_large_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_large_bytes = max_large_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the URL and declared length, then count the streamed bytes."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _url_has_nul(scope):
            await _refuse(
                send, 422, "invalid_request", "The URL contains a NUL character."
            )
            return
        limit = (
            self.max_large_bytes
            if scope["path"].startswith(_LARGE_BODY_PREFIX)
            else self.max_bytes
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            # FastAPI turns an error raised while it parses a JSON body into
            # its own 400; once the body was cut short, drop that answer and
            # send the 413 below instead.
            nonlocal started
            if exceeded and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLargeError):
            await self.app(scope, limited_receive, guarded_send)
        if exceeded and not started:
            await _too_large(send, limit)


class _BodyTooLargeError(Exception):
    pass


def _url_has_nul(scope: Scope) -> bool:
    """Whether the path or query string holds a NUL (raw or percent-encoded).

    PostgreSQL text cannot store U+0000: such an id would fail in the driver.
    """
    query = scope.get("query_string", b"").lower()
    return "\x00" in scope["path"] or b"%00" in query or b"\x00" in query


async def _too_large(send: Send, limit: int) -> None:
    await _refuse(
        send, 413, "body_too_large", f"The request body exceeds {limit} bytes."
    )


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    import json

    body = json.dumps(error_body(code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_SUBJECT_IN_URL = re.compile(r"(/v1/subjects/|/verify/|[?&]candidate=)[^/?&\s\"]+")


def redact_subject_ids(text: str) -> str:
    """Replace subject ids in a request line by ``<subject>``.

    Subject ids are pseudonyms: an access log that keeps them would outlive
    the subject's erasure and link their requests together.
    """
    return _SUBJECT_IN_URL.sub(r"\1<subject>", text)


class SubjectIdLogFilter(logging.Filter):
    """A filter for uvicorn's access log that redacts subject ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's arguments (uvicorn passes the path as one)."""
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_subject_ids(arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        record.msg = redact_subject_ids(str(record.msg))
        return True


async def _purge_periodically(service: GalleryService, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(service.purge_expired)
        except Exception:
            logger.exception("The periodic purge of expired consents failed")


def create_app(
    settings: ServerSettings | None = None, *, service: GalleryService | None = None
) -> FastAPI:
    """Build the API app; the service starts (migrations, index) at start-up.

    Args:
        settings: Server settings; read from the environment when None.
        service: A prepared service (tests); built from `settings` when None.
    """
    settings = settings or get_server_settings()
    service = service or GalleryService(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.start)
        task = None
        if settings.purge_interval_s > 0:
            task = asyncio.create_task(
                _purge_periodically(service, settings.purge_interval_s)
            )
        logger.info("Gallery server ready")
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            service.close()

    app = FastAPI(
        title="facefed gallery server",
        version="1",
        lifespan=lifespan,
        description="Protected face templates behind a GDPR-aware API.",
    )
    app.state.service = service
    app.state.settings = settings
    install_error_handlers(app)
    for module_name in ROUTER_MODULES:
        module: Any = importlib.import_module(module_name)
        app.include_router(module.router, prefix=API_PREFIX)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_large_bytes=settings.max_ciphertext_bytes,
    )
    return app
