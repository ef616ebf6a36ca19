"""Fixtures of the server tests: a fresh database per test, SQLite and PostgreSQL."""

import base64
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

POSTGRES_URL = os.environ.get("FACEFED_TEST_POSTGRES_URL")
MODEL_ID = "test-model-0001"
DIM = 128


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path: Path) -> Iterator[str]:
    """A database of its own for each test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'server.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip(
            "FACEFED_TEST_POSTGRES_URL is not set (tests/tools/run_tests.sh sets it)"
        )
    from sqlalchemy import create_engine, make_url, text

    admin_url = make_url(POSTGRES_URL)
    name = f"facefed_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def settings(database_url: str, tmp_path: Path):
    from facefed.privacy.envelope import encode_master_key
    from facefed.server.settings import ServerSettings

    return ServerSettings(
        home=tmp_path / "home",
        database_url=database_url,
        master_key=encode_master_key(bytes(range(32))),
        purge_interval_s=0,
        use_gpu=False,
    )


@dataclass
class World:
    """A running app with an admin, two sites and a collection."""

    client: TestClient
    admin_key: str
    site_key: str
    site_id: str
    other_site_key: str
    other_site_id: str
    protection_key: object

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


def make_app(settings):
    from facefed.server.app import create_app

    return create_app(settings)


def bootstrap_admin(settings) -> str:
    from facefed.server.service import GalleryService

    service = GalleryService(settings)
    service.start()
    try:
        _, secret = service.create_api_key("cli", role="admin", site_id=None)
    finally:
        service.close()
    return secret


def setup_world(
    client: TestClient, admin_key: str, scheme: str = "orthonormal-v1", dim: int = DIM
) -> World:
    from facefed.privacy.protection import ProtectionKey

    headers = {"Authorization": f"Bearer {admin_key}"}
    sites = []
    for name in ("north", "south"):
        site = client.post("/v1/admin/sites", json={"name": name}, headers=headers)
        assert site.status_code == 201, site.text
        key = client.post(
            "/v1/admin/api-keys",
            json={"role": "site", "site_id": site.json()["id"]},
            headers=headers,
        )
        assert key.status_code == 201, key.text
        sites.append((site.json()["id"], key.json()["key"]))
    created = client.post(
        "/v1/admin/protection-keys", json={"scheme": scheme}, headers=headers
    )
    assert created.status_code == 201, created.text
    collection = client.post(
        "/v1/admin/collections",
        json={"id": "default", "model_id": MODEL_ID, "scheme": scheme, "dim": dim},
        headers=headers,
    )
    assert collection.status_code == 201, collection.text
    fetched = client.get(
        "/v1/keys/protection", headers={"Authorization": f"Bearer {sites[0][1]}"}
    )
    assert fetched.status_code == 200, fetched.text
    return World(
        client=client,
        admin_key=admin_key,
        site_key=sites[0][1],
        site_id=sites[0][0],
        other_site_key=sites[1][1],
        other_site_id=sites[1][0],
        protection_key=ProtectionKey.from_dict(fetched.json()),
    )


@pytest.fixture
def world(settings) -> Iterator[World]:
    admin_key = bootstrap_admin(settings)
    with TestClient(make_app(settings)) as client:
        yield setup_world(client, admin_key)


def consent(retention_days: int = 365, given_at: datetime | None = None) -> dict:
    return {
        "purpose": "access control at the north entrance",
        "lawful_basis": "consent",
        "consent_text_version": "v1",
        "given_at": (given_at or datetime.now(UTC)).isoformat(),
        "retention_days": retention_days,
    }


def wire(key, embedding: np.ndarray, model_id: str = MODEL_ID) -> dict:
    from facefed.privacy.templates import protect_template

    return protect_template(embedding, key=key, model_id=model_id).to_wire()


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def raw_wire(
    scheme: str,
    version: int,
    data: np.ndarray,
    model_id: str = MODEL_ID,
    dim: int | None = None,
) -> dict:
    return {
        "model_id": model_id,
        "scheme": scheme,
        "key_version": version,
        "dim": dim if dim is not None else int(data.size),
        "data": base64.b64encode(data.astype("<f4").tobytes()).decode(),
    }


def expire_consent(settings, subject_id: str) -> None:
    """Move a subject's consent expiry into the past, as time passing would.

    The server refuses to enroll under a consent that has already lapsed, so
    tests of the purge enroll under a running consent and then age it.
    """
    from datetime import timedelta

    from sqlalchemy import update

    from facefed.server.db import Consent, make_engine, make_session_factory
    from facefed.server.db import session_scope as scope

    engine = make_engine(settings.resolved_database_url)
    try:
        with scope(make_session_factory(engine)) as session:
            session.execute(
                update(Consent)
                .where(Consent.subject_id == subject_id)
                .values(expires_at=datetime.now(UTC) - timedelta(days=1))
            )
    finally:
        engine.dispose()


def enroll_site_subject(
    client, world: World, embedding: np.ndarray, model_id: str = MODEL_ID
):
    """Enroll one subject with a default consent through the first site's key."""
    return client.post(
        "/v1/subjects",
        json={
            "consent": consent(),
            "templates": [wire(world.protection_key, embedding, model_id)],
        },
        headers=world.auth(world.site_key),
    )
