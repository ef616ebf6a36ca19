"""First-run problems: bad settings, receipt files, migration races, file modes."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import bootstrap_admin, enroll_site_subject, make_app, setup_world
from fastapi.testclient import TestClient

SECRET_KEY_TEXT = "c2VjcmV0LW1hc3Rlci1rZXktdGhhdC1tdXN0LW5vdC1sZWFr"


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `facefed ARGS` as the console script does; return code, out, err."""
    from facefed.core import cli

    monkeypatch.setattr(sys, "argv", ["facefed", *args])
    code: object = 0
    try:
        cli.main()
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    # Rich wraps error messages to the terminal width; undo it for matching.
    err = " ".join(captured.err.split())
    return (0 if code is None else int(code)), captured.out, err


def _use(monkeypatch, settings) -> None:
    monkeypatch.setenv("FACEFED_HOME", str(settings.home))
    monkeypatch.setenv("FACEFED_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("FACEFED_KEY_VAULT_URL", settings.resolved_key_vault_url)
    monkeypatch.setenv("FACEFED_MASTER_KEY", settings.master_key)
    monkeypatch.setenv("FACEFED_USE_GPU", "false")


# -- 1. invalid settings --------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("FACEFED_PORT", "abc", ["serve"]),
        ("FACEFED_MATCH_THRESHOLD", "abc", ["admin", "audit-verify"]),
        ("FACEFED_USE_GPU", "maybe", ["admin", "purge-expired"]),
    ],
)
def test_invalid_setting_is_a_configuration_error_naming_only_the_variable(
    variable, value, command, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("FACEFED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEFED_MASTER_KEY", SECRET_KEY_TEXT)
    monkeypatch.setenv(variable, value)
    code, out, err = _main(monkeypatch, capsys, *command)
    assert code == 2
    assert variable in err
    assert "Traceback" not in err + out
    assert value not in err and SECRET_KEY_TEXT not in err + out
    assert not (tmp_path / "home" / "server.db").exists()


def test_an_invalid_master_key_setting_never_shows_the_key(monkeypatch):
    from facefed.core.errors import ConfigurationError
    from facefed.server.settings import get_server_settings

    monkeypatch.setenv("FACEFED_MASTER_KEY", SECRET_KEY_TEXT)
    monkeypatch.setenv("FACEFED_PORT", "70000")
    with pytest.raises(ConfigurationError) as raised:
        get_server_settings()
    assert "FACEFED_PORT" in str(raised.value)
    assert SECRET_KEY_TEXT not in str(raised.value)
    assert "70000" not in str(raised.value)


# -- 2. verify-receipt ------------------------------------------------------------


@pytest.fixture
def receipt_files(settings, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A real erasure receipt and the key endpoint's JSON and PEM, saved as files."""
    import numpy as np
    from conftest import unit_vectors

    admin = bootstrap_admin(settings)
    with TestClient(make_app(settings)) as client:
        world = setup_world(client, admin)
        vector = unit_vectors(np.random.default_rng(11), 1)[0]
        subject = enroll_site_subject(client, world, vector).json()["subject_id"]
        receipt = client.delete(
            f"/v1/subjects/{subject}", headers=world.auth(world.site_key)
        ).json()
        key_answer = client.get("/v1/receipts/public-key")
    assert key_answer.status_code == 200
    receipt_path = tmp_path / "receipt.json"
    receipt_path.write_text(json.dumps(receipt))
    json_path = tmp_path / "public-key.json"
    json_path.write_text(key_answer.text)
    pem_path = tmp_path / "public-key.pem"
    pem_path.write_text(key_answer.json()["public_key_pem"])
    return receipt_path, json_path, pem_path


def test_verify_receipt_accepts_the_endpoint_json_and_the_pem(
    receipt_files, monkeypatch, capsys
):
    receipt, as_json, as_pem = receipt_files
    for key in (as_json, as_pem):
        code, out, err = _main(
            monkeypatch, capsys, "admin", "verify-receipt", str(receipt), str(key)
        )
        assert code == 0, err
        assert "receipt signature valid" in out
    forged = json.loads(receipt.read_text())
    forged["removed"]["templates"] += 1
    receipt.write_text(json.dumps(forged))
    code, _, err = _main(
        monkeypatch, capsys, "admin", "verify-receipt", str(receipt), str(as_json)
    )
    assert code == 1
    assert "INVALID" in err


def test_verify_receipt_input_problems_are_clean_errors_apart_from_invalid(
    receipt_files, monkeypatch, capsys, tmp_path
):
    receipt, as_json, _ = receipt_files
    missing = tmp_path / "nowhere.json"
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a key")
    no_pem = tmp_path / "no-pem.json"
    no_pem.write_text(json.dumps({"algorithm": "Ed25519"}))
    cases = [
        (missing, as_json, "does not exist"),
        (receipt, missing, "does not exist"),
        (garbage, as_json, "not a JSON object"),
        (receipt, garbage, "not a PEM key"),
        (receipt, no_pem, "public_key_pem"),
        (receipt, tmp_path, "cannot be read"),
    ]
    for receipt_arg, key_arg, message in cases:
        code, out, err = _main(
            monkeypatch,
            capsys,
            "admin",
            "verify-receipt",
            str(receipt_arg),
            str(key_arg),
        )
        assert code == 2, (receipt_arg, key_arg, err)
        assert message in err
        assert "Traceback" not in err + out and "INVALID" not in err


# -- 3. migrations from several processes at once ------------------------------

_MIGRATE = """
import sys, time
from pathlib import Path
from facefed.privacy.envelope import LocalKeyWrapper
from facefed.server.db import make_engine, run_migrations
from facefed.server.vault import KeyVault

url, vault_url, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
engine = make_engine(url)
run_migrations(engine)
KeyVault(vault_url, wrapper=LocalKeyWrapper(bytes(range(32)))).close()
engine.dispose()
"""


def test_processes_starting_together_on_a_fresh_database_all_migrate(
    settings, tmp_path
):
    from sqlalchemy import inspect

    from facefed.server.db import make_engine

    processes = 3
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _MIGRATE,
                settings.resolved_database_url,
                settings.resolved_key_vault_url,
                str(tmp_path / f"ready{index}"),
                str(go),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(processes)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(processes)):
        assert time.monotonic() < deadline, "migration processes never started"
        assert all(child.poll() is None for child in children)
        time.sleep(0.01)
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    engine = make_engine(settings.resolved_database_url)
    try:
        assert inspect(engine).has_table("audit_events")
    finally:
        engine.dispose()


# -- 4. audit-verify never creates a database ----------------------------------


def test_audit_verify_refuses_a_database_that_is_not_there(
    settings, monkeypatch, capsys
):
    _use(monkeypatch, settings)
    code, out, err = _main(monkeypatch, capsys, "admin", "audit-verify")
    assert code == 8, err
    assert "intact" not in out
    if settings.resolved_database_url.startswith("sqlite"):
        path = settings.home.parent / "server.db"
        assert str(path) in err.replace(" ", "")
        assert not path.exists()
    else:
        assert "no audit log" in err


def test_audit_verify_warns_when_the_log_is_empty(settings, monkeypatch, capsys):
    from facefed.server.db import make_engine, run_migrations

    engine = make_engine(settings.resolved_database_url)
    run_migrations(engine)
    engine.dispose()
    _use(monkeypatch, settings)
    code, out, err = _main(monkeypatch, capsys, "admin", "audit-verify")
    assert code == 0, err
    assert "0 event(s)" in out
    assert "WARNING" in err and "empty" in err


# -- 5. SQLite side files are private --------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_database_and_side_files_are_0600(settings):
    from facefed.server.service import GalleryService

    previous = os.umask(0o022)
    try:
        service = GalleryService(settings)
        service.start()
        try:
            service.create_api_key("cli", role="admin", site_id=None)
            files = [settings.home / "keyvault.db"]
            if settings.resolved_database_url.startswith("sqlite"):
                files.append(settings.home.parent / "server.db")
            for database in files:
                for name in ("", "-wal", "-shm"):
                    side = database.with_name(database.name + name)
                    assert side.exists(), side
                    assert _mode(side) == 0o600, (side, oct(_mode(side)))
        finally:
            service.close()
    finally:
        os.umask(previous)


def test_an_existing_world_readable_database_is_tightened(tmp_path):
    import sqlite3

    from sqlalchemy import text

    from facefed.server.db import make_engine

    path = tmp_path / "old.db"
    previous = os.umask(0o022)
    try:
        old = sqlite3.connect(path)
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("CREATE TABLE t (x INTEGER)")
        old.commit()
        assert _mode(path) == 0o644
        engine = make_engine(f"sqlite:///{path}")
        with engine.connect() as connection:
            connection.execute(text("SELECT count(*) FROM t"))
            for name in ("old.db", "old.db-wal", "old.db-shm"):
                assert _mode(tmp_path / name) == 0o600, name
        engine.dispose()
        old.close()
    finally:
        os.umask(previous)
