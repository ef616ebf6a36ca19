"""Settings of presentation attack detection, read from `FACEFED_LIVENESS_*`."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from facefed.core.errors import ConfigurationError

ExecutionMode = Literal["auto", "cpu", "cuda"]


class LivenessSettings(BaseSettings):
    """Settings of the liveness checks.

    Attributes:
        threshold: Fused score at or above which a face is accepted as live;
            None uses the calibrated default (`silent.CALIBRATED_THRESHOLD`).
        device: Where onnxruntime runs MiniFASNet: `auto` takes CUDA when
            onnxruntime offers it, else the CPU.
        challenge_key: Key that signs interactive challenges (HMAC-SHA256). When
            unset, `facefed liveness challenge` keeps a random key in
            `home/liveness/challenge.key` (created with mode 0600).
        challenge_ttl_s: Seconds a challenge stays valid after it is issued.
        nonce_store: File of used challenge nonces; defaults to
            `home/liveness/used_nonces.json`.
    """

    model_config = SettingsConfigDict(env_prefix="FACEFED_LIVENESS_", extra="ignore")

    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    device: ExecutionMode = "auto"
    challenge_key: SecretStr | None = None
    challenge_ttl_s: int = Field(default=120, gt=0, le=3600)
    nonce_store: Path | None = None


@lru_cache(maxsize=1)
def get_liveness_settings() -> LivenessSettings:
    """Return the process-wide liveness settings, read once from the environment.

    Raises:
        ConfigurationError: A `FACEFED_LIVENESS_*` variable holds a bad value;
            the message names the variable and what it must be.
    """
    try:
        return LivenessSettings()
    except ValidationError as error:
        problems = "; ".join(
            f"FACEFED_LIVENESS_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
            for e in error.errors()
        )
        raise ConfigurationError(f"Invalid liveness setting: {problems}.") from None
