"""Settings of a site agent, read from `FACEFED_*` environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from facefed.core.errors import ConfigurationError
from facefed.core.settings import describe_invalid_settings, get_core_settings


class ClientSettings(BaseSettings):
    """How a site agent reaches the gallery server and where it keeps its state.

    Attributes:
        server_url: Base URL of the facefed server (the `/v1` prefix is added).
        api_key: The site's API key; a secret, never printed or logged.
        api_key_file: File holding the API key (preferred over `api_key` where
            secrets are mounted as files, as in Kubernetes).
        site_dir: Folder of this site's local state (config, receipts, training
            data); defaults to `FACEFED_HOME/site`.
        collection: Gallery collection the site enrolls into and searches.
        timeout_s: Timeout of one HTTP request, in seconds.
        max_attempts: Attempts per request when the server is unreachable or
            answers 5xx (1 turns retries off).
        backoff_base_s: First retry waits up to this long (full jitter), doubling
            each attempt.
        backoff_max_s: Upper bound of one wait between attempts.
        ca_file: CA bundle used to check the server's TLS certificate; the
            system store when unset.
        liveness: Run the silent liveness check at enrollment and matching.
        embedding_model: The model the site embeds with: `serving` (the
            collection's serving model, asked of the server each time), or a
            model id the collection accepts, registered in the site's model
            folder (see `facefed.client.site_model`).
    """

    model_config = SettingsConfigDict(env_prefix="FACEFED_", extra="ignore")

    server_url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    site_dir: Path | None = None
    collection: str = "default"
    timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=20)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    ca_file: Path | None = None
    liveness: bool = True
    embedding_model: str = Field(default="serving", min_length=1, max_length=128)

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Refused at once: a URL without a scheme would otherwise only fail
        # at connection time, after every retry.
        if not value.startswith(("http://", "https://")):
            raise ValueError("the server URL must start with http:// or https://")
        return value

    @field_validator("embedding_model", mode="before")
    @classmethod
    def _blank_model_is_serving(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return "serving"
        return value.strip() if isinstance(value, str) else value

    @field_validator("api_key_file", "site_dir", "ca_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        # `FACEFED_API_KEY_FILE=` would otherwise become Path("."), a folder.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    def resolved_api_key(self) -> str | None:
        """The API key from `api_key_file` when set, else from `api_key`.

        Raises:
            ConfigurationError: The key file cannot be read or is empty.
        """
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ConfigurationError(
                    f"Cannot read the API key file {self.api_key_file}: {error}."
                ) from error
            if not key:
                raise ConfigurationError(
                    f"The API key file {self.api_key_file} is empty."
                )
            return key
        return self.api_key.get_secret_value() if self.api_key else None

    @property
    def resolved_site_dir(self) -> Path:
        """The site folder, defaulting to `FACEFED_HOME/site`."""
        return self.site_dir or get_core_settings().home / "site"


@lru_cache(maxsize=1)
def get_client_settings() -> ClientSettings:
    """Return the process-wide site agent settings, read once from the environment.

    Raises:
        ConfigurationError: A `FACEFED_*` variable holds an invalid value (the
            message names the variable, not the value, which may be a secret).
    """
    try:
        return ClientSettings()
    except ValidationError as invalid:
        raise ConfigurationError(describe_invalid_settings(invalid)) from None
