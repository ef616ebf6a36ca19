"""Erasure receipts signed with the server's Ed25519 key (RFC 8032).

A receipt is a JSON object; its signature covers the canonical JSON (sorted
keys, no spaces) of every field but `signature`. Anyone holding the public
key from `/v1/receipts/public-key` can check a receipt with `verify_receipt`.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from facefed.core.errors import ConfigurationError


def _signed_bytes(receipt: dict[str, Any]) -> bytes:
    body = {name: value for name, value in receipt.items() if name != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class ReceiptSigner:
    """Signs receipts with one Ed25519 private key.

    Args:
        private_key: The raw 32-byte Ed25519 private key.
    """

    def __init__(self, private_key: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private_key)

    @staticmethod
    def generate_private_key() -> bytes:
        """Return a fresh raw Ed25519 private key (32 bytes)."""
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_key_pem(self) -> str:
        """The public key, PEM (SubjectPublicKeyInfo)."""
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            .decode("ascii")
        )

    def sign(self, receipt: dict[str, Any]) -> dict[str, Any]:
        """Return the receipt with a base64 `signature` field added."""
        signature = self._key.sign(_signed_bytes(receipt))
        return {**receipt, "signature": base64.b64encode(signature).decode("ascii")}


def verify_receipt(receipt: dict[str, Any], public_key_pem: str) -> bool:
    """Check a receipt's signature against the server's public key.

    Args:
        receipt: The receipt as returned by the server (with `signature`).
        public_key_pem: The PEM from `/v1/receipts/public-key`.

    Returns:
        True when the signature is valid for exactly these fields.

    Raises:
        ConfigurationError: The public key is not an Ed25519 PEM key.
    """
    try:
        key = serialization.load_pem_public_key(public_key_pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError("The receipt public key is not a PEM key.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError("The receipt public key is not an Ed25519 key.")
    signature = receipt.get("signature")
    if not isinstance(signature, str):
        return False
    try:
        key.verify(base64.b64decode(signature), _signed_bytes(receipt))
    except (InvalidSignature, ValueError):
        return False
    return True


def public_key_pem_from_text(text: str) -> str:
    """Return the PEM from a public key file's text: PEM or the endpoint's JSON.

    `/v1/receipts/public-key` answers `{"algorithm", "public_key_pem"}`; a user
    may save that answer as it is or only the PEM inside it.

    Args:
        text: The file's text.

    Returns:
        The PEM text (not yet parsed; `verify_receipt` checks it).

    Raises:
        ConfigurationError: The text is JSON without a string `public_key_pem`.
    """
    stripped = text.strip()
    if not stripped.startswith("{"):
        return stripped
    try:
        document = json.loads(stripped)
    except json.JSONDecodeError:
        raise ConfigurationError(
            "The public key file is neither a PEM key nor valid JSON."
        ) from None
    pem = document.get("public_key_pem") if isinstance(document, dict) else None
    if not isinstance(pem, str):
        raise ConfigurationError(
            "The public key JSON has no string field 'public_key_pem'."
        )
    return pem
