"""Settings of the central server, read from `FACEFED_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from facefed.core.errors import ConfigurationError
from facefed.core.settings import describe_invalid_settings, get_core_settings


class ServerSettings(BaseSettings):
    """Settings of `facefed serve` and `facefed admin`.

    Attributes:
        database_url: SQLAlchemy URL; empty means SQLite at `home/server.db`.
        key_vault_url: SQLAlchemy URL of the key vault holding the wrapped
            per-subject data keys, kept apart from the main database so that
            its backups cannot decrypt templates; empty means SQLite at
            `home/keyvault.db`.
        dev_mode: Development mode: a missing master key is generated into the
            home folder (with a WARNING) instead of refusing to start.
        master_key: The master key as base64 (prefer `master_key_file`).
        master_key_file: File holding the master key as base64.
        host: Address `facefed serve` listens on.
        port: Port `facefed serve` listens on.
        max_body_bytes: Requests with a larger body are refused with 413.
        max_top_k: Largest `top_k` a 1:N search may ask for.
        max_templates_per_subject: Templates one subject may hold.
        max_ciphertext_bytes: Largest CKKS public context or probe accepted.
        match_threshold: Default decision threshold for identify and verify
            when a request gives none, on the cosine scale (binary templates
            score cos(pi * hamming / bits), the same scale). The default
            suits dlib's ResNet descriptors on the unit sphere, whose cosines
            are compressed: on the test LFW photos the 99.9th percentile of
            impostor scores is 0.924 and the median genuine score 0.95.
        ivf_min_size: A float collection switches from the exact index to IVF
            once it holds this many templates.
        ivf_nlist: IVF cells (Faiss `nlist`).
        ivf_nprobe: IVF cells visited per search (Faiss `nprobe`).
        use_gpu: Put float indexes on the GPU when faiss-gpu and a GPU exist.
        purge_interval_s: Seconds between background purges of expired
            consents; 0 disables the task.
        retention_days_max: Longest retention period a consent may ask for.
    """

    model_config = SettingsConfigDict(env_prefix="FACEFED_", extra="ignore")

    home: Path = Field(default_factory=lambda: get_core_settings().home)
    database_url: str = ""
    key_vault_url: str = ""
    dev_mode: bool = False
    master_key: str | None = Field(default=None, repr=False)
    master_key_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_top_k: int = Field(default=100, gt=0)
    max_templates_per_subject: int = Field(default=20, gt=0)
    max_ciphertext_bytes: int = Field(default=128 * 1024 * 1024, gt=0)
    match_threshold: float = Field(default=0.92, ge=-1.0, le=1.0)
    ivf_min_size: int = Field(default=200_000, gt=0)
    ivf_nlist: int = Field(default=1024, gt=0)
    ivf_nprobe: int = Field(default=64, gt=0)
    use_gpu: bool = True
    purge_interval_s: float = Field(default=3600.0, ge=0.0)
    retention_days_max: int = Field(default=3650, gt=0)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the home folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'server.db'}"

    @property
    def resolved_key_vault_url(self) -> str:
        """The key vault URL, defaulting to a SQLite file in the home folder."""
        if self.key_vault_url:
            return self.key_vault_url
        return f"sqlite:///{self.home / 'keyvault.db'}"

    @property
    def dev_master_key_file(self) -> Path:
        """Where development mode keeps its generated master key."""
        return self.home / "master.key"


def get_server_settings() -> ServerSettings:
    """Return server settings read from the environment now (never cached).

    Raises:
        ConfigurationError: When a `FACEFED_*` variable holds an invalid value;
            the message names the variable but never its value, since some of
            them hold secrets (`FACEFED_MASTER_KEY`).
    """
    try:
        return ServerSettings()
    except ValidationError as invalid:
        raise ConfigurationError(describe_invalid_settings(invalid)) from None
