"""Database schema (SQLAlchemy 2 ORM), engines, sessions and Alembic migrations.

The schema is created and upgraded only by the Alembic migrations in
`server/migrations/` (run at start-up); the classes here describe it for the
ORM. Subject data keys live apart, in the key vault (`server/vault.py`), so
that a copy of this database never holds what decrypts its templates.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from facefed.core.errors import NotFoundError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# SQLite only auto-increments a column declared INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """Return `moment` as aware UTC (SQLite hands back naive datetimes)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class Base(DeclarativeBase):
    """Declarative base of every table of the server database."""


class Site(Base):
    """A branch site that enrolls and identifies through the API."""

    __tablename__ = "sites"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiKey(Base):
    """An API key; only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    role: Mapped[str] = mapped_column(String(16))
    site_id: Mapped[str | None] = mapped_column(
        ForeignKey("sites.id", ondelete="CASCADE"), nullable=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )


class Collection(Base):
    """A gallery of templates under one protection scheme.

    `model_id` is the model its first templates were made with; models
    promoted to it since (`promoted`, oldest first) are backward-compatible
    descendants whose templates it accepts as well.
    """

    __tablename__ = "collections"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128))
    scheme: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    key_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Loaded with the collection: every template check needs them, often
    # after the session that read the collection has closed.
    promoted: Mapped[list[CollectionModel]] = relationship(
        lazy="selectin",
        order_by="CollectionModel.promoted_at",
        cascade="all, delete-orphan",
    )

    @property
    def serving_model_id(self) -> str:
        """The model sites should embed with now: the latest promoted one."""
        return self.promoted[-1].model_id if self.promoted else self.model_id

    @property
    def accepted_model_ids(self) -> list[str]:
        """Models whose templates the collection takes, oldest first."""
        return [self.model_id, *(row.model_id for row in self.promoted)]


class CollectionModel(Base):
    """A model promoted to a collection, with the compatibility it was measured at.

    Only a backward-compatible child of the collection's serving model is
    promoted (`server.service.accept_promotion`): its probes were measured to
    match the parent's templates at least as accurately as the parent's own
    probes do (on the training sites' held-out pairs).
    """

    __tablename__ = "collection_models"

    collection_id: Mapped[str] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    parent_model_id: Mapped[str] = mapped_column(String(128))
    promoted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cross_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    parent_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)


class Subject(Base):
    """An enrolled person, known only by a random id and the site that enrolled them."""

    __tablename__ = "subjects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    collection_id: Mapped[str] = mapped_column(ForeignKey("collections.id"), index=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    external_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Template(Base):
    """A protected template, AES-256-GCM sealed under its subject's data key."""

    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    subject_id: Mapped[str] = mapped_column(
        ForeignKey("subjects.id", ondelete="CASCADE"), index=True
    )
    collection_id: Mapped[str] = mapped_column(String(64), index=True)
    # The model that made this template (the collection's, or one promoted to it).
    model_id: Mapped[str] = mapped_column(String(128))
    scheme: Mapped[str] = mapped_column(String(64))
    key_version: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Consent(Base):
    """The consent record given at enrollment (GDPR Art. 6, 7 and 9)."""

    __tablename__ = "consents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject_id: Mapped[str] = mapped_column(
        ForeignKey("subjects.id", ondelete="CASCADE"), index=True
    )
    purpose: Mapped[str] = mapped_column(String(500))
    lawful_basis: Mapped[str] = mapped_column(String(64))
    consent_text_version: Mapped[str] = mapped_column(String(64))
    given_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retention_days: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AuditEvent(Base):
    """One append-only, hash-chained audit event (never personal data)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    at: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(100))
    site_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain head (last sequence number and hash), locked while appending."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class ErasedSubject(Base):
    """Tombstone of an erased subject: the SHA-256 of its id, to answer 410."""

    __tablename__ = "erased_subjects"

    subject_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelVersion(Base):
    """A published embedding model (rows written by federated training)."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(32))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    onnx_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    weights_path: Mapped[str | None] = mapped_column(Text, nullable=True)


class TrainingRun(Base):
    """A federated training run (rows written by federated training)."""

    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    rounds: Mapped[int] = mapped_column(Integer)
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    epsilon: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_version_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )


