"""Consent records a site attaches to every enrollment (GDPR Art. 6, 7 and 9).

Biometric data used to identify a person is a special category of personal
data (GDPR Art. 9(1)); a site enrolls a person on the lawful basis it records
here, usually explicit consent (Art. 9(2)(a)), for one stated purpose, and
keeps the template no longer than the retention period (Art. 5(1)(e)).
"""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from facefed.core.errors import ConfigurationError

LawfulBasis = Literal[
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
]


class ConsentRecord(BaseModel):
    """What the data subject agreed to, as the site recorded it.

    Attributes:
        purpose: What the template is used for, in plain words.
        lawful_basis: GDPR Art. 6(1) basis; biometric identification normally
            also needs explicit consent under Art. 9(2)(a).
        consent_text_version: Version of the consent text the subject read.
        given_at: When consent was given (timezone-aware; UTC if none given).
        retention_days: Days the template may be kept after `given_at`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    purpose: str = Field(min_length=3, max_length=500)
    lawful_basis: LawfulBasis
    consent_text_version: str = Field(min_length=1, max_length=100)
    given_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    retention_days: int = Field(gt=0, le=3650)

    @field_validator("given_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def to_wire(self) -> dict[str, object]:
        """The record as the server's enrollment body expects it."""
        return {
            "purpose": self.purpose,
            "lawful_basis": self.lawful_basis,
            "consent_text_version": self.consent_text_version,
            "given_at": self.given_at.isoformat(),
            "retention_days": self.retention_days,
        }


def load_consent(path: Path) -> ConsentRecord:
    """Read a consent record from a JSON or YAML file.

    Args:
        path: A `.json`, `.yaml` or `.yml` file holding one record.

    Returns:
        The validated record.

    Raises:
        ConfigurationError: The file is missing, unreadable, or not a valid record.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(
            f"Cannot read the consent file {path}: {error}."
        ) from error
    import yaml  # only needed here; keeps importing this module cheap

    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigurationError(
            f"The consent file {path} is not valid: {error}."
        ) from error
    if not isinstance(raw, dict):
        raise ConfigurationError(
            f"The consent file {path} must hold one mapping, got {type(raw).__name__}."
        )
    try:
        return ConsentRecord.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}"
            for issue in error.errors()
        )
        raise ConfigurationError(
            f"The consent file {path} is not a valid consent record: {problems}."
        ) from error
