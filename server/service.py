"""The server's data layer: enrollment, matching, subject rights, keys, audit.

Everything here returns plain values and raises `facefed.core.errors`
subclasses; the HTTP mapping lives in `server/api/` only.

Write order keeps the database the source of truth (see `gallery.py`):
database commit, then index add; index remove, then key destruction, then
database delete. `reconcile` repairs what a crash left half done.

FIXME: each process holds its own Faiss index, rebuilt from the database at
start-up only; several API replicas on one PostgreSQL database would each
miss the others' enrollments and erasures until restarted. Run one replica,
or add change notification (e.g. PostgreSQL LISTEN/NOTIFY) before scaling out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from facefed.core.errors import (
    ConfigurationError,
    ConflictError,
    FacefedError,
    GoneError,
    NotFoundError,
    PermissionDeniedError,
    ProtectionError,
    TemplateError,
)
from facefed.privacy.envelope import (
    DecryptionError,
    KeyWrapper,
    LocalKeyWrapper,
    load_or_create_master_key,
    open_sealed,
    seal,
)
from facefed.privacy.protection import ProtectionKey, generate_key, get_scheme
from facefed.privacy.rotation import (
    RotationTransform,
    apply_rotation_matrix,
    plan_rotation,
)
from facefed.privacy.templates import ProtectedTemplate
from facefed.server import audit
from facefed.server.db import (
    ApiKey,
    AuditEvent,
    Collection,
    CollectionModel,
    Consent,
    ErasedSubject,
    IdempotencyRecord,
    ServerSecret,
    Site,
    Subject,
    Template,
    as_utc,
    flush_deleted,
    make_engine,
    make_session_factory,
    run_migrations,
    session_scope,
    utcnow,
)
from facefed.server.db import (
    ProtectionKey as ProtectionKeyRow,
)
from facefed.server.gallery import CollectionIndex, Gallery, Hit, IndexConfig
from facefed.server.receipts import ReceiptSigner
from facefed.server.security import (
    API_KEY_PREFIX,
    SUBJECT_TOKEN_PREFIX,
    Principal,
    hash_secret,
    new_secret,
    same_hash,
)
from facefed.server.settings import ServerSettings
from facefed.server.vault import KeyVault

logger = logging.getLogger(__name__)

IDEMPOTENCY_TTL = timedelta(hours=24)
_SIGNING_KEY_NAME = "receipt-signing-key"


class AuthenticationError(PermissionDeniedError):
    """Raised when a request carries no valid credential (HTTP 401)."""


class LimitExceededError(FacefedError):
    """Raised when a request asks for more than a configured limit allows."""

    exit_code = 6


@dataclass(frozen=True)
class ConsentInput:
    """A consent record as received at enrollment."""

    purpose: str
    lawful_basis: str
    consent_text_version: str
    given_at: datetime
    retention_days: int


@dataclass(frozen=True)
class Candidate:
    """A search result as the API returns it."""

    subject_id: str
    score: float
    external_ref: str | None


@dataclass(frozen=True)
class IdentifyOutcome:
    """Result of a 1:N search."""

    collection: str
    candidates: list[Candidate]
    threshold: float
    match: Candidate | None


@dataclass(frozen=True)
class VerifyOutcome:
    """Result of a 1:1 comparison."""

    subject_id: str
    score: float
    threshold: float
    match: bool


@dataclass(frozen=True)
class RotationOutcome:
    """Result of a key rotation of one collection."""

    collection: str
    scheme: str
    from_version: int
    to_version: int
    rekeyed_templates: int
    reenroll_subjects: list[str] = field(default_factory=list)


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _token_tombstone(token_hash: str) -> str:
    """Tombstone key of an erased subject's token (a hash of its stored hash)."""
    return _hash_text("subject-token|" + token_hash)


