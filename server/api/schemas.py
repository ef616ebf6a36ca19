"""Request and response models of the API (one family per resource)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from facefed.core.errors import ProtectionError, TemplateError
from facefed.privacy.templates import ProtectedTemplate

# The largest value an INTEGER column holds on every supported database
# (PostgreSQL's int4); a larger one would fail in the driver, not here.
MAX_DB_INT = 2**31 - 1

KeyVersion = Annotated[StrictInt, Field(ge=1, le=MAX_DB_INT)]


def has_nul(value: Any) -> bool:
    """Whether a string anywhere in `value` holds a NUL character.

    PostgreSQL text cannot store U+0000 (the driver raises), so it is refused
    at the edge, on every database alike.
    """
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(item) for item in value)
    return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if has_nul(value):
            raise ValueError("text may not contain NUL (U+0000) characters")
        return value


class TemplateWire(_Strict):
    """A protected template in the wire format of `privacy/templates.py`."""

    model_id: str = Field(max_length=128)
    scheme: str = Field(max_length=64)
    key_version: KeyVersion
    dim: StrictInt
    data: str = Field(description="base64: little-endian float32, or packed bits")

    def parse(self) -> ProtectedTemplate:
        """Validate fully with `ProtectedTemplate.from_wire`."""
        try:
            return ProtectedTemplate.from_wire(self.model_dump())
        except (TemplateError, ProtectionError):
            raise
        except ValueError as error:
            raise TemplateError(f"The template is invalid: {error}") from error


class ConsentCreate(_Strict):
    """The consent record an enrollment rests on (GDPR Art. 6, 7, 9)."""

    purpose: str = Field(min_length=3, max_length=500)
    lawful_basis: Literal[
        "consent",
        "contract",
        "legal_obligation",
        "vital_interests",
        "public_task",
        "legitimate_interests",
    ]
    consent_text_version: str = Field(min_length=1, max_length=64)
    given_at: datetime
    retention_days: int = Field(gt=0)


class ConsentPublic(BaseModel):
    """A stored consent record."""

    purpose: str
    lawful_basis: str
    consent_text_version: str
    given_at: str
    retention_days: int
    expires_at: str


class SubjectCreate(_Strict):
    """Enroll a subject: consent and one or more templates."""

    collection: str = Field(default="default", max_length=64)
    external_ref: str | None = Field(default=None, max_length=200)
    consent: ConsentCreate
    templates: list[TemplateWire] = Field(min_length=1, max_length=1000)


class SubjectEnrolled(BaseModel):
    """The enrollment answer; `subject_token` is shown only this once."""

    subject_id: str
    subject_token: str
    collection: str
    template_count: int
    consent_expires_at: str


class TemplatesCreate(_Strict):
    """Templates to add to an enrolled subject."""

    templates: list[TemplateWire] = Field(min_length=1, max_length=1000)


class TemplatesAdded(BaseModel):
    """How many templates the subject now holds."""

    subject_id: str
    template_count: int


class IdentifyRequest(_Strict):
    """A 1:N search."""

    collection: str = Field(default="default", max_length=64)
    template: TemplateWire
    top_k: int = Field(default=5, ge=1)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)


class CandidatePublic(BaseModel):
    """One candidate; `external_ref` only for the caller's own subjects."""

    subject_id: str
    score: float
    external_ref: str | None = None


class IdentifyPublic(BaseModel):
    """The answer to a 1:N search, best candidate first."""

    collection: str
    candidates: list[CandidatePublic]
    threshold: float
    match: CandidatePublic | None


class VerifyRequest(_Strict):
    """A 1:1 comparison against one subject."""

    subject_id: str = Field(max_length=64)
    template: TemplateWire
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)


class VerifyPublic(BaseModel):
    """The answer to a 1:1 comparison."""

    subject_id: str
    score: float
    threshold: float
    match: bool


class TemplateExport(BaseModel):
    """A template in an export: still protected by the scheme key."""

    template_id: str
    created_at: str
    protected: dict[str, Any]


class SiteRef(BaseModel):
    """The enrolling site."""

    id: str
    name: str | None


class SubjectExport(BaseModel):
    """Everything held about a subject (GDPR Art. 15)."""

    subject_id: str
    collection: str
    site: SiteRef
    external_ref: str | None
    enrolled_at: str
    consents: list[ConsentPublic]
    templates: list[TemplateExport]
    exported_at: str


class ErasureRemoved(BaseModel):
    """What an erasure removed."""

    templates: int
    consents: int
    index_entries: int
    data_key_destroyed: bool


