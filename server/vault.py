"""The key vault: per-subject data keys, wrapped by the master key, kept apart.

Data keys are stored in their own database (`FACEFED_KEY_VAULT_URL`, by
default a SQLite file beside the main one), never in the main database: a
backup of the main database then holds templates without the keys that open
them, and destroying a subject's key here makes every copy of its templates
unreadable (crypto-shredding). A KMS can replace this store by implementing
the same three calls.

FIXME: a backup of the vault taken before an erasure still holds the wrapped
key; keep vault backups short-lived (or none: losing the vault loses only
templates, which sites can re-enroll), or use a KMS whose key deletion is final.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import DateTime, LargeBinary, String, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from facefed.privacy.envelope import DecryptionError, KeyWrapper, generate_data_key
from facefed.server.db import (
    flush_deleted,
    make_engine,
    make_session_factory,
    schema_lock,
    session_scope,
    utcnow,
)

logger = logging.getLogger(__name__)


class _VaultBase(DeclarativeBase):
    pass


class SubjectKey(_VaultBase):
    """A subject's wrapped data key."""

    __tablename__ = "subject_keys"

    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    master_key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KeyVault:
    """Creates, reads and destroys per-subject data keys.

    Args:
        url: SQLAlchemy URL of the vault database.
        wrapper: The master-key wrapper that seals every data key.
    """

    def __init__(self, url: str, *, wrapper: KeyWrapper) -> None:
        self.engine: Engine = make_engine(url)
        # One table whose shape never changes; created directly rather than
        # through the main database's migrations, because it lives elsewhere.
        # Under the schema lock: two processes starting on a fresh vault
        # would otherwise both try to create the table.
        with schema_lock(self.engine) as connection:
            _VaultBase.metadata.create_all(connection)
        self._sessions = make_session_factory(self.engine)
        self._wrapper = wrapper

    @staticmethod
    def _context(subject_id: str) -> bytes:
        return b"subject-key|" + subject_id.encode()

    def create(self, subject_id: str) -> bytes:
        """Make, store and return a fresh data key for a new subject."""
        key = generate_data_key()
        wrapped = self._wrapper.wrap(key, context=self._context(subject_id))
        with session_scope(self._sessions) as session:
            session.add(
                SubjectKey(
                    subject_id=subject_id,
                    wrapped_key=wrapped,
                    master_key_id=self._wrapper.key_id,
                    created_at=utcnow(),
                )
            )
        return key

    def get(self, subject_id: str) -> bytes:
        """Return a subject's data key.

        Raises:
            DecryptionError: The key was destroyed or cannot be unwrapped.
        """
        with session_scope(self._sessions) as session:
            row = session.get(SubjectKey, subject_id)
            if row is None:
                raise DecryptionError(
                    "This subject has no data key: it was erased (crypto-shredded)."
                )
            return self._wrapper.unwrap(
                row.wrapped_key, context=self._context(subject_id)
            )

    def get_many(self, subject_ids: list[str]) -> dict[str, bytes]:
        """Return the data keys of the subjects that still have one."""
        keys: dict[str, bytes] = {}
        with session_scope(self._sessions) as session:
            for start in range(0, len(subject_ids), 500):
                chunk = subject_ids[start : start + 500]
                rows = session.scalars(
                    select(SubjectKey).where(SubjectKey.subject_id.in_(chunk))
                )
                for row in rows:
                    keys[row.subject_id] = self._wrapper.unwrap(
                        row.wrapped_key, context=self._context(row.subject_id)
                    )
        return keys

    def destroy(self, subject_id: str) -> bool:
        """Delete a subject's data key for good; return whether one existed."""
        with session_scope(self._sessions) as session:
            result = session.execute(
                delete(SubjectKey).where(SubjectKey.subject_id == subject_id)
            )
            existed = bool(result.rowcount)
        flush_deleted(self.engine)
        return existed

    def subject_ids(self) -> set[str]:
        """Return the ids of every subject that has a key."""
        with session_scope(self._sessions) as session:
            return set(session.scalars(select(SubjectKey.subject_id)))

    def close(self) -> None:
        """Release the vault's connections."""
        self.engine.dispose()


__all__ = ["DecryptionError", "KeyVault", "SubjectKey"]