class GalleryService:
    """The server's state and operations, shared by every request.

    Args:
        settings: Server settings.
        wrapper: Master-key wrapper; built from the settings when None.
    """

    def __init__(
        self, settings: ServerSettings, *, wrapper: KeyWrapper | None = None
    ) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.wrapper = wrapper or LocalKeyWrapper(
            load_or_create_master_key(
                key_text=settings.master_key,
                key_file=settings.master_key_file,
                dev_file=settings.dev_master_key_file,
                development=settings.dev_mode,
            )
        )
        self.engine = make_engine(settings.resolved_database_url)
        self.sessions = make_session_factory(self.engine)
        self.vault = KeyVault(settings.resolved_key_vault_url, wrapper=self.wrapper)
        self.gallery = Gallery(
            IndexConfig(
                ivf_min_size=settings.ivf_min_size,
                nlist=settings.ivf_nlist,
                nprobe=settings.ivf_nprobe,
                use_gpu=settings.use_gpu,
            )
        )
        # SQLite has one writer; serialising our write transactions avoids
        # busy errors and keeps the audit chain's appends in order. Lock
        # order, to stay free of deadlocks: write_lock, then a collection's.
        self.write_lock = threading.RLock()
        self.signer: ReceiptSigner | None = None

    # -- life cycle ------------------------------------------------------------

    @property
    def receipt_signer(self) -> ReceiptSigner:
        """The receipt signer, loaded by `start`."""
        if self.signer is None:
            raise ConfigurationError("The service signs receipts only after start().")
        return self.signer

    def start(self) -> None:
        """Migrate the database, load the signing key, rebuild every index."""
        run_migrations(self.engine)
        self.signer = ReceiptSigner(self._signing_key())
        self.reconcile()

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
        self.vault.close()

    def _signing_key(self) -> bytes:
        context = b"server-secret|" + _SIGNING_KEY_NAME.encode()
        with self.write_lock, session_scope(self.sessions) as session:
            row = session.get(ServerSecret, _SIGNING_KEY_NAME)
            if row is None:
                key = ReceiptSigner.generate_private_key()
                session.add(
                    ServerSecret(
                        name=_SIGNING_KEY_NAME,
                        wrapped=self.wrapper.wrap(key, context=context),
                        created_at=utcnow(),
                    )
                )
                return key
            return self.wrapper.unwrap(row.wrapped, context=context)

    def reconcile(self) -> None:
        """Make every index equal to the database, finishing half-done erasures.

        Subjects whose data key is gone were being erased when the process
        stopped: their rows are deleted now. Keys without a subject belong to
        an enrollment that never committed: they are destroyed.
        """
        with self.write_lock:
            keyed = self.vault.subject_ids()
            with session_scope(self.sessions) as session:
                collections = list(session.scalars(select(Collection)))
                subject_ids = set(session.scalars(select(Subject.id)))
            for orphan in keyed - subject_ids:
                self.vault.destroy(orphan)
            unkeyed = subject_ids - keyed
            if unkeyed:
                with session_scope(self.sessions) as session:
                    for subject_id in unkeyed:
                        self._delete_subject_rows(session, subject_id)
                    audit.append_event(
                        session,
                        action="subject.erase.completed",
                        actor="server",
                        details={"subjects": len(unkeyed)},
                    )
                logger.info("Finished %d interrupted erasure(s)", len(unkeyed))
            for collection in collections:
                self._rebuild_index(collection)

    def _rebuild_index(self, collection: Collection) -> CollectionIndex:
        index = self.gallery.ensure(collection.id, collection.kind, collection.dim)
        with index.lock, session_scope(self.sessions) as session:
            rows = list(
                session.scalars(
                    select(Template).where(
                        Template.collection_id == collection.id,
                        Template.key_version == collection.key_version,
                    )
                )
            )
            keys = self.vault.get_many(sorted({row.subject_id for row in rows}))
            index.replace_all(
                (row.subject_id, row.id, self._open_template(row, keys[row.subject_id]))
                for row in rows
                if row.subject_id in keys
            )
        logger.info(
            "Collection %s: %d template(s) indexed (%s)",
            collection.id,
            index.size,
            "IVF" if index.is_ivf else "exact",
        )
        return index

    # -- credentials -----------------------------------------------------------

    def authenticate(
        self, bearer: str | None, subject_token: str | None
    ) -> Principal | None:
        """Return the caller for the presented credentials, or None for none.

        Raises:
            AuthenticationError: A credential is presented but not valid.
        """
        for credential in (subject_token, bearer):
            if credential and credential.startswith(SUBJECT_TOKEN_PREFIX):
                return self._subject_principal(credential)
        if bearer:
            return self._key_principal(bearer)
        return None

    def _key_principal(self, secret: str) -> Principal:
        digest = hash_secret(secret)
        with session_scope(self.sessions) as session:
            row = session.scalars(
                select(ApiKey).where(ApiKey.key_hash == digest)
            ).one_or_none()
            if row is None or row.revoked_at is not None:
                raise AuthenticationError("The API key is not valid.")
            if not same_hash(row.key_hash, secret):
                raise AuthenticationError("The API key is not valid.")
            if row.site_id is not None:
                site = session.get(Site, row.site_id)
                if site is None or site.disabled:
                    raise AuthenticationError("The API key's site is disabled.")
            return Principal(role=row.role, key_id=row.id, site_id=row.site_id)

    def _subject_principal(self, token: str) -> Principal:
        digest = hash_secret(token)
        with session_scope(self.sessions) as session:
            row = session.scalars(
                select(Subject).where(Subject.token_hash == digest)
            ).one_or_none()
            if row is None and session.get(ErasedSubject, _token_tombstone(digest)):
                # The subject retrying its own erasure: 410 like any other
                # credential would get, not "your token is invalid".
                raise GoneError("This subject was erased.")
            if row is None or not same_hash(row.token_hash, token):
                raise AuthenticationError("The subject token is not valid.")
            return Principal(role="subject", subject_id=row.id)

    # -- sites and API keys ----------------------------------------------------

    def create_site(self, principal: Principal, name: str) -> Site:
        """Register a branch site."""
        with self.write_lock, session_scope(self.sessions) as session:
            if session.scalars(select(Site).where(Site.name == name)).first():
                raise ConflictError(f"A site named {name!r} already exists.")
            site = Site(id=uuid.uuid4().hex, name=name, created_at=utcnow())
            session.add(site)
            audit.append_event(
                session,
                action="admin.site.create",
                actor=principal.actor,
                site_id=site.id,
            )
            return site

    def list_sites(self) -> list[Site]:
        """Return every site."""
        with session_scope(self.sessions) as session:
            return list(session.scalars(select(Site).order_by(Site.created_at)))

    def create_api_key(
        self, actor: str, *, role: str, site_id: str | None, name: str = ""
    ) -> tuple[ApiKey, str]:
        """Create an API key; return its row and the secret (shown once).

        Raises:
            NotFoundError: The site does not exist.
            ConflictError: A site key without a site, or an admin key with one.
        """
        if role not in ("admin", "site"):
            raise ConflictError(f"A key's role is 'admin' or 'site', got {role!r}.")
        if (role == "site") != (site_id is not None):
            raise ConflictError("A site key needs a site_id; an admin key takes none.")
        secret = new_secret(API_KEY_PREFIX)
        with self.write_lock, session_scope(self.sessions) as session:
            if site_id is not None and session.get(Site, site_id) is None:
                raise NotFoundError(f"There is no site {site_id!r}.")
            row = ApiKey(
                id=uuid.uuid4().hex[:16],
                key_hash=hash_secret(secret),
                role=role,
                site_id=site_id,
                name=name,
                created_at=utcnow(),
            )
            session.add(row)
            audit.append_event(
                session,
                action="admin.key.create",
                actor=actor,
                site_id=site_id,
                details={"role": role, "key_id": row.id},
            )
        logger.info("Created API key %s (role %s)", row.id, role)
        return row, secret

    def list_api_keys(self) -> list[ApiKey]:
        """Return every API key (hashes only)."""
        with session_scope(self.sessions) as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def revoke_api_key(self, principal: Principal, key_id: str) -> ApiKey:
        """Revoke an API key for good."""
        with self.write_lock, session_scope(self.sessions) as session:
            row = session.get(ApiKey, key_id)
            if row is None:
                raise NotFoundError(f"There is no API key {key_id!r}.")
            row.revoked_at = row.revoked_at or utcnow()
            audit.append_event(
                session,
                action="admin.key.revoke",
                actor=principal.actor,
                details={"key_id": key_id},
            )
            return row

    # -- protection keys (key service) -----------------------------------------

    @staticmethod
    def _key_context(scheme: str, version: int) -> bytes:
        return f"protection-key|{scheme}|{version}".encode()

    def create_protection_key(
        self, principal: Principal, *, scheme: str, secret: bytes | None = None
    ) -> ProtectionKeyRow:
        """Store a new key version of a scheme, wrapped by the master key.

        Args:
            principal: The admin.
            scheme: Registered protection scheme.
            secret: Key material made offline; a fresh 256-bit secret when None.
        """
        get_scheme(scheme)
        with self.write_lock, session_scope(self.sessions) as session:
            latest = session.scalar(
                select(func.max(ProtectionKeyRow.version)).where(
                    ProtectionKeyRow.scheme == scheme
                )
            )
            version = int(latest or 0) + 1
            key = (
                generate_key(scheme, version)
                if secret is None
                else ProtectionKey(scheme, version, secret)
            )
            row = ProtectionKeyRow(
                scheme=scheme,
                version=version,
                wrapped_secret=self.wrapper.wrap(
                    key.secret, context=self._key_context(scheme, version)
                ),
                master_key_id=self.wrapper.key_id,
                created_at=utcnow(),
            )
            session.add(row)
            audit.append_event(
                session,
                action="admin.protection_key.create",
                actor=principal.actor,
                details={"scheme": scheme, "version": version},
            )
            return row

    def list_protection_keys(self) -> list[ProtectionKeyRow]:
        """Return the metadata of every protection key."""
        with session_scope(self.sessions) as session:
            return list(
                session.scalars(
                    select(ProtectionKeyRow).order_by(
                        ProtectionKeyRow.scheme, ProtectionKeyRow.version
                    )
                )
            )

    def protection_key(
        self,
        principal: Principal,
        *,
        collection_id: str | None = None,
        scheme: str | None = None,
        version: int | None = None,
    ) -> ProtectionKey:
        """Hand a protection key to an authenticated site (or admin).

        By default the key a collection's templates are made with; otherwise
        the given scheme's newest (or given) version.
        """
        with self.write_lock, session_scope(self.sessions) as session:
            if scheme is None:
                collection = self._collection(session, collection_id or "default")
                scheme, version = collection.scheme, collection.key_version
            get_scheme(scheme)
            query = select(ProtectionKeyRow).where(ProtectionKeyRow.scheme == scheme)
            if version is not None:
                query = query.where(ProtectionKeyRow.version == version)
            row = session.scalars(
                query.order_by(ProtectionKeyRow.version.desc())
            ).first()
            if row is None:
                raise ProtectionError(
                    f"The key service has no key for scheme {scheme!r}"
                    + (f" version {version}." if version else ".")
                )
            secret = self.wrapper.unwrap(
                row.wrapped_secret, context=self._key_context(row.scheme, row.version)
            )
            audit.append_event(
                session,
                action="key.fetch",
                actor=principal.actor,
                site_id=principal.site_id,
                details={"scheme": row.scheme, "version": row.version},
            )
            return ProtectionKey(row.scheme, row.version, secret)

    # -- collections -----------------------------------------------------------

    def create_collection(
        self,
        principal: Principal,
        *,
        collection_id: str,
        model_id: str,
        scheme: str,
        dim: int,
    ) -> Collection:
        """Create a collection for one model and scheme at the scheme's newest key.

        Raises:
            ProtectionError: The scheme is unknown or has no key yet.
            ConflictError: The collection exists.
        """
        protection = get_scheme(scheme)
        if protection.kind == "binary" and dim % 8:
            raise TemplateError(f"A binary collection needs whole bytes; dim={dim}.")
        with self.write_lock, session_scope(self.sessions) as session:
            if session.get(Collection, collection_id) is not None:
                raise ConflictError(f"The collection {collection_id!r} exists.")
            version = session.scalar(
                select(func.max(ProtectionKeyRow.version)).where(
                    ProtectionKeyRow.scheme == scheme,
                    ProtectionKeyRow.retired_at.is_(None),
                )
            )
            if version is None:
                raise ProtectionError(
                    f"Create a protection key for {scheme!r} before a collection."
                )
            row = Collection(
                id=collection_id,
                model_id=model_id,
                scheme=scheme,
                dim=dim,
                kind=protection.kind,
                key_version=int(version),
                created_at=utcnow(),
                promoted=[],
            )
            session.add(row)
            audit.append_event(
                session,
                action="admin.collection.create",
                actor=principal.actor,
                details={"collection": collection_id, "scheme": scheme, "dim": dim},
            )
        self.gallery.ensure(row.id, protection.kind, dim)
        return row

    def list_collections(self) -> list[tuple[Collection, int]]:
        """Return every collection with its number of indexed templates."""
        with session_scope(self.sessions) as session:
            rows = list(session.scalars(select(Collection).order_by(Collection.id)))
        result = []
        for row in rows:
            index = self.gallery.get(row.id)
            result.append((row, index.size if index else 0))
        return result

    def collection(self, collection_id: str) -> tuple[Collection, int]:
        """Return one collection (with its promoted models) and its index size."""
        with session_scope(self.sessions) as session:
            row = self._collection(session, collection_id)
        index = self.gallery.get(row.id)
        return row, index.size if index else 0

    @staticmethod
    def _collection(session: Session, collection_id: str) -> Collection:
        row = session.get(Collection, collection_id)
        if row is None:
            raise NotFoundError(f"There is no collection {collection_id!r}.")
        return row

    # -- templates -------------------------------------------------------------

    def _check_template(
        self, collection: Collection, template: ProtectedTemplate
    ) -> npt.NDArray[Any]:
        if template.model_id not in collection.accepted_model_ids:
            raise TemplateError(
                f"The template was made by model {template.model_id!r}; collection "
                f"{collection.id!r} accepts templates of model(s) "
                f"{', '.join(collection.accepted_model_ids)} (serving model "
                f"{collection.serving_model_id})."
            )
        if template.scheme_id != collection.scheme:
            raise ProtectionError(
                f"The template uses scheme {template.scheme_id!r}; collection "
                f"{collection.id!r} uses {collection.scheme!r}."
            )
        if template.key_version != collection.key_version:
            raise ProtectionError(
                f"The template uses key version {template.key_version}; collection "
                f"{collection.id!r} is at key version {collection.key_version}: fetch "
                "the current key from the key service."
            )
        if template.dim != collection.dim:
            raise TemplateError(
                f"The template has dimension {template.dim}; collection "
                f"{collection.id!r} expects {collection.dim}."
            )
        data = np.asarray(template.data)
        if collection.kind == "binary":
            return data.astype(np.uint8)
        vector = data.astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm < 1e-6:
            raise TemplateError("The template has zero or non-finite length.")
        # Stored unit length so that inner product is cosine similarity.
        return vector / norm

    @staticmethod
    def _template_context(row: Template) -> bytes:
        return f"template|{row.subject_id}|{row.id}".encode()

    def _seal_template(
        self, row: Template, vector: npt.NDArray[Any], data_key: bytes
    ) -> None:
        row.ciphertext = seal(
            data_key, vector.tobytes(), associated_data=self._template_context(row)
        )

    def _open_template(self, row: Template, data_key: bytes) -> npt.NDArray[Any]:
        raw = open_sealed(
            data_key, row.ciphertext, associated_data=self._template_context(row)
        )
        dtype = (
            np.float32
            if row.scheme and get_scheme(row.scheme).kind == "float"
            else np.uint8
        )
        return np.frombuffer(raw, dtype=dtype).copy()

    def _new_template_rows(
        self,
        subject_id: str,
        collection: Collection,
        checked: list[tuple[npt.NDArray[Any], str]],
        data_key: bytes,
    ) -> list[Template]:
        """Sealed rows of checked (vector, model id) pairs.

        Each row keeps the model that made it, so that an audit can tell a
        parent's templates from those of a model promoted after it.
        """
        rows = []
        now = utcnow()
        for vector, model_id in checked:
            row = Template(
                id=secrets.randbits(62) + 1,
                subject_id=subject_id,
                collection_id=collection.id,
                model_id=model_id,
                scheme=collection.scheme,
                key_version=collection.key_version,
                dim=collection.dim,
                created_at=now,
            )
            self._seal_template(row, vector, data_key)
            rows.append(row)
        return rows

    def _index_add(
        self,
        collection: Collection,
        subject_id: str,
        rows: list[Template],
        vectors: list[npt.NDArray[Any]],
    ) -> None:
        index = self.gallery.ensure(collection.id, collection.kind, collection.dim)
        try:
            index.add(subject_id, [row.id for row in rows], np.stack(vectors))
        except Exception:
            # The database already holds the templates: rebuild from it.
            logger.exception("Index add failed; rebuilding %s", collection.id)
            self._rebuild_index(collection)

    # -- enrollment ------------------------------------------------------------

    def enroll(
        self,
        principal: Principal,
        *,
        collection_id: str,
        consent: ConsentInput,
        templates: list[ProtectedTemplate],
        external_ref: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Enroll a new subject with their consent and templates.

        Returns:
            ``subject_id``, ``subject_token`` (shown once), ``collection``,
            ``template_count``, ``consent_expires_at``.
        """
        site_id = self._require_site(principal)
        request_hash = _hash_text(
            json.dumps(
                [
                    collection_id,
                    external_ref,
                    [t.to_wire() for t in templates],
                    consent.purpose,
                    consent.retention_days,
                ],
                sort_keys=True,
            )
        )
        record_id = (
            _hash_text(f"{principal.key_id}|{idempotency_key}")
            if idempotency_key
            else None
        )
        if record_id is not None and idempotency_key is not None:
            replay = self._replay(record_id, request_hash, idempotency_key)
            if replay is not None:
                return replay

        vectors, collection = self._validate_enrollment(
            collection_id, consent, templates
        )
        subject_id = uuid.uuid4().hex
        token = new_secret(SUBJECT_TOKEN_PREFIX)
        data_key = self.vault.create(subject_id)
        expires_at = as_utc(consent.given_at) + timedelta(days=consent.retention_days)
        response = {
            "subject_id": subject_id,
            "subject_token": token,
            "collection": collection_id,
            "template_count": len(vectors),
            "consent_expires_at": expires_at.isoformat(),
        }
        try:
            with self.write_lock, session_scope(self.sessions) as session:
                session.add(
                    Subject(
                        id=subject_id,
                        collection_id=collection_id,
                        site_id=site_id,
                        external_ref=external_ref,
                        token_hash=hash_secret(token),
                        created_at=utcnow(),
                    )
                )
                session.flush()
                session.add(self._consent_row(subject_id, consent, expires_at))
                checked = list(
                    zip(vectors, [t.model_id for t in templates], strict=True)
                )
                rows = self._new_template_rows(
                    subject_id, collection, checked, data_key
                )
                session.add_all(rows)
                if record_id is not None and idempotency_key is not None:
                    session.add(
                        IdempotencyRecord(
                            id=record_id,
                            request_hash=request_hash,
                            subject_id=subject_id,
                            created_at=utcnow(),
                            sealed_response=self._seal_replay(
                                idempotency_key, record_id, response
                            ),
                        )
                    )
                audit.append_event(
                    session,
                    action="subject.enroll",
                    actor=principal.actor,
                    site_id=site_id,
                    details={"collection": collection_id, "templates": len(rows)},
                )
        except IntegrityError as error:
            self.vault.destroy(subject_id)
            if record_id is not None and idempotency_key is not None:
                replay = self._replay(record_id, request_hash, idempotency_key)
                if replay is not None:
                    return replay
            raise ConflictError("The enrollment conflicts with stored data.") from error
        except BaseException:
            self.vault.destroy(subject_id)
            raise
        self._index_add(collection, subject_id, rows, vectors)
        logger.info("Enrolled a subject in %s", collection_id)
        return response

    def _validate_enrollment(
        self,
        collection_id: str,
        consent: ConsentInput,
        templates: list[ProtectedTemplate],
    ) -> tuple[list[npt.NDArray[Any]], Collection]:
        if not templates:
            raise TemplateError("An enrollment needs at least one template.")
        if len(templates) > self.settings.max_templates_per_subject:
            raise LimitExceededError(
                f"At most {self.settings.max_templates_per_subject} templates per "
                f"subject are allowed; got {len(templates)}."
            )
        if consent.retention_days > self.settings.retention_days_max:
            raise LimitExceededError(
                f"A retention period of {consent.retention_days} days exceeds the "
                f"limit of {self.settings.retention_days_max}."
            )
        if as_utc(consent.given_at) > utcnow() + timedelta(minutes=5):
            raise ConflictError("The consent's given_at lies in the future.")
        expires_at = as_utc(consent.given_at) + timedelta(days=consent.retention_days)
        if expires_at <= utcnow():
            # Enrolling under a lapsed consent would hold data past its
            # retention period until the next purge.
            raise ConflictError(
                f"The consent's retention period ended at {expires_at.isoformat()}."
            )
        with session_scope(self.sessions) as session:
            collection = self._collection(session, collection_id)
        return [self._check_template(collection, t) for t in templates], collection

    @staticmethod
    def _consent_row(
        subject_id: str, consent: ConsentInput, expires_at: datetime
    ) -> Consent:
        return Consent(
            id=uuid.uuid4().hex,
            subject_id=subject_id,
            purpose=consent.purpose,
            lawful_basis=consent.lawful_basis,
            consent_text_version=consent.consent_text_version,
            given_at=as_utc(consent.given_at),
            retention_days=consent.retention_days,
            expires_at=expires_at,
        )

    @staticmethod
    def _replay_key(idempotency_key: str) -> bytes:
        return hashlib.sha256(
            b"facefed-idempotency|" + idempotency_key.encode()
        ).digest()

    def _seal_replay(
        self, idempotency_key: str, record_id: str, response: dict[str, Any]
    ) -> bytes:
        return seal(
            self._replay_key(idempotency_key),
            json.dumps(response).encode(),
            associated_data=record_id.encode(),
        )

    def _replay(
        self, record_id: str, request_hash: str, idempotency_key: str
    ) -> dict[str, Any] | None:
        with session_scope(self.sessions) as session:
            record = session.get(IdempotencyRecord, record_id)
            if record is None or as_utc(record.created_at) < utcnow() - IDEMPOTENCY_TTL:
                return None
            if record.request_hash != request_hash:
                raise ConflictError(
                    "This Idempotency-Key was used for a different request."
                )
            sealed = record.sealed_response
        opened = open_sealed(
            self._replay_key(idempotency_key),
            sealed,
            associated_data=record_id.encode(),
        )
        response: dict[str, Any] = json.loads(opened)
        return response

    def add_templates(
        self,
        principal: Principal,
        subject_id: str,
        templates: list[ProtectedTemplate],
    ) -> int:
        """Add templates to a subject; return how many it now holds.

        Templates under an older key version (after a rotation that needs
        re-enrollment) are replaced by the new ones.
        """
        if not templates:
            raise TemplateError("Send at least one template.")
        with session_scope(self.sessions) as session:
            subject = self._subject_for(session, principal, subject_id, write=True)
            collection = self._collection(session, subject.collection_id)
        vectors = [self._check_template(collection, t) for t in templates]
        checked = list(zip(vectors, [t.model_id for t in templates], strict=True))
        index = self.gallery.ensure(collection.id, collection.kind, collection.dim)
        # Erasure takes the write lock too: everything from the existence
        # check to the index add happens under it, so a concurrent erasure
        # either finishes first (410 here) or removes these templates too.
        with self.write_lock:
            rows, count = self._store_templates(
                principal, subject_id, collection, checked, index
            )
            self._index_add(collection, subject_id, rows, vectors)
        return int(count) + len(rows)

    def _store_templates(
        self,
        principal: Principal,
        subject_id: str,
        collection: Collection,
        checked: list[tuple[npt.NDArray[Any], str]],
        index: CollectionIndex,
    ) -> tuple[list[Template], int]:
        with index.lock, session_scope(self.sessions) as session:
            if session.get(Subject, subject_id) is None:
                raise GoneError("This subject was erased.")
            data_key = self.vault.get(subject_id)
            session.execute(
                delete(Template).where(
                    Template.subject_id == subject_id,
                    Template.key_version != collection.key_version,
                )
            )
            count = (
                session.scalar(
                    select(func.count()).where(Template.subject_id == subject_id)
                )
                or 0
            )
            if count + len(checked) > self.settings.max_templates_per_subject:
                raise LimitExceededError(
                    f"A subject may hold {self.settings.max_templates_per_subject} "
                    f"templates; this one holds {count} and {len(checked)} were sent."
                )
            rows = self._new_template_rows(subject_id, collection, checked, data_key)
            session.add_all(rows)
            audit.append_event(
                session,
                action="subject.templates.add",
                actor=principal.actor,
                site_id=principal.site_id,
                details={"collection": collection.id, "templates": len(rows)},
            )
        return rows, int(count)

    # -- matching --------------------------------------------------------------

    def identify(
        self,
        principal: Principal,
        *,
        collection_id: str,
        template: ProtectedTemplate,
        top_k: int,
        threshold: float | None,
    ) -> IdentifyOutcome:
        """Search a collection for the subjects closest to a probe (1:N)."""
        self._require_site_or_admin(principal)
        if not 1 <= top_k <= self.settings.max_top_k:
            raise LimitExceededError(
                f"top_k must be 1..{self.settings.max_top_k}; got {top_k}."
            )
        threshold = self.settings.match_threshold if threshold is None else threshold
        with session_scope(self.sessions) as session:
            collection = self._collection(session, collection_id)
        probe = self._check_template(collection, template)
        index = self.gallery.ensure(collection.id, collection.kind, collection.dim)
        hits = index.search(probe, top_k=top_k)
        candidates = self._candidates(principal, hits)
        match = (
            candidates[0] if candidates and candidates[0].score >= threshold else None
        )
        self._audit_plain(
            "match.identify",
            principal,
            {
                "collection": collection_id,
                "candidates": len(candidates),
                "matched": match is not None,
            },
        )
        return IdentifyOutcome(collection_id, candidates, threshold, match)

    def _candidates(self, principal: Principal, hits: list[Hit]) -> list[Candidate]:
        if not hits:
            return []
        with session_scope(self.sessions) as session:
            rows = {
                row.id: row
                for row in session.scalars(
                    select(Subject).where(Subject.id.in_([h.subject_id for h in hits]))
                )
            }
        result = []
        for hit in hits:
            row = rows.get(hit.subject_id)
            if row is None:
                continue
            # A site sees its own reference for its own subjects only.
            own = principal.role == "admin" or row.site_id == principal.site_id
            result.append(
                Candidate(hit.subject_id, hit.score, row.external_ref if own else None)
            )
        return result

    def verify(
        self,
        principal: Principal,
        *,
        subject_id: str,
        template: ProtectedTemplate,
        threshold: float | None,
    ) -> VerifyOutcome:
        """Compare a probe with one subject's templates (1:1)."""
        self._require_site_or_admin(principal)
        threshold = self.settings.match_threshold if threshold is None else threshold
        with session_scope(self.sessions) as session:
            subject = self._subject_for(session, principal, subject_id, write=False)
            collection = self._collection(session, subject.collection_id)
        probe = self._check_template(collection, template)
        index = self.gallery.ensure(collection.id, collection.kind, collection.dim)
        best = index.score_subject(subject_id, probe)
        if best is None:
            raise NotFoundError(
                "The subject has no template under the collection's current key."
            )
        score = best[1]
        self._audit_plain(
            "match.verify",
            principal,
            {"collection": collection.id, "matched": score >= threshold},
        )
        return VerifyOutcome(subject_id, score, threshold, score >= threshold)

    def _audit_plain(
        self, action: str, principal: Principal, details: dict[str, Any]
    ) -> None:
        with self.write_lock, session_scope(self.sessions) as session:
            audit.append_event(
                session,
                action=action,
                actor=principal.actor,
                site_id=principal.site_id,
                details=details,
            )

    def report_refusal(
        self, principal: Principal, *, stage: str, reasons: list[str]
    ) -> None:
        """Record that a site refused a capture (no personal data)."""
        self._require_site_or_admin(principal)
        self._audit_plain(
            "site.capture.refused",
            principal,
            {"stage": stage[:64], "reasons": [r[:200] for r in reasons[:10]]},
        )

    # -- subject rights ----------------------------------------------------------

    def _subject_for(
        self, session: Session, principal: Principal, subject_id: str, *, write: bool
    ) -> Subject:
        subject = session.get(Subject, subject_id)
        if subject is None:
            if session.get(ErasedSubject, _hash_text(subject_id)) is not None:
                raise GoneError("This subject was erased.")
            raise NotFoundError(f"There is no subject {subject_id!r}.")
        allowed = (
            principal.role == "admin"
            or (principal.role == "subject" and principal.subject_id == subject_id)
            or (
                principal.role == "site"
                and (not write or subject.site_id == principal.site_id)
            )
        )
        if not allowed:
            raise PermissionDeniedError("This credential may not act on this subject.")
        return subject

    def _data_key_or_gone(self, subject_id: str) -> bytes:
        """The subject's data key; 410 if an erasure destroyed it meanwhile."""
        try:
            return self.vault.get(subject_id)
        except DecryptionError:
            # The erasure holds the write lock from key destruction to the
            # tombstone's commit: waiting for it makes the tombstone visible.
            with self.write_lock, session_scope(self.sessions) as session:
                erased = session.get(ErasedSubject, _hash_text(subject_id))
            if erased is not None:
                raise GoneError("This subject was erased.") from None
            raise

    def export(self, principal: Principal, subject_id: str) -> dict[str, Any]:
        """Everything held about a subject (GDPR Art. 15), templates protected."""
        with session_scope(self.sessions) as session:
            subject = self._subject_for(session, principal, subject_id, write=True)
            consents = list(
                session.scalars(select(Consent).where(Consent.subject_id == subject_id))
            )
            templates = list(
                session.scalars(
                    select(Template).where(Template.subject_id == subject_id)
                )
            )
            site = session.get(Site, subject.site_id)
        data_key = self._data_key_or_gone(subject_id)
        exported = {
            "subject_id": subject.id,
            "collection": subject.collection_id,
            "site": {"id": subject.site_id, "name": site.name if site else None},
            "external_ref": subject.external_ref,
            "enrolled_at": as_utc(subject.created_at).isoformat(),
            "consents": [_consent_dict(c) for c in consents],
            "templates": [
                {
                    "template_id": str(row.id),
                    "created_at": as_utc(row.created_at).isoformat(),
                    "protected": ProtectedTemplate(
                        row.model_id,
                        row.scheme,
                        row.key_version,
                        self._open_template(row, data_key),
                    ).to_wire(),
                }
                for row in templates
            ],
            "exported_at": utcnow().isoformat(),
        }
        self._audit_plain("subject.export", principal, {"templates": len(templates)})
        return exported

    def erase(
        self, principal: Principal, subject_id: str, *, reason: str = "request"
    ) -> dict[str, Any]:
        """Erase a subject everywhere and return a signed receipt (GDPR Art. 17).

        Order: index, key (crypto-shredding), then rows; a crash part-way is
        finished by `reconcile`.
        """
        with session_scope(self.sessions) as session:
            subject = self._subject_for(session, principal, subject_id, write=True)
            collection_id = subject.collection_id
        return self._erase(
            principal.actor, principal.site_id, subject_id, collection_id, reason
        )

    def _erase(
        self,
        actor: str,
        site_id: str | None,
        subject_id: str,
        collection_id: str,
        reason: str,
    ) -> dict[str, Any]:
        index = self.gallery.get(collection_id)
        with self.write_lock:
            removed_from_index = index.remove_subject(subject_id) if index else 0
            key_destroyed = self.vault.destroy(subject_id)
            with session_scope(self.sessions) as session:
                counts = self._delete_subject_rows(session, subject_id)
                event = audit.append_event(
                    session,
                    action="subject.erase",
                    actor=actor,
                    site_id=site_id,
                    details={"reason": reason, **counts},
                )
            flush_deleted(self.engine)
        logger.info("Erased a subject (%s)", reason)
        receipt = {
            "receipt_id": event.event_id,
            "subject_id": subject_id,
            "collection": collection_id,
            "erased_at": utcnow().isoformat(),
            "reason": reason,
            "removed": {
                **counts,
                "index_entries": removed_from_index,
                "data_key_destroyed": key_destroyed,
            },
        }
        return self.receipt_signer.sign(receipt)

    @staticmethod
    def _delete_subject_rows(session: Session, subject_id: str) -> dict[str, int]:
        templates = session.execute(
            delete(Template).where(Template.subject_id == subject_id)
        )
        consents = session.execute(
            delete(Consent).where(Consent.subject_id == subject_id)
        )
        session.execute(
            delete(IdempotencyRecord).where(IdempotencyRecord.subject_id == subject_id)
        )
        token_hash = session.scalar(
            select(Subject.token_hash).where(Subject.id == subject_id)
        )
        session.execute(delete(Subject).where(Subject.id == subject_id))
        tombstones = [_hash_text(subject_id)]
        if token_hash:
            tombstones.append(_token_tombstone(token_hash))
        for tombstone in tombstones:
            if session.get(ErasedSubject, tombstone) is None:
                session.add(ErasedSubject(subject_hash=tombstone, erased_at=utcnow()))
        return {
            "templates": int(templates.rowcount),  # type: ignore[attr-defined]
            "consents": int(consents.rowcount),  # type: ignore[attr-defined]
        }

    def purge_expired(self, *, actor: str = "server") -> int:
        """Erase every subject whose consent has expired; return how many."""
        now = utcnow()
        with session_scope(self.sessions) as session:
            expired = list(
                session.execute(
                    select(Subject.id, Subject.collection_id)
                    .join(Consent, Consent.subject_id == Subject.id)
                    .where(Consent.expires_at <= now)
                    .distinct()
                )
            )
            # Past the TTL a replay is refused anyway; the sealed answers go.
            session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.created_at < now - IDEMPOTENCY_TTL
                )
            )
        for subject_id, collection_id in expired:
            self._erase(actor, None, subject_id, collection_id, "consent_expired")
        self._audit_plain(
            "admin.purge_expired",
            Principal(role="admin", key_id=actor),
            {"erased": len(expired)},
        )
        if expired:
            logger.info("Purged %d subject(s) with expired consent", len(expired))
        return len(expired)

    # -- key rotation ------------------------------------------------------------

    def rotate(
        self,
        principal: Principal,
        *,
        collection_id: str,
        to_version: int,
        transform: dict[str, Any] | None,
    ) -> RotationOutcome:
        """Move a collection to a new key version.

        For a re-keyable scheme (``orthonormal-v1``) every template is mapped
        by the orthonormal transform T = R_new R_old^T that the admin computes
        from both keys offline (`privacy.rotation.rotation_transform`): the
        server sees T only, never either key and never a raw embedding. For
        other schemes nothing can be re-keyed: the collection moves to the new
        version, old templates leave the index, and the subjects to re-enroll
        are listed.
        """
        with session_scope(self.sessions) as session:
            collection = self._collection(session, collection_id)
            parsed = (
                None if transform is None else RotationTransform.from_wire(transform)
            )
            exists = session.scalars(
                select(ProtectionKeyRow).where(
                    ProtectionKeyRow.scheme == collection.scheme,
                    ProtectionKeyRow.version == to_version,
                )
            ).first()
        if exists is None:
            raise ProtectionError(
                f"The key service has no {collection.scheme!r} key version "
                f"{to_version}."
            )
        if to_version <= collection.key_version:
            raise ConflictError(
                f"Collection {collection_id!r} is at key version "
                f"{collection.key_version}; rotate to a newer one, not {to_version}."
            )
        scheme = get_scheme(collection.scheme)
        if scheme.rekeyable:
            self._check_transform(parsed, collection, to_version)
        index = self.gallery.ensure(collection.id, collection.kind, collection.dim)
        with self.write_lock, index.lock, session_scope(self.sessions) as session:
            collection = self._collection(session, collection_id)
            rows = list(
                session.scalars(
                    select(Template).where(
                        Template.collection_id == collection_id,
                        Template.key_version == collection.key_version,
                    )
                )
            )
            from_version = collection.key_version
            reenroll: list[str] = []
            plan = plan_rotation(
                collection.scheme,
                {row.subject_id: row.key_version for row in rows},
                to_version=to_version,
            )
            if parsed is not None and plan.rekey:
                self._rekey_rows(rows, parsed)
            reenroll = plan.reenroll
            collection.key_version = to_version
            audit.append_event(
                session,
                action="admin.rotate",
                actor=principal.actor,
                details={
                    "collection": collection_id,
                    "scheme": collection.scheme,
                    "from": from_version,
                    "to": to_version,
                    "rekeyed": len(rows) if not reenroll else 0,
                    "reenroll": len(reenroll),
                },
            )
        self._rebuild_index(collection)
        return RotationOutcome(
            collection_id,
            collection.scheme,
            from_version,
            to_version,
            0 if reenroll else len(rows),
            reenroll,
        )

    @staticmethod
    def _check_transform(
        transform: RotationTransform | None, collection: Collection, to_version: int
    ) -> None:
        if transform is None:
            raise ProtectionError(
                f"Scheme {collection.scheme!r} re-keys with a transform; send one "
                "(privacy.rotation.rotation_transform(...).to_wire())."
            )
        if (
            transform.scheme_id != collection.scheme
            or transform.from_version != collection.key_version
            or transform.to_version != to_version
            or transform.dim != collection.dim
        ):
            raise ProtectionError(
                f"The transform maps {transform.scheme_id!r} {transform.dim}-d key "
                f"version {transform.from_version} to {transform.to_version}; "
                f"collection {collection.id!r} needs {collection.scheme!r} "
                f"{collection.dim}-d version {collection.key_version} to {to_version}."
            )

    def _rekey_rows(self, rows: list[Template], transform: RotationTransform) -> None:
        keys = self.vault.get_many(sorted({row.subject_id for row in rows}))
        usable = [row for row in rows if row.subject_id in keys]
        if not usable:
            return
        matrix = np.stack(
            [self._open_template(row, keys[row.subject_id]) for row in usable]
        )
        rotated = apply_rotation_matrix(matrix, transform)
        for row, vector in zip(usable, rotated, strict=True):
            row.key_version = transform.to_version
            self._seal_template(row, vector, keys[row.subject_id])

    # -- audit -------------------------------------------------------------------

    def audit_events(
        self, *, action: str | None, since_seq: int, limit: int
    ) -> list[AuditEvent]:
        """Return audit events after `since_seq`, oldest first."""
        with session_scope(self.sessions) as session:
            query = select(AuditEvent).where(AuditEvent.seq > since_seq)
            if action:
                query = query.where(AuditEvent.action == action)
            return list(session.scalars(query.order_by(AuditEvent.seq).limit(limit)))

    def verify_audit(self) -> audit.AuditVerification:
        """Check the audit chain end to end."""
        with session_scope(self.sessions) as session:
            return audit.verify_chain(session)

    # -- roles -------------------------------------------------------------------

    @staticmethod
    def _require_site(principal: Principal) -> str:
        if principal.role != "site" or principal.site_id is None:
            raise PermissionDeniedError("Only a site key may enroll subjects.")
        return principal.site_id

    @staticmethod
    def _require_site_or_admin(principal: Principal) -> None:
        if principal.role not in ("site", "admin"):
            raise PermissionDeniedError("This needs a site or admin key.")


