"""A site embeds with its collection's serving model, or the one it pins.

The end-to-end test runs a real `facefed serve` and the real `facefed site`
commands; the "fine-tuned" model is dlib's ONNX registered under a
facefed-ft id in the site's model folder (what `facefed runs register`
does), so the template's model id shows which model the site used.
"""

import base64
import dataclasses
import json
import secrets
import shutil

import pytest
from typer.testing import CliRunner

from facefed.client.gallery import CollectionModels
from facefed.client.site_model import SERVING, choose_model, load_site_embedder
from facefed.core.errors import ConfigurationError

FINE_TUNED = "facefed-ft-0123456789ab"
MISSING = "facefed-ft-ba9876543210"


@pytest.fixture
def model_folder(tmp_path, monkeypatch):
    """A site model folder with dlib's export and FINE_TUNED registered."""
    from facefed.core.embedding import load_metadata
    from facefed.core.settings import get_core_settings
    from facefed.models.registry import ModelRegistry
    from facefed.models.zoo import ensure_dlib_resnet_onnx

    shipped = ensure_dlib_resnet_onnx()  # the session's cache, exported once
    dlib = load_metadata(shipped)
    folder = tmp_path / "site-models"
    folder.mkdir()
    shutil.copy(shipped, folder / shipped.name)
    shutil.copy(shipped.with_name(dlib.onnx_file), folder / dlib.onnx_file)
    monkeypatch.setenv("FACEFED_MODEL_CACHE", str(folder))
    get_core_settings.cache_clear()
    fine_tuned = dataclasses.replace(dlib, model_id=FINE_TUNED, parent_id=dlib.model_id)
    ModelRegistry(folder).register_onnx(folder / dlib.onnx_file, fine_tuned)
    yield dlib.model_id
    get_core_settings.cache_clear()


def _models(serving: str, *accepted: str) -> CollectionModels:
    return CollectionModels(serving_model_id=serving, accepted_model_ids=accepted)


def test_serving_follows_the_collections_latest_promoted_model():
    models = _models(FINE_TUNED, "dlib-resnet-v1-x", FINE_TUNED)
    assert choose_model(SERVING, models, collection="lab") == FINE_TUNED
    assert choose_model("dlib-resnet-v1-x", models, collection="lab") == (
        "dlib-resnet-v1-x"
    )


def test_a_model_the_collection_does_not_accept_is_refused():
    models = _models(FINE_TUNED, FINE_TUNED)
    with pytest.raises(ConfigurationError) as refused:
        choose_model("dlib-resnet-v1-x", models, collection="lab")
    message = str(refused.value)
    assert "Collection 'lab' does not accept templates of model 'dlib-resnet-v1-x'" in (
        message
    )
    assert f"it serves {FINE_TUNED}" in message


def test_the_site_opens_dlib_or_a_registered_version(model_folder):
    dlib_id = model_folder
    assert load_site_embedder(dlib_id).metadata.model_id == dlib_id
    embedder = load_site_embedder(FINE_TUNED)
    assert embedder.metadata.model_id == FINE_TUNED
    assert embedder.metadata.parent_id == dlib_id
    with pytest.raises(ConfigurationError) as refused:
        load_site_embedder(MISSING)
    message = str(refused.value)
    assert f"{MISSING} is not registered at this site" in message
    assert f"facefed runs register {MISSING}" in message


def test_the_setting_defaults_to_the_serving_model(monkeypatch):
    from facefed.client.settings import ClientSettings

    monkeypatch.delenv("FACEFED_EMBEDDING_MODEL", raising=False)
    assert ClientSettings().embedding_model == SERVING
    monkeypatch.setenv("FACEFED_EMBEDDING_MODEL", "  ")
    assert ClientSettings().embedding_model == SERVING
    monkeypatch.setenv("FACEFED_EMBEDDING_MODEL", FINE_TUNED)
    assert ClientSettings().embedding_model == FINE_TUNED


