"""`facefed site enroll` refuses a subject ref the site already enrolled."""

import json
import shutil
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from facefed.client.commands import site_app
from facefed.client.registry import SiteRegistry
from facefed.client.settings import get_client_settings
from facefed.core.errors import ConfigurationError, ConflictError


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    monkeypatch.setenv("FACEFED_SITE_DIR", str(folder))
    get_client_settings.cache_clear()
    yield folder
    get_client_settings.cache_clear()


def test_the_registry_finds_a_subject_by_its_ref(tmp_path):
    registry = SiteRegistry(tmp_path)
    registry.record("s1", "alice")
    registry.record("s2", "bob")
    assert registry.subject_of("bob") == "s2"
    assert registry.subject_of("carol") is None
    registry.remove("s2")
    assert registry.subject_of("bob") is None


def test_a_second_enrollment_of_a_ref_is_refused_before_anything_runs(
    site_dir, tmp_path, test_data
):
    SiteRegistry(site_dir).record("subject-1", "alice")
    before = (site_dir / "enrolled.json").read_text()
    consent = tmp_path / "consent.json"
    consent.write_text(json.dumps({"purpose": "Entrance access"}))
    photo = test_data / "lfw" / "Ann_Veneman" / "Ann_Veneman_0001.jpg"
    result = CliRunner().invoke(
        site_app,
        ["enroll", str(photo), "--subject-ref", "alice", "--consent", str(consent)],
    )
    assert isinstance(result.exception, ConflictError)
    message = str(result.exception)
    assert "'alice'" in message
    assert "--subject subject-1" in message
    assert (site_dir / "enrolled.json").read_text() == before


def test_a_new_enrollment_needs_a_ref_and_consent(site_dir, test_data):
    photo = test_data / "lfw" / "Ann_Veneman" / "Ann_Veneman_0001.jpg"
    result = CliRunner().invoke(site_app, ["enroll", str(photo)])
    assert isinstance(result.exception, ConfigurationError)
    assert "--subject-ref" in str(result.exception)


def test_a_subject_erased_on_the_server_is_dropped_locally(site_dir, test_data):
    from facefed.client.commands import _forget_erased
    from facefed.client.federated.store import SiteDataStore

    training = site_dir / "training"
    source = test_data / "lfw" / "Ann_Veneman"
    shutil.copytree(source, training / "Ann_Veneman")
    registry = SiteRegistry(site_dir)
    registry.record("subject-1", "Ann_Veneman")
    registry.record("subject-2", "bob")
    store = SiteDataStore(training, min_photos_per_identity=1)
    _forget_erased(SimpleNamespace(data_store=store), "subject-1")
    assert registry.ref_of("subject-1") is None
    assert registry.ref_of("subject-2") == "bob"
    assert "Ann_Veneman" in store.erased()
