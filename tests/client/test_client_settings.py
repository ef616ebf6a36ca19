"""Bad site agent settings and setup mistakes give clear errors, not tracebacks."""

import httpx
import pytest

from facefed.client.gallery import GalleryClient
from facefed.client.launcher import free_port
from facefed.client.settings import ClientSettings, get_client_settings
from facefed.core.errors import (
    ConfigurationError,
    NotFoundError,
    PermissionDeniedError,
    ServiceError,
)


@pytest.fixture
def fresh_settings():
    get_client_settings.cache_clear()
    yield get_client_settings
    get_client_settings.cache_clear()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FACEFED_TIMEOUT_S", "abc"),
        ("FACEFED_MAX_ATTEMPTS", "abc"),
        ("FACEFED_MAX_ATTEMPTS", "0"),
        ("FACEFED_SERVER_URL", "127.0.0.1:8000"),
        ("FACEFED_SERVER_URL", "ftp://127.0.0.1"),
    ],
)
def test_an_invalid_variable_is_named_without_its_value(
    monkeypatch, fresh_settings, variable, value
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        fresh_settings()
    message = str(caught.value)
    assert variable in message
    assert value not in message


def test_an_empty_key_file_variable_means_no_key_file(monkeypatch, fresh_settings):
    monkeypatch.setenv("FACEFED_API_KEY_FILE", "")
    monkeypatch.delenv("FACEFED_API_KEY", raising=False)
    settings = fresh_settings()
    assert settings.api_key_file is None
    assert settings.resolved_api_key() is None


def _refusal(settings: ClientSettings, http: httpx.Client | None = None) -> str:
    """The error message of the site agent's first request (a key-service fetch)."""
    with GalleryClient.from_settings(settings, http=http) as client:
        try:
            client.protection_key()
        except (ServiceError, PermissionDeniedError, NotFoundError) as error:
            return str(error)
    raise AssertionError("the request was expected to fail")


def test_cannot_connect_names_the_url_and_the_setting():
    url = f"http://127.0.0.1:{free_port()}"
    message = _refusal(ClientSettings(server_url=url, max_attempts=1, api_key="k"))
    assert url in message
    assert "FACEFED_SERVER_URL" in message


def _answering(status: int, message: str) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": "x", "message": message}})

    return httpx.Client(
        base_url="http://127.0.0.1/v1", transport=httpx.MockTransport(handler)
    )


def test_a_401_without_a_key_says_which_setting_to_set():
    settings = ClientSettings(server_url="http://127.0.0.1", max_attempts=1)
    message = _refusal(settings, _answering(401, "Missing API key."))
    assert "HTTP 401" in message
    assert "FACEFED_API_KEY_FILE" in message


def test_a_401_with_a_key_does_not_blame_the_setting():
    settings = ClientSettings(server_url="http://127.0.0.1", api_key="wrong")
    message = _refusal(settings, _answering(401, "Unknown API key."))
    assert "HTTP 401" in message
    assert "FACEFED_API_KEY_FILE" not in message


def test_a_missing_collection_says_an_admin_must_create_it():
    settings = ClientSettings(
        server_url="http://127.0.0.1", api_key="k", collection="faces"
    )
    message = _refusal(settings, _answering(404, "There is no collection 'faces'."))
    assert "HTTP 404" in message
    assert "'faces'" in message
    assert "admin must create" in message