@dataclass(frozen=True)
class Promotion:
    """A published model version asking to serve a collection.

    Attributes:
        model_id: The version's id.
        parent_model_id: The model it was trained from.
        compatible: Its probes matched the parent's templates at least as
            accurately as the parent's own probes (training summary).
        cross_accuracy: That cross-model accuracy, when measured.
        parent_accuracy: The parent's own accuracy on the same pairs.
    """

    model_id: str
    parent_model_id: str | None
    compatible: bool
    cross_accuracy: float | None = None
    parent_accuracy: float | None = None


def accept_promotion(
    session: Session,
    promotion: Promotion,
    *,
    collection_id: str,
    force_new_gallery: bool,
    actor: str,
) -> str | None:
    """Let a collection accept (and serve) a promoted model, in the caller's session.

    Without `force_new_gallery` only a backward-compatible child of the
    collection's serving model is accepted; the templates already stored stay
    and keep matching, because the child's probes were measured against its
    parent's templates. With it, an empty collection restarts on the new
    model alone. A model the collection already accepts changes nothing.

    Returns:
        The collection's serving model afterwards, or None when the gallery
        has no such collection (nothing to change here).

    Raises:
        ConflictError: Not a compatible child of the serving model, or
            `force_new_gallery` on a collection that holds templates.
    """
    collection = session.get(Collection, collection_id, with_for_update=True)
    if collection is None:
        return None
    if promotion.model_id in collection.accepted_model_ids:
        return collection.serving_model_id
    if force_new_gallery:
        _restart_collection(session, collection, promotion.model_id)
    else:
        _check_compatible_child(collection, promotion)
        collection.promoted.append(
            CollectionModel(
                model_id=promotion.model_id,
                parent_model_id=promotion.parent_model_id or "",
                promoted_at=utcnow(),
                cross_accuracy=promotion.cross_accuracy,
                parent_accuracy=promotion.parent_accuracy,
            )
        )
    audit.append_event(
        session,
        action="admin.collection.promote",
        actor=actor,
        details={
            "collection": collection_id,
            "model": promotion.model_id,
            "parent": promotion.parent_model_id,
            "new_gallery": force_new_gallery,
        },
    )
    logger.info("Collection %s now serves model %s", collection_id, promotion.model_id)
    return collection.serving_model_id