@pytest.fixture
def server(tmp_path):
    from facefed.client.launcher import ServerProcess, create_key_with_cli

    home = tmp_path / "server-home"
    home.mkdir()
    key_file = home / "master.key"
    key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    env = {
        "FACEFED_HOME": str(home),
        "FACEFED_DATABASE_URL": f"sqlite:///{tmp_path / 'server.db'}",
        "FACEFED_KEY_VAULT_URL": f"sqlite:///{tmp_path / 'vault.db'}",
        "FACEFED_MASTER_KEY_FILE": str(key_file),
    }
    with ServerProcess(env=env, log_file=tmp_path / "server.log") as process:
        process.admin_key = create_key_with_cli(env, role="admin", name="models")
        yield process


@pytest.mark.slow
def test_site_commands_embed_with_the_serving_or_the_pinned_model(
    server, model_folder, tmp_path, monkeypatch, test_data
):
    from facefed.client.admin import AdminClient
    from facefed.client.commands import site_app
    from facefed.client.gallery import GalleryClient
    from facefed.client.settings import ClientSettings, get_client_settings

    dlib_id = model_folder
    settings = ClientSettings(server_url=server.url, max_attempts=1)
    with AdminClient.connect(api_key=server.admin_key, settings=settings) as admin:
        admin.create_protection_key("orthonormal-v1")
        for name, model_id in (
            ("lab", FINE_TUNED),
            ("legacy", dlib_id),
            ("next", MISSING),
        ):
            admin.create_collection(
                name, model_id=model_id, scheme="orthonormal-v1", dim=128
            )
        site_key = admin.register_site("north").api_key
    monkeypatch.setenv("FACEFED_SERVER_URL", server.url)
    monkeypatch.setenv("FACEFED_API_KEY", site_key)
    monkeypatch.setenv("FACEFED_SITE_DIR", str(tmp_path / "site"))
    monkeypatch.setenv("FACEFED_LIVENESS", "false")
    monkeypatch.setenv("FACEFED_MAX_ATTEMPTS", "1")
    consent = tmp_path / "consent.json"
    consent.write_text(
        json.dumps(
            {
                "purpose": "Building access",
                "lawful_basis": "consent",
                "consent_text_version": "v1",
                "retention_days": 30,
            }
        )
    )
    photos = sorted(str(p) for p in (test_data / "lfw" / "Ann_Veneman").glob("*.jpg"))

    def site(collection: str, *args: str):
        monkeypatch.setenv("FACEFED_COLLECTION", collection)
        get_client_settings.cache_clear()
        return CliRunner().invoke(site_app, list(args))

    def enroll(collection: str, ref: str, *extra: str):
        receipt = tmp_path / f"{ref}.json"
        result = site(
            collection,
            "enroll",
            *photos[:2],
            "--subject-ref",
            ref,
            "--consent",
            str(consent),
            "--skip-unusable",
            "--receipt-out",
            str(receipt),
            *extra,
        )
        return result, receipt

    def template_models(receipt) -> set[str]:
        body = json.loads(receipt.read_text())
        with GalleryClient.from_settings(settings, anonymous=True) as subject:
            exported = subject.export(
                body["subject_id"], subject_token=body["subject_token"]
            )
        return {t["protected"]["model_id"] for t in exported["templates"]}

    # By default a site embeds with the collection's serving model.
    result, receipt = enroll("lab", "alice")
    assert result.exit_code == 0, result.output
    assert template_models(receipt) == {FINE_TUNED}
    result, receipt = enroll("legacy", "bob")
    assert result.exit_code == 0, result.output
    assert template_models(receipt) == {dlib_id}

    # A pinned model must be one the collection accepts; nothing is sent.
    result, _ = enroll("lab", "carol", "--model", dlib_id)
    assert isinstance(result.exception, ConfigurationError)
    assert f"does not accept templates of model '{dlib_id}'" in str(result.exception)

    # A serving model this site has not registered is named, with the fix.
    result, _ = enroll("next", "dave")
    assert isinstance(result.exception, ConfigurationError)
    assert f"facefed runs register {MISSING}" in str(result.exception)

    # Probes use the chosen model too: the serving model finds alice.
    result = site("lab", "identify", photos[2])
    assert result.exit_code == 0, result.output
    assert "match:" in result.output
    result = site("lab", "identify", photos[2], "--model", dlib_id)
    assert isinstance(result.exception, ConfigurationError)
