"""Keyed template protection schemes (ISO/IEC 24745) and their registry.

A protection scheme turns a face embedding into a protected template with a
secret key. ISO/IEC 24745 asks three things of protected templates:

* irreversibility: the template should not give back the embedding;
* unlinkability: templates of one person under two keys should not be
  matchable to each other (measured with D<->sys, see `unlinkability.py`);
* renewability: a leaked template is revoked by issuing a new key.

Two schemes are registered:

* ``orthonormal-v1`` multiplies the unit-length embedding by a d x d
  orthonormal matrix derived from the key. Inner products, and so cosine
  scores and accuracy, are exactly those of the raw embeddings; the gallery
  is searched with a Faiss inner-product index. It is NOT irreversible on its
  own: whoever holds the key rebuilds the matrix and multiplies by its
  transpose, getting the embedding back exactly. What it does give is
  unlinkability across keys (two random rotations make scores between keys
  look like scores between strangers) and renewability without re-enrollment
  (`rotation.py` moves a gallery to a new key with R_new @ R_old.T). Its
  protection therefore rests on the key staying secret and apart from the
  templates (the server's key vault, the sites, the admin).
* ``biohash-v1`` projects the unit-length embedding on 512 keyed Gaussian
  directions and keeps only the signs (BioHashing, Teoh et al., 2004, here
  with more bits than dimensions, the random-hyperplane hash of Charikar,
  2002). The magnitudes are thrown away, so the embedding cannot be
  recovered exactly even with the key; but it can be closely: on LFW a MAP
  attack with the key and a prior from other people's embeddings reaches
  cosine 0.98, accepted by the raw system 98% of the time (`facefed eval
  privacy`). Without the key the attack fails. Templates are
  packed bits searched in Hamming distance with Faiss binary indexes. The
  probability that one bit differs is angle / pi, so cos(pi * hamming / bits)
  is an unbiased-in-angle estimate of the cosine score, which keeps scores
  comparable with the float schemes at a small accuracy cost. Re-keying needs
  the embeddings, so rotation means re-enrollment.

Keys are derived into matrices with HKDF-SHA256 (RFC 5869), so one 32-byte
secret fixes the transform for every embedding size.
"""

import base64
import binascii
import hashlib
import logging
import random
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from facefed.core.errors import ProtectionError, TemplateError

logger = logging.getLogger(__name__)

TemplateKind = Literal["float", "binary"]

SECRET_BYTES = 32
"""Length of a freshly generated key secret (256 bits)."""

MIN_SECRET_BYTES = 16
"""Shortest secret accepted from outside (128 bits)."""

MAX_EMBEDDING_DIM = 4096
"""Largest embedding a scheme accepts; bounds the keyed matrices' memory."""