class ProtectionKey(Base):
    """A versioned template-protection key, stored wrapped by the master key."""

    __tablename__ = "protection_keys"
    __table_args__ = (UniqueConstraint("scheme", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    scheme: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    wrapped_secret: Mapped[bytes] = mapped_column(LargeBinary)
    master_key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )


class HeContext(Base):
    """A site's public CKKS context (no secret key), for encrypted matching."""

    __tablename__ = "he_contexts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IdempotencyRecord(Base):
    """The answer to an idempotent request, sealed under the idempotency key.

    Only a caller holding the idempotency key can open the stored answer (it
    may hold a subject token, shown once); records expire after a day and go
    with their subject on erasure.
    """

    __tablename__ = "idempotency_records"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str | None] = mapped_column(
        String(64), nullable=True, index=True
    )
    sealed_response: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ServerSecret(Base):
    """A server secret (the receipt signing key), wrapped by the master key."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def sqlite_path(url: str) -> Path | None:
    """Return the file of a SQLite URL, or None (another database, or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str, *, create: bool = True) -> Engine:
    """Create an engine; SQLite gets foreign keys on, a busy timeout, 0600 files.

    Args:
        url: SQLAlchemy URL.
        create: When False, a SQLite file that does not exist is an error
            instead of being created (for read-only checks such as
            `facefed admin audit-verify`, where an empty new database would
            give a false all-clear).

    Raises:
        NotFoundError: `create` is False and the SQLite file does not exist.
    """
    path = sqlite_path(url)
    if path is not None:
        _prepare_sqlite_file(path, create=create)
    is_sqlite = url.startswith("sqlite")
    connect_args: dict[str, Any] = (
        {"check_same_thread": False, "timeout": 30} if is_sqlite else {}
    )
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    if path is not None:
        event.listen(engine, "connect", lambda *_: _restrict_sqlite_files(path))
    return engine


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    # Overwrite deleted rows instead of leaving them in free pages: erased
    # subjects' rows and data keys must not linger in the file.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _prepare_sqlite_file(path: Path, *, create: bool) -> None:
    if path.exists():
        return
    if not create:
        raise NotFoundError(f"The SQLite database {path} does not exist.")
    # SQLite gives its -wal, -shm and journal files the database file's mode,
    # so creating the database 0600 first keeps every side file 0600 too.
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _restrict_sqlite_files(path: Path) -> None:
    # Files made before the database was created 0600 (older installs, or a
    # database created by another tool) are tightened on every connection.
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        side = path.with_name(name)
        try:
            if side.stat().st_mode & 0o077:
                side.chmod(0o600)
        except FileNotFoundError:
            continue


def flush_deleted(engine: Engine) -> None:
    """Move SQLite's write-ahead log into the database and empty it.

    A deleted row stays in the WAL file until a checkpoint; after an erasure
    the subject's rows and wrapped data key must leave the disk now, not at
    some later automatic checkpoint. No-op on other databases.
    """
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# Any fixed 64-bit key: PostgreSQL advisory locks are named by a number.
_SCHEMA_LOCK_KEY = 0x66616365666564  # "facefed"


@contextmanager
def schema_lock(engine: Engine) -> Iterator[Connection]:
    """Yield a connection in a transaction that holds the schema-change lock.

    Two processes started together on a fresh database (`facefed serve &`
    then `facefed admin create-key`) would otherwise both create the tables
    and one would fail with "table already exists". On SQLite an exclusive
    `flock` on a file beside the database serialises them (pysqlite runs DDL
    outside the transaction, so a SQLite lock alone does not); on PostgreSQL a
    transaction-level advisory lock, released at commit.
    """
    path = sqlite_path(str(engine.url))
    with ExitStack() as stack:
        if path is not None:
            lock_path = path.with_name(f"{path.name}.lock")
            descriptor = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            stack.callback(os.close, descriptor)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, descriptor, fcntl.LOCK_UN)
        connection = stack.enter_context(engine.begin())
        if engine.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
            )
        yield connection


def run_migrations(engine: Engine) -> None:
    """Upgrade the database to the newest Alembic revision (idempotent).

    Safe to run from several processes at once: see `schema_lock`.
    """
    from alembic import command
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with schema_lock(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    logger.debug("Database schema is at the newest migration")