class ErasureReceipt(BaseModel):
    """A signed erasure receipt (Ed25519 over the canonical JSON of the rest)."""

    receipt_id: str
    subject_id: str
    collection: str
    erased_at: str
    reason: str
    removed: ErasureRemoved
    signature: str


class PublicKeyPublic(BaseModel):
    """The receipt-signing public key."""

    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key_pem: str


class RefusalCreate(_Strict):
    """A capture the site refused (no image, no template, no subject)."""

    stage: str = Field(min_length=1, max_length=64)
    reasons: list[str] = Field(default_factory=list, max_length=10)


class Acknowledged(BaseModel):
    """An empty acknowledgement."""

    ok: bool = True


class HealthPublic(BaseModel):
    """Liveness of the service."""

    status: Literal["ok"] = "ok"
    collections: int
    templates: int


class SiteCreate(_Strict):
    """A new branch site."""

    name: str = Field(min_length=1, max_length=200)


class SitePublic(BaseModel):
    """A site."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    created_at: datetime
    disabled: bool


class ApiKeyCreate(_Strict):
    """A new API key."""

    role: Literal["admin", "site"]
    site_id: str | None = None
    name: str = Field(default="", max_length=200)


class ApiKeyPublic(BaseModel):
    """An API key's metadata (never the key)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    role: str
    site_id: str | None
    name: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    """A new API key; `key` is shown only this once."""

    key: str


class CollectionCreate(_Strict):
    """A new collection: one model, one protection scheme."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    model_id: str = Field(min_length=1, max_length=128)
    scheme: str = Field(max_length=64)
    dim: int = Field(gt=0, le=65536)


class AcceptedModelPublic(BaseModel):
    """A model promoted to a collection, with the compatibility measured for it."""

    model_config = ConfigDict(from_attributes=True)

    model_id: str
    parent_model_id: str
    promoted_at: datetime
    cross_accuracy: float | None
    parent_accuracy: float | None

    @field_validator("promoted_at", mode="after")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        # SQLite hands back naive datetimes; they were written in UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class CollectionPublic(BaseModel):
    """A collection.

    `model_id` is the model its first templates were made with;
    `serving_model_id` the one sites should embed with now (the latest
    promoted); templates of any model in `accepted_model_ids` are accepted.
    """

    id: str
    model_id: str
    serving_model_id: str
    accepted_model_ids: list[str]
    promoted: list[AcceptedModelPublic]
    scheme: str
    dim: int
    kind: str
    key_version: int
    templates: int

    @classmethod
    def of(cls, row: Any, templates: int) -> CollectionPublic:
        """From a `server.db.Collection` row (promoted models loaded)."""
        return cls(
            id=row.id,
            model_id=row.model_id,
            serving_model_id=row.serving_model_id,
            accepted_model_ids=row.accepted_model_ids,
            promoted=[AcceptedModelPublic.model_validate(m) for m in row.promoted],
            scheme=row.scheme,
            dim=row.dim,
            kind=row.kind,
            key_version=row.key_version,
            templates=templates,
        )


class ProtectionKeyCreate(_Strict):
    """A new key version; `secret` (base64) when made offline, else generated."""

    scheme: str = Field(max_length=64)
    secret: str | None = Field(default=None, max_length=1024)


class ProtectionKeyPublic(BaseModel):
    """A protection key's metadata (never the secret)."""

    model_config = ConfigDict(from_attributes=True)

    scheme: str
    version: int
    created_at: datetime
    retired_at: datetime | None


class ProtectionKeySecret(BaseModel):
    """A protection key as handed to a site (`ProtectionKey.to_dict` form)."""

    scheme: str
    version: int
    secret: str


class RotationCreate(_Strict):
    """Move a collection to a newer key version."""

    to_version: KeyVersion
    transform: dict[str, Any] | None = Field(
        default=None,
        description="`privacy.rotation.RotationTransform.to_wire()` (scheme, "
        "from_version, to_version, dim, base64 float64 matrix T with new = T old); "
        "needed by re-keyable schemes, never a key",
    )


class RotationPublic(BaseModel):
    """What a rotation did."""

    collection: str
    scheme: str
    from_version: int
    to_version: int
    rekeyed_templates: int
    reenroll_subjects: list[str]


class AuditEventPublic(BaseModel):
    """One audit event."""

    model_config = ConfigDict(from_attributes=True)

    seq: int
    event_id: str
    at: str
    action: str
    actor: str
    site_id: str | None
    outcome: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class AuditVerifyPublic(BaseModel):
    """Result of checking the audit chain."""

    ok: bool
    events: int
    problems: list[str]


class PurgePublic(BaseModel):
    """How many subjects a purge erased."""

    erased: int
