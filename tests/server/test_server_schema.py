"""Migrations, the CLI on the database, and the periodic purge of expired consents."""

import re
import time

import numpy as np
from conftest import (
    bootstrap_admin,
    enroll_site_subject,
    expire_consent,
    make_app,
    setup_world,
    unit_vectors,
)
from fastapi.testclient import TestClient
from typer.testing import CliRunner


def test_migrations_match_the_orm_and_are_idempotent(settings):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from facefed.server.db import Base, make_engine, run_migrations

    engine = make_engine(settings.resolved_database_url)
    run_migrations(engine)
    run_migrations(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == "0002"
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def _cli(settings, monkeypatch, *args):
    from facefed.core.cli import app
    from facefed.server.commands import register

    monkeypatch.setenv("FACEFED_HOME", str(settings.home))
    monkeypatch.setenv("FACEFED_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("FACEFED_MASTER_KEY", settings.master_key)
    register(app, app)
    return CliRunner().invoke(app, list(args))


def test_cli_bootstrap_key_works_against_the_api(settings, monkeypatch):
    result = _cli(settings, monkeypatch, "admin", "create-key", "--role", "admin")
    assert result.exit_code == 0, result.output
    key = re.search(r"api key: (ffk_\S+)", result.output).group(1)
    with TestClient(make_app(settings)) as client:
        listed = client.get(
            "/v1/admin/api-keys", headers={"Authorization": f"Bearer {key}"}
        )
        assert listed.status_code == 200
        assert key not in listed.text  # only hashes are stored
        wrong = client.get(
            "/v1/admin/api-keys", headers={"Authorization": "Bearer ffk_x"}
        )
        assert wrong.status_code == 401


def test_cli_purge_expired(settings, monkeypatch):
    admin = bootstrap_admin(settings)
    with TestClient(make_app(settings)) as client:
        world = setup_world(client, admin)
        vector = unit_vectors(np.random.default_rng(0), 1)[0]
        enrolled = enroll_site_subject(client, world, vector)
        assert enrolled.status_code == 201, enrolled.text
        expire_consent(settings, enrolled.json()["subject_id"])
    result = _cli(settings, monkeypatch, "admin", "purge-expired")
    assert result.exit_code == 0, result.output
    assert "erased 1 subject" in result.output
    with TestClient(make_app(settings)) as client:
        assert client.get("/v1/health").json()["templates"] == 0


def test_background_task_purges_expired_consents(settings):
    admin = bootstrap_admin(settings)
    fast = settings.model_copy(update={"purge_interval_s": 0.2})
    with TestClient(make_app(fast)) as client:
        world = setup_world(client, admin)
        vector = unit_vectors(np.random.default_rng(1), 1)[0]
        enrolled = enroll_site_subject(client, world, vector)
        assert enrolled.status_code == 201
        subject = enrolled.json()["subject_id"]
        expire_consent(fast, subject)
        for _ in range(300):  # bounded wait for the task's next run
            export = client.get(
                f"/v1/subjects/{subject}/export", headers=world.auth(world.admin_key)
            )
            if export.status_code == 410:
                break
            time.sleep(0.1)
        assert export.status_code == 410
        events = client.get(
            "/v1/admin/audit",
            params={"action": "subject.erase"},
            headers=world.auth(world.admin_key),
        ).json()
        assert events[0]["details"]["reason"] == "consent_expired"


def test_cli_verifies_an_erasure_receipt(settings, monkeypatch, tmp_path):
    import json

    admin = bootstrap_admin(settings)
    with TestClient(make_app(settings)) as client:
        world = setup_world(client, admin)
        vector = unit_vectors(np.random.default_rng(2), 1)[0]
        subject = enroll_site_subject(client, world, vector).json()["subject_id"]
        receipt = client.delete(
            f"/v1/subjects/{subject}", headers=world.auth(world.site_key)
        ).json()
        pem = client.get("/v1/receipts/public-key").json()["public_key_pem"]
    (tmp_path / "key.pem").write_text(pem)
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    files = [str(tmp_path / "receipt.json"), str(tmp_path / "key.pem")]
    good = _cli(settings, monkeypatch, "admin", "verify-receipt", *files)
    assert good.exit_code == 0 and "valid" in good.output
    receipt["removed"]["templates"] = 0
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    forged = _cli(settings, monkeypatch, "admin", "verify-receipt", *files)
    assert forged.exit_code == 1
    assert "INVALID" in forged.output
