"""API keys and subject tokens: random, shown once, stored as SHA-256.

Keys and tokens are 256 bits from `secrets`. A fast hash is enough to store
them: with 2**256 possible keys, a stolen hash cannot be reversed by guessing,
so a slow password hash (bcrypt, Argon2) would only cost every request time
without adding security. Lookups go by the hash, and the stored hash is then
compared again in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "site", "subject"]

API_KEY_PREFIX = "ffk_"
SUBJECT_TOKEN_PREFIX = "ffs_"  # noqa: S105 (a prefix, not a secret)


def new_secret(prefix: str) -> str:
    """Return a fresh credential: a prefix and 256 random bits, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Return the hex SHA-256 of a credential, as stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same_hash(stored: str, presented: str) -> bool:
    """Compare a stored hash with a presented credential's hash in constant time."""
    return hmac.compare_digest(stored.encode(), hash_secret(presented).encode())


@dataclass(frozen=True)
class Principal:
    """Who is calling.

    Attributes:
        role: ``admin``, ``site`` or ``subject``.
        key_id: The API key's id (admin, site) or None (subject).
        site_id: The site of a site key.
        subject_id: The subject of a subject token.
    """

    role: Role
    key_id: str | None = None
    site_id: str | None = None
    subject_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names the caller (never a subject id)."""
        if self.role == "subject":
            return "subject"
        return f"{self.role}:{self.key_id}"
