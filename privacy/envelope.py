"""Envelope encryption of templates: per-subject data keys wrapped by a master key.

Every template at rest is sealed with AES-256-GCM (NIST SP 800-38D) under a
random 256-bit data key that belongs to one subject. The data key itself is
stored only in wrapped form, sealed by a master key that lives outside the
database (a file, an environment variable, or a KMS behind `KeyWrapper`).
Erasing a subject destroys its wrapped data key: every copy of its templates,
including those in database backups taken earlier, becomes unreadable
(crypto-shredding), because nothing can rebuild the data key.

Sealed values carry a one-byte format version and a 96-bit random nonce:
``version || nonce || ciphertext+tag``. The associated data binds a sealed
value to its context (for templates: the subject and template ids), so a
ciphertext moved to another row does not decrypt.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from facefed.core.errors import ConfigurationError, FacefedError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
_FORMAT_VERSION = b"\x01"


class DecryptionError(FacefedError):
    """Raised when a sealed value does not open: wrong key, tampering, shredding."""

    exit_code = 6


@runtime_checkable
class KeyWrapper(Protocol):
    """Wraps and unwraps data keys; implement it for a KMS or an HSM.

    Attributes:
        key_id: A stable, non-secret name of the master key, stored beside
            every wrapped key so a rotation can tell which master sealed it.
    """

    key_id: str

    def wrap(self, data_key: bytes, *, context: bytes) -> bytes:
        """Return `data_key` sealed by the master key, bound to `context`."""
        ...

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        """Return the data key sealed by `wrap`; raise DecryptionError otherwise."""
        ...


def generate_data_key() -> bytes:
    """Return a fresh random 256-bit key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt and authenticate `plaintext` with AES-256-GCM under `key`.

    Args:
        key: A 32-byte key.
        plaintext: The bytes to protect.
        associated_data: Context bound to the ciphertext (not secret, not stored).

    Returns:
        ``version || nonce || ciphertext || tag``.
    """
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return (
        _FORMAT_VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)
    )


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt a value made by `seal`, checking its tag and associated data.

    Raises:
        DecryptionError: The key, the associated data or the bytes do not match.
    """
    _check_key(key)
    if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != _FORMAT_VERSION:
        raise DecryptionError("The sealed value is truncated or of an unknown format.")
    nonce = sealed[1 : 1 + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, sealed[1 + NONCE_BYTES :], associated_data)
    except InvalidTag as error:
        raise DecryptionError(
            "The sealed value does not open with this key and context: it was "
            "tampered with, moved, or its key was destroyed."
        ) from error


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"An AES-256 key has {KEY_BYTES} bytes; this one has {len(key)}."
        )


class LocalKeyWrapper:
    """A `KeyWrapper` holding the master key in process memory (AES-256-GCM).

    Args:
        master_key: The 32-byte master key.
        key_id: Non-secret name of the master key; defaults to a fingerprint
            that does not reveal the key (a GCM seal of nothing, truncated).
    """

    def __init__(self, master_key: bytes, *, key_id: str | None = None) -> None:
        _check_key(master_key)
        self._master_key = master_key
        self.key_id = key_id or _fingerprint(master_key)

    def wrap(self, data_key: bytes, *, context: bytes) -> bytes:
        """Seal `data_key` under the master key, bound to `context`."""
        return seal(self._master_key, data_key, associated_data=b"wrap|" + context)

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        """Open a key sealed by `wrap` with the same `context`."""
        return open_sealed(
            self._master_key, wrapped, associated_data=b"wrap|" + context
        )


def _fingerprint(master_key: bytes) -> str:
    import hashlib

    digest = hashlib.sha256(b"facefed-master-key-id|" + master_key).hexdigest()
    return f"local:{digest[:16]}"


def decode_master_key(text: str) -> bytes:
    """Decode a master key written as base64 (44 characters) or hex (64).

    Raises:
        ConfigurationError: The text does not decode to 32 bytes.
    """
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 2 * KEY_BYTES else None
        if key is None:
            key = base64.b64decode(text, validate=True)
    except ValueError as error:
        raise ConfigurationError(
            "The master key must be 32 bytes written as base64 or hex; it could "
            "not be decoded."
        ) from error
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"The master key must be {KEY_BYTES} bytes; it decodes to {len(key)}."
        )
    return key


def encode_master_key(key: bytes) -> str:
    """Return the base64 form of a master key, as `decode_master_key` reads it."""
    _check_key(key)
    return base64.b64encode(key).decode("ascii")


def load_or_create_master_key(
    *,
    key_text: str | None,
    key_file: Path | None,
    dev_file: Path,
    development: bool,
) -> bytes:
    """Find the master key from settings, or make one in development mode.

    Args:
        key_text: The key itself (from an environment variable), if given.
        key_file: A file holding the key, if given.
        dev_file: Where development mode keeps a generated key.
        development: Whether a missing key may be generated.

    Returns:
        The 32-byte master key.

    Raises:
        ConfigurationError: No key is configured outside development mode, or
            the configured one is unreadable.
    """
    if key_text:
        return decode_master_key(key_text)
    if key_file is not None:
        try:
            return decode_master_key(key_file.read_text())
        except OSError as error:
            raise ConfigurationError(
                f"The master key file {key_file} cannot be read: {error}."
            ) from error
    if not development:
        raise ConfigurationError(
            "No master key is configured: set FACEFED_MASTER_KEY or "
            "FACEFED_MASTER_KEY_FILE (32 bytes, base64), or run in development "
            "mode (FACEFED_DEV_MODE=1)."
        )
    if dev_file.exists():
        return decode_master_key(dev_file.read_text())
    key = generate_data_key()
    dev_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(dev_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(encode_master_key(key) + "\n")
    logger.warning(
        "Development mode: generated a master key in %s; configure "
        "FACEFED_MASTER_KEY_FILE for any real deployment.",
        dev_file,
    )
    return key
