"""Envelope encryption, master-key handling and crypto-shredding of erased subjects."""

import shutil
import stat

import numpy as np
import pytest
from conftest import (
    bootstrap_admin,
    enroll_site_subject,
    make_app,
    setup_world,
    unit_vectors,
)
from fastapi.testclient import TestClient

from facefed.core.errors import ConfigurationError
from facefed.privacy.envelope import (
    DecryptionError,
    LocalKeyWrapper,
    generate_data_key,
    load_or_create_master_key,
    open_sealed,
    seal,
)


def test_seal_round_trip_and_tamper_detection():
    key = generate_data_key()
    sealed = seal(key, b"protected template bytes", associated_data=b"ctx")
    assert (
        open_sealed(key, sealed, associated_data=b"ctx") == b"protected template bytes"
    )
    assert b"protected" not in sealed
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        open_sealed(key, bytes(tampered), associated_data=b"ctx")
    with pytest.raises(DecryptionError):
        open_sealed(key, sealed, associated_data=b"another row")
    with pytest.raises(DecryptionError):
        open_sealed(generate_data_key(), sealed, associated_data=b"ctx")


def test_wrapped_key_needs_the_master_key():
    data_key = generate_data_key()
    wrapper = LocalKeyWrapper(generate_data_key())
    wrapped = wrapper.wrap(data_key, context=b"subject|1")
    assert wrapper.unwrap(wrapped, context=b"subject|1") == data_key
    with pytest.raises(DecryptionError):
        LocalKeyWrapper(generate_data_key()).unwrap(wrapped, context=b"subject|1")


def test_master_key_refused_outside_dev_mode_and_generated_in_dev_mode(
    tmp_path, caplog
):
    target = tmp_path / "master.key"
    with pytest.raises(ConfigurationError, match="No master key"):
        load_or_create_master_key(
            key_text=None, key_file=None, dev_file=target, development=False
        )
    assert not target.exists()
    key = load_or_create_master_key(
        key_text=None, key_file=None, dev_file=target, development=True
    )
    assert len(key) == 32
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "Development mode" in caplog.text
    again = load_or_create_master_key(
        key_text=None, key_file=None, dev_file=target, development=True
    )
    assert again == key


def test_server_refuses_to_start_without_master_key(tmp_path):
    from facefed.server.service import GalleryService
    from facefed.server.settings import ServerSettings

    settings = ServerSettings(
        home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db'}"
    )
    with pytest.raises(ConfigurationError):
        GalleryService(settings)


def _stored_templates(url: str) -> list[tuple[str, int, bytes]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT subject_id, id, ciphertext FROM templates")
        )
        result = [(row[0], row[1], bytes(row[2])) for row in rows]
    engine.dispose()
    return result


def test_backup_copy_is_unreadable_after_erasure(settings, tmp_path):
    """Crypto-shredding: a DB copy made before erasure cannot be decrypted after."""
    from facefed.server.vault import KeyVault

    admin = bootstrap_admin(settings)
    with TestClient(make_app(settings)) as client:
        world = setup_world(client, admin)
        vector = unit_vectors(np.random.default_rng(7), 1)[0]
        enrolled = enroll_site_subject(client, world, vector).json()
        url = settings.resolved_database_url
        if url.startswith("sqlite"):
            # A file copy of the database, as a backup tool would make it.
            backup = tmp_path / "backup.db"
            client.app.state.service.engine.dispose()
            shutil.copy(url.removeprefix("sqlite:///"), backup)
            dump = _stored_templates(f"sqlite:///{backup}")
        else:
            # A logical dump of the templates table (what pg_dump would keep).
            dump = _stored_templates(url)
        wrapper = client.app.state.service.wrapper
        vault = KeyVault(settings.resolved_key_vault_url, wrapper=wrapper)
        ((subject_id, template_id, sealed),) = dump
        context = f"template|{subject_id}|{template_id}".encode()
        # Before erasure the backup decrypts with the vault's key.
        before = open_sealed(vault.get(subject_id), sealed, associated_data=context)
        assert np.frombuffer(before, dtype=np.float32).shape == (128,)

        erased = client.delete(
            f"/v1/subjects/{enrolled['subject_id']}", headers=world.auth(world.site_key)
        )
        assert erased.status_code == 200

        # The backup still holds the ciphertext, but its key is gone for good.
        assert _stored_templates(url) == []
        with pytest.raises(DecryptionError, match="erased"):
            vault.get(subject_id)
        assert subject_id not in vault.subject_ids()
        vault.close()
