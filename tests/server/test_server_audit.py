"""The audit hash chain detects edited and removed events (API and CLI)."""

import numpy as np
from conftest import enroll_site_subject, unit_vectors
from sqlalchemy import text
from typer.testing import CliRunner


def _some_events(world):
    for seed in range(3):
        vector = unit_vectors(np.random.default_rng(seed), 1)[0]
        enroll_site_subject(world.client, world, vector)


def _verify(world):
    return world.client.get(
        "/v1/admin/audit/verify", headers=world.auth(world.admin_key)
    ).json()


def _cli_verify(settings, monkeypatch):
    from facefed.core.cli import app
    from facefed.server.commands import register

    monkeypatch.setenv("FACEFED_HOME", str(settings.home))
    monkeypatch.setenv("FACEFED_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("FACEFED_MASTER_KEY", settings.master_key)
    register(app, app)
    return CliRunner().invoke(app, ["admin", "audit-verify"])


def test_intact_chain_verifies(world, settings, monkeypatch):
    _some_events(world)
    result = _verify(world)
    assert result["ok"] and result["events"] > 5
    cli = _cli_verify(settings, monkeypatch)
    assert cli.exit_code == 0, cli.output
    assert "intact" in cli.output


def test_edited_event_is_detected(world, settings, monkeypatch):
    _some_events(world)
    engine = world.client.app.state.service.engine
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE audit_events SET actor = 'nobody' WHERE seq = 3")
        )
    result = _verify(world)
    assert not result["ok"]
    assert any("Event 3 was edited" in problem for problem in result["problems"])
    cli = _cli_verify(settings, monkeypatch)
    assert cli.exit_code == 1
    assert "BROKEN" in cli.output


def test_removed_events_are_detected(world):
    _some_events(world)
    engine = world.client.app.state.service.engine
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = 4"))
    result = _verify(world)
    assert not result["ok"]
    assert any("missing" in problem for problem in result["problems"])


def test_removed_last_event_is_detected(world):
    _some_events(world)
    engine = world.client.app.state.service.engine
    with engine.begin() as connection:
        last = connection.execute(text("SELECT max(seq) FROM audit_events")).scalar()
        connection.execute(
            text("DELETE FROM audit_events WHERE seq = :seq"), {"seq": last}
        )
    result = _verify(world)
    assert not result["ok"]
    assert any("removed from the end" in problem for problem in result["problems"])
