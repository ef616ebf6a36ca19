"""A retried enrollment never enrolls twice, even after a server failed post-commit.

The real server app runs under uvicorn in a thread on 127.0.0.1, wrapped so
that the first enrollment it handles is committed and then answered with a
503, as when a proxy or the network loses the answer. The client's retry,
carrying the same `Idempotency-Key`, must get the first subject back.
"""

import base64
import secrets
import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa
import uvicorn

from facefed.client.admin import AdminClient
from facefed.client.consent import ConsentRecord
from facefed.client.gallery import GalleryClient
from facefed.client.launcher import free_port
from facefed.client.settings import ClientSettings
from facefed.core.errors import ConflictError
from facefed.privacy.templates import protect_template

MODEL_ID = "idempotency-test-model"


class FailOnceAfterCommit:
    """ASGI wrapper: runs the first enrollment fully, then answers 503 instead."""

    def __init__(self, app) -> None:
        self.app = app
        self.failures_left = 1
        self.enrollments_seen = 0

    async def __call__(self, scope, receive, send) -> None:
        is_enrollment = (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/v1/subjects"
        )
        if is_enrollment:
            self.enrollments_seen += 1
        if not (is_enrollment and self.failures_left):
            await self.app(scope, receive, send)
            return
        self.failures_left -= 1
        statuses = []

        async def swallow(message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await self.app(scope, receive, swallow)
        assert statuses == [201], statuses  # the enrollment really was committed
        body = b'{"error": {"code": "unavailable", "message": "lost answer"}}'
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server(tmp_path):
    from facefed.server.app import create_app
    from facefed.server.service import GalleryService
    from facefed.server.settings import ServerSettings

    key_file = tmp_path / "master.key"
    key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    settings = ServerSettings(
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'server.db'}",
        master_key_file=key_file,
        purge_interval_s=0,
    )
    service = GalleryService(settings)
    wrapped = FailOnceAfterCommit(create_app(settings, service=service))
    port = free_port()
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(
            wrapped, host="127.0.0.1", port=port, log_level="warning", ws="none"
        )
    )
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    _, admin_key = service.create_api_key("test", role="admin", site_id=None)
    try:
        yield f"http://127.0.0.1:{port}", admin_key, wrapped, settings
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)


def _consent() -> ConsentRecord:
    return ConsentRecord(
        purpose="Retry test", lawful_basis="consent", consent_text_version="1",
        retention_days=30,
    )  # fmt: skip


def test_a_retried_enrollment_returns_the_first_subject(server):
    url, admin_key, wrapped, settings = server
    client_settings = ClientSettings(
        server_url=url, max_attempts=3, backoff_base_s=0.01
    )
    with AdminClient.connect(api_key=admin_key, settings=client_settings) as admin:
        admin.create_protection_key("orthonormal-v1")
        admin.create_collection(
            "default", model_id=MODEL_ID, scheme="orthonormal-v1", dim=128
        )
        site = admin.register_site("retry-site")
    sleeps: list[float] = []
    client = GalleryClient.from_settings(
        client_settings, api_key=site.api_key, rng=np.random.default_rng(1)
    )
    client.transport._sleep = sleeps.append  # no real waiting in the test
    key = client.protection_key()
    rng = np.random.default_rng(5)
    vector = rng.normal(size=128).astype(np.float32)
    template = protect_template(
        vector / np.linalg.norm(vector), key=key, model_id=MODEL_ID
    )

    receipt = client.enroll([template], subject_ref="p-1", consent=_consent())

    assert wrapped.enrollments_seen == 2 and len(sleeps) == 1  # one failure, one retry
    assert receipt.subject_token and receipt.template_count == 1
    engine = sa.create_engine(settings.resolved_database_url)
    with engine.connect() as connection:
        subjects = (
            connection.execute(sa.text("SELECT id FROM subjects")).scalars().all()
        )
    engine.dispose()
    assert subjects == [receipt.subject_id]
    # The replayed answer is the first one: its token opens the subject's data.
    export = client.export(receipt.subject_id, subject_token=receipt.subject_token)
    assert export["external_ref"] == "p-1"

    # Reusing a key for a different request is refused, and enrolls nothing.
    client.enroll(
        [template], subject_ref="p-2", consent=_consent(), idempotency_key="same-key"
    )
    with pytest.raises(ConflictError):
        client.enroll(
            [template],
            subject_ref="p-3",
            consent=_consent(),
            idempotency_key="same-key",
        )
    engine = sa.create_engine(settings.resolved_database_url)
    with engine.connect() as connection:
        refs = connection.execute(
            sa.text("SELECT external_ref FROM subjects")
        ).scalars()
        assert sorted(refs) == ["p-1", "p-2"]
    engine.dispose()
    client.close()
