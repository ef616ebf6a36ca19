"""Consent files: JSON or YAML in, a validated record out, clear errors otherwise."""

import json
from datetime import UTC, datetime

import pytest

from facefed.client.consent import ConsentRecord, load_consent
from facefed.client.registry import SiteRegistry
from facefed.core.errors import ConfigurationError

RECORD = {
    "purpose": "Staff entrance access control",
    "lawful_basis": "consent",
    "consent_text_version": "2026-03",
    "given_at": "2026-03-01T09:30:00",
    "retention_days": 365,
}


def test_a_json_file_gives_a_record_in_utc(tmp_path):
    path = tmp_path / "consent.json"
    path.write_text(json.dumps(RECORD))
    record = load_consent(path)
    assert record.given_at == datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    assert record.to_wire() == {**RECORD, "given_at": "2026-03-01T09:30:00+00:00"}


def test_a_yaml_file_gives_the_same_record(tmp_path):
    path = tmp_path / "consent.yaml"
    path.write_text("\n".join(f"{key}: {value!s}" for key, value in RECORD.items()))
    assert load_consent(path) == ConsentRecord.model_validate(RECORD)


def test_the_time_defaults_to_now(tmp_path):
    path = tmp_path / "consent.json"
    path.write_text(json.dumps({k: v for k, v in RECORD.items() if k != "given_at"}))
    before = datetime.now(UTC)
    given_at = load_consent(path).given_at
    assert before <= given_at <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lawful_basis": "because"}, "lawful_basis"),
        ({"retention_days": 0}, "retention_days"),
        ({"purpose": ""}, "purpose"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_bad_record_is_refused_naming_the_field(tmp_path, change, named):
    path = tmp_path / "consent.json"
    path.write_text(json.dumps({**RECORD, **change}))
    with pytest.raises(ConfigurationError, match=named):
        load_consent(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_a_file_that_is_not_one_mapping_is_refused(tmp_path, text):
    path = tmp_path / "consent.json"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=r"consent\.json"):
        load_consent(path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="Cannot read"):
        load_consent(tmp_path / "nope.yaml")


def test_the_site_registry_maps_ids_to_refs_across_instances(tmp_path):
    SiteRegistry(tmp_path / "site").record("s-1", "alice")
    registry = SiteRegistry(tmp_path / "site")
    registry.record("s-2", "bob")
    assert registry.ref_of("s-1") == "alice" and len(registry) == 2
    registry.remove("s-1")
    assert SiteRegistry(tmp_path / "site").ref_of("s-1") is None
    assert "token" not in (tmp_path / "site" / "enrolled.json").read_text()