@dataclass(frozen=True)
class ProtectionKey:
    """A secret key of one protection scheme, identified by a version number.

    The secret never appears in `repr`, logs or error messages; `fingerprint`
    identifies a key without revealing it.

    Attributes:
        scheme_id: Registered scheme the key belongs to.
        version: Key version, 1 or more; templates carry it so that a gallery
            never compares templates made under different keys.
        secret: The key material (at least 16 bytes, 32 when generated).
    """

    scheme_id: str
    version: int
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        get_scheme(self.scheme_id)
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise ProtectionError(
                f"A key version must be an integer, got {self.version!r}."
            )
        if self.version < 1:
            raise ProtectionError(
                f"A key version must be 1 or more, got {self.version}."
            )
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_BYTES:
            length = len(self.secret) if isinstance(self.secret, bytes) else "no"
            raise ProtectionError(
                f"A key secret must be at least {MIN_SECRET_BYTES} bytes, got "
                f"{length} bytes."
            )

    @property
    def fingerprint(self) -> str:
        """Short public identifier of the key (SHA-256 of scheme, version, secret)."""
        digest = hashlib.sha256(
            f"{self.scheme_id}:{self.version}:".encode() + self.secret
        ).hexdigest()
        return digest[:16]

    def to_dict(self) -> dict[str, Any]:
        """Serialise the key, secret included, for the key service's storage."""
        return {
            "scheme": self.scheme_id,
            "version": self.version,
            "secret": base64.b64encode(self.secret).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ProtectionKey":
        """Read a key written by `to_dict`, refusing anything malformed.

        Raises:
            ProtectionError: When a field is missing, of the wrong type, or the
                scheme is unknown.
        """
        if not isinstance(data, dict):
            raise ProtectionError(
                f"A key must be a JSON object, got {type(data).__name__}."
            )
        missing = sorted({"scheme", "version", "secret"} - set(data))
        if missing:
            raise ProtectionError(f"A key lacks the fields {missing}.")
        if not isinstance(data["scheme"], str) or not isinstance(data["secret"], str):
            raise ProtectionError("A key's scheme and secret must be strings.")
        try:
            secret = base64.b64decode(data["secret"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise ProtectionError("A key's secret is not valid base64.") from error
        return cls(data["scheme"], data["version"], secret)


def generate_key(
    scheme_id: str, version: int, *, rng: random.Random | None = None
) -> ProtectionKey:
    """Create a new key with a 256-bit secret from the operating system.

    Args:
        scheme_id: Registered scheme the key is for.
        version: Version number of the new key.
        rng: Source of randomness; the operating system's (`secrets`) by
            default. Tests may pass a seeded `random.Random`.

    Returns:
        The new key.
    """
    if rng is None:
        secret = secrets.token_bytes(SECRET_BYTES)
    else:
        secret = rng.randbytes(SECRET_BYTES)
    key = ProtectionKey(scheme_id, version, secret)
    logger.info("generated %s key version %d (%s)", scheme_id, version, key.fingerprint)
    return key


def _derive_seed(key: ProtectionKey, purpose: str, dim: int) -> np.random.Generator:
    """Expand the key into a numpy Generator seed with HKDF-SHA256 (RFC 5869)."""
    info = f"facefed/{key.scheme_id}/v{key.version}/{purpose}/{dim}".encode()
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        key.secret
    )
    return np.random.Generator(np.random.PCG64(int.from_bytes(okm, "little")))


def _as_embedding_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Validate embeddings and return them as a unit-length float64 (N, d) matrix."""
    array = np.asarray(embeddings)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise TemplateError(
            f"Embeddings must be a vector or an (N, d) matrix, got shape {array.shape}."
        )
    if array.shape[1] > MAX_EMBEDDING_DIM:
        raise TemplateError(
            f"Embeddings of {array.shape[1]} dimensions exceed the limit of "
            f"{MAX_EMBEDDING_DIM}."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise TemplateError(f"Embeddings must be floating point, got {array.dtype}.")
    matrix = array.astype(np.float64)
    if not np.all(np.isfinite(matrix)):
        raise TemplateError("Embeddings contain NaN or infinite values.")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise TemplateError("An embedding is all zeros and has no direction.")
    return matrix / norms


class ProtectionScheme(ABC):
    """A keyed transform from embeddings to protected templates.

    Attributes:
        scheme_id: Registry name, carried by every template.
        kind: ``float`` templates are float32 vectors compared with cosine;
            ``binary`` ones are packed bits compared in Hamming distance.
        irreversible: Whether the key holder still cannot recover the embedding
            exactly.
        rekeyable: Whether a gallery can move to a new key without the
            embeddings (see `rotation.py`).
    """

    scheme_id: str
    kind: TemplateKind
    irreversible: bool
    rekeyable: bool

    @abstractmethod
    def output_dim(self, input_dim: int) -> int:
        """Number of floats (or bits) in a template made from `input_dim` values."""

    @abstractmethod
    def protect(self, embeddings: np.ndarray, key: ProtectionKey) -> np.ndarray:
        """Protect one embedding (d,) or a batch (N, d) under `key`.

        Returns:
            float32 (N, m) for float schemes; uint8 (N, m / 8) packed bits
            (`np.packbits` order) for binary schemes. Always 2-D.
        """

    @abstractmethod
    def similarity(self, probe: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """Scores of one protected probe against (N, ...) protected templates.

        Scores estimate the cosine similarity of the raw embeddings, so one
        threshold serves every scheme.
        """

    def check_key(self, key: ProtectionKey) -> None:
        """Refuse a key made for another scheme."""
        if key.scheme_id != self.scheme_id:
            raise ProtectionError(
                f"A {key.scheme_id!r} key cannot be used with scheme "
                f"{self.scheme_id!r}."
            )


@lru_cache(maxsize=32)
def _orthonormal_matrix(key: ProtectionKey, dim: int) -> np.ndarray:
    generator = _derive_seed(key, "orthonormal", dim)
    gaussian = generator.standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    # Fixing the signs of R's diagonal makes Q Haar-distributed (Mezzadri, 2007).
    return q * np.sign(np.diag(r))[None, :]


def orthonormal_matrix(key: ProtectionKey, dim: int) -> np.ndarray:
    """The d x d orthonormal matrix R of an ``orthonormal-v1`` key (float64).

    Derived from the key by HKDF-SHA256 -> PCG64 -> Gaussian matrix -> QR with
    the sign of R's diagonal folded into Q, which makes the matrix uniformly
    (Haar) distributed over the orthogonal group (Mezzadri, 2007, "How to
    generate random matrices from the classical compact groups").
    """
    get_scheme("orthonormal-v1").check_key(key)
    if not 0 < dim <= MAX_EMBEDDING_DIM:
        raise TemplateError(
            f"An embedding size must be 1..{MAX_EMBEDDING_DIM}, got {dim}."
        )
    matrix = _orthonormal_matrix(key, dim)
    matrix.flags.writeable = False
    return matrix


class OrthonormalScheme(ProtectionScheme):
    """``orthonormal-v1``: y = R x for unit-length x; scores are exact cosines."""

    scheme_id = "orthonormal-v1"
    kind: TemplateKind = "float"
    irreversible = False
    rekeyable = True

    def output_dim(self, input_dim: int) -> int:
        """A rotation keeps the dimension."""
        return input_dim

    def protect(self, embeddings: np.ndarray, key: ProtectionKey) -> np.ndarray:
        """Rotate the unit-length embeddings with the key's matrix."""
        self.check_key(key)
        matrix = _as_embedding_matrix(embeddings)
        rotation = orthonormal_matrix(key, matrix.shape[1])
        return (matrix @ rotation.T).astype(np.float32)

    def similarity(self, probe: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """Cosine similarity (inner product of unit vectors)."""
        gallery_matrix = np.atleast_2d(np.asarray(gallery, dtype=np.float32))
        probe_vector = np.asarray(probe, dtype=np.float32).reshape(-1)
        if gallery_matrix.shape[1] != probe_vector.shape[0]:
            raise TemplateError(
                f"A probe of {probe_vector.shape[0]} values cannot be compared with "
                f"templates of {gallery_matrix.shape[1]}."
            )
        scores = gallery_matrix @ probe_vector
        norms = np.linalg.norm(gallery_matrix, axis=1) * np.linalg.norm(probe_vector)
        return (scores / np.maximum(norms, 1e-12)).astype(np.float32)


class BioHashScheme(ProtectionScheme):
    """``biohash-v1``: 512 signs of keyed Gaussian projections, packed in bits.

    Attributes:
        bits: Number of projections (template bits).
    """

    scheme_id = "biohash-v1"
    kind: TemplateKind = "binary"
    irreversible = True
    rekeyable = False
    bits = 512

    def output_dim(self, input_dim: int) -> int:
        """Always `bits`, whatever the embedding size."""
        return self.bits

    def projection(self, key: ProtectionKey, dim: int) -> np.ndarray:
        """The keyed (bits, d) Gaussian projection matrix (float64)."""
        self.check_key(key)
        return _derive_seed(key, "projection", dim).standard_normal((self.bits, dim))

    def protect(self, embeddings: np.ndarray, key: ProtectionKey) -> np.ndarray:
        """Project on the keyed directions and keep the signs as packed bits."""
        self.check_key(key)
        matrix = _as_embedding_matrix(embeddings)
        projected = matrix @ self.projection(key, matrix.shape[1]).T
        return np.packbits(projected > 0, axis=1)

    def similarity(self, probe: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """cos(pi * hamming / bits): Charikar's (2002) angle estimate, as a cosine."""
        return similarity_from_hamming(hamming_distances(probe, gallery), self.bits)


def hamming_distances(probe: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Hamming distances between one packed-bit probe and (N, bytes) templates."""
    gallery_bytes = np.atleast_2d(np.asarray(gallery, dtype=np.uint8))
    probe_bytes = np.asarray(probe, dtype=np.uint8).reshape(-1)
    if gallery_bytes.shape[1] != probe_bytes.shape[0]:
        raise TemplateError(
            f"A probe of {probe_bytes.shape[0] * 8} bits cannot be compared with "
            f"templates of {gallery_bytes.shape[1] * 8} bits."
        )
    differing = np.bitwise_xor(gallery_bytes, probe_bytes[None, :])
    return np.unpackbits(differing, axis=1).sum(axis=1).astype(np.int64)


def similarity_from_hamming(distances: np.ndarray, bits: int) -> np.ndarray:
    """Map Hamming distances to cosine estimates, cos(pi * h / bits).

    For random hyperplanes the chance that a bit differs equals the angle
    between the embeddings over pi (Charikar, 2002, "Similarity estimation
    techniques from rounding algorithms"), so this recovers the cosine score
    scale of the float schemes. Faiss binary indexes return the distances.
    """
    return np.cos(np.pi * np.asarray(distances, dtype=np.float64) / bits).astype(
        np.float32
    )


_SCHEMES: dict[str, ProtectionScheme] = {
    scheme.scheme_id: scheme for scheme in (OrthonormalScheme(), BioHashScheme())
}


def known_schemes() -> list[str]:
    """Ids of every registered protection scheme, sorted."""
    return sorted(_SCHEMES)


def get_scheme(scheme_id: str) -> ProtectionScheme:
    """Return the registered scheme called `scheme_id`.

    Raises:
        ProtectionError: When no scheme has that id; the message names them.
    """
    try:
        return _SCHEMES[scheme_id]
    except (KeyError, TypeError):
        raise ProtectionError(
            f"Unknown protection scheme {scheme_id!r}; known schemes: "
            f"{', '.join(known_schemes())}."
        ) from None


def protect(embeddings: np.ndarray, key: ProtectionKey) -> np.ndarray:
    """Protect embeddings (d,) or (N, d) with the key's scheme; always 2-D."""
    return get_scheme(key.scheme_id).protect(embeddings, key)


class KeyRing:
    """The versions of each scheme's key that a party holds.

    The site agent keeps one to protect templates; the admin's machine keeps
    one to compute rotation transforms. Unknown schemes and versions are
    refused with the known ones named.
    """

    def __init__(self, keys: list[ProtectionKey] | None = None) -> None:
        self._keys: dict[tuple[str, int], ProtectionKey] = {}
        for key in keys or []:
            self.add(key)

    def add(self, key: ProtectionKey) -> None:
        """Add a key; refuse a second, different key under the same version."""
        existing = self._keys.get((key.scheme_id, key.version))
        if existing is not None and existing.secret != key.secret:
            raise ProtectionError(
                f"Key version {key.version} of {key.scheme_id!r} already exists "
                "with another secret."
            )
        self._keys[(key.scheme_id, key.version)] = key

    def versions(self, scheme_id: str) -> list[int]:
        """Key versions held for a scheme, ascending."""
        get_scheme(scheme_id)
        return sorted(v for s, v in self._keys if s == scheme_id)

    def get(self, scheme_id: str, version: int | None = None) -> ProtectionKey:
        """Return a key; the newest version when `version` is None.

        Raises:
            ProtectionError: For an unknown scheme or key version.
        """
        versions = self.versions(scheme_id)
        if not versions:
            raise ProtectionError(f"No key is held for scheme {scheme_id!r}.")
        wanted = versions[-1] if version is None else version
        key = self._keys.get((scheme_id, wanted))
        if key is None:
            raise ProtectionError(
                f"Unknown key version {version!r} of scheme {scheme_id!r}; known "
                f"versions: {', '.join(map(str, versions))}."
            )
        return key

    def to_list(self) -> list[dict[str, Any]]:
        """Serialise every key (secrets included) for encrypted storage."""
        return [self._keys[k].to_dict() for k in sorted(self._keys)]

    @classmethod
    def from_list(cls, data: Any) -> "KeyRing":
        """Read a key ring written by `to_list`."""
        if not isinstance(data, list):
            raise ProtectionError(
                f"A key ring must be a JSON list, got {type(data).__name__}."
            )
        return cls([ProtectionKey.from_dict(item) for item in data])