def _check_compatible_child(collection: Collection, promotion: Promotion) -> None:
    serving = collection.serving_model_id
    if promotion.parent_model_id != serving:
        raise ConflictError(
            f"Collection {collection.id!r} is served by model {serving}; "
            f"{promotion.model_id} was trained from {promotion.parent_model_id}, "
            "not from it, so its probes were never measured against these "
            f"templates. Train with --compat l2 from {serving}, or move an "
            "empty collection with force_new_gallery."
        )
    if not promotion.compatible:
        raise ConflictError(
            f"{promotion.model_id} is not backward-compatible with {serving}: "
            f"its probes matched {serving}'s templates with accuracy "
            f"{_percent(promotion.cross_accuracy)}, below the parent's own "
            f"{_percent(promotion.parent_accuracy)} on the sites' held-out pairs. "
            f"Collection {collection.id!r} keeps serving {serving}."
        )


def _restart_collection(
    session: Session, collection: Collection, model_id: str
) -> None:
    stored = _template_counts_by_model(session, collection.id)
    if stored:
        # In the order the collection took the models on (its first one first).
        taken = {m: i for i, m in enumerate(collection.accepted_model_ids)}
        models = sorted(stored, key=lambda m: (taken.get(m, len(taken)), m))
        held = ", ".join(f"{stored[model]} of {model}" for model in models)
        raise ConflictError(
            f"Collection {collection.id!r} holds {sum(stored.values())} "
            f"template(s) ({held}); force_new_gallery would put {model_id}'s "
            "templates beside them, and the two cannot be compared. Erase its "
            f"subjects first, or create a new collection for {model_id}."
        )
    collection.model_id = model_id
    collection.promoted.clear()


def _template_counts_by_model(session: Session, collection_id: str) -> dict[str, int]:
    """How many templates of each model a collection stores, by model id."""
    rows = session.execute(
        select(Template.model_id, func.count())
        .where(Template.collection_id == collection_id)
        .group_by(Template.model_id)
    )
    return {str(model): int(count) for model, count in rows}


def _percent(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.1f}%"


def _consent_dict(consent: Consent) -> dict[str, Any]:
    return {
        "purpose": consent.purpose,
        "lawful_basis": consent.lawful_basis,
        "consent_text_version": consent.consent_text_version,
        "given_at": as_utc(consent.given_at).isoformat(),
        "retention_days": consent.retention_days,
        "expires_at": as_utc(consent.expires_at).isoformat(),
    }


__all__ = ["DecryptionError", "GalleryService", "Promotion", "accept_promotion"]
