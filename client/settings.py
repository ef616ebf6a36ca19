"""Settings of a site agent, read from `FACEFED_*` environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """How a site agent reaches the gallery server and where it keeps its state.

    Attributes:
        server_url: Base URL of the facefed server (the `/v1` prefix is added).
        api_key: The site's API key; a secret, never printed or logged.
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
    """

    model_config = SettingsConfigDict(env_prefix="FACEFED_", extra="ignore")

    server_url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None
    site_dir: Path | None = None
    collection: str = "default"
    timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=20)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    ca_file: Path | None = None
    liveness: bool = True


@lru_cache(maxsize=1)
def get_client_settings() -> ClientSettings:
    """Return the process-wide site agent settings, read once from the environment."""
    return ClientSettings()
