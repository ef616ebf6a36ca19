"""Settings of the face pipeline, read from `FACEFED_*` environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from facefed.core.errors import ConfigurationError


class CoreSettings(BaseSettings):
    """Settings every part of facefed shares.

    Attributes:
        home: Folder for caches, exported models and local state.
        max_image_pixels: Images with more pixels are refused before decoding.
        max_image_bytes: Encoded images larger than this are refused.
        detector: Default detector spec (see `facefed detect --help`).
        threads: Threads for onnxruntime and torch; 0 lets them decide.
        model_cache: Folder for models exported at first use (the ONNX form of
            the embedding network); defaults to `home/models`.
    """

    model_config = SettingsConfigDict(env_prefix="FACEFED_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".facefed")
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_image_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    detector: str = "yunet"
    threads: int = Field(default=0, ge=0)
    model_cache: Path | None = None

    @property
    def model_dir(self) -> Path:
        """Folder holding exported and user-supplied model files."""
        return self.model_cache or self.home / "models"


@lru_cache(maxsize=1)
def get_core_settings() -> CoreSettings:
    """Return the process-wide core settings, read once from the environment.

    Raises:
        ConfigurationError: When a `FACEFED_*` variable holds an invalid value.
    """
    try:
        return CoreSettings()
    except ValidationError as invalid:
        raise ConfigurationError(describe_invalid_settings(invalid)) from None


def describe_invalid_settings(invalid: ValidationError) -> str:
    """Return a sentence naming each invalid `FACEFED_*` variable, never its value.

    Args:
        invalid: The error pydantic-settings raised while reading the environment.

    Returns:
        "Invalid setting: FACEFED_X: <reason>; ...", safe to print even when the
        variable holds a secret.
    """
    problems = [
        f"FACEFED_{'_'.join(str(part) for part in error['loc']).upper()}: "
        f"{error['msg']}"
        for error in invalid.errors()
    ]
    return "Invalid setting: " + "; ".join(problems) + "."
