"""Encrypted template matching with CKKS homomorphic encryption (TenSEAL).

Who holds what:

* The site creates the CKKS context and keeps its secret key. It sends the
  server a public context once (`SiteHEContext.public_bytes`: parameters,
  public key and, for 1:1 matching, Galois keys; never the secret key), then
  sends encrypted protected probes.
* The server scores an encrypted probe against plaintext protected templates
  (`ServerHEScorer`) and returns encrypted scores; it cannot decrypt anything.
* The site decrypts the scores and decides.

Probe layouts (CKKS slots hold poly_modulus_degree / 2 = 4096 numbers):

* ``columns`` (1:N): one ciphertext per coordinate i, holding x_i in every
  slot. The server multiplies ciphertext i by the plaintext column i of a
  chunk of 4096 gallery templates and adds the d products; slot j then holds
  the score of template j. No rotations, so no Galois keys are needed, and
  one ciphertext of scores comes back per 4096 templates. The probe is large
  (d ciphertexts, about 30 MB for d = 128) but is sent once per search.
* ``packed`` (1:1): one ciphertext holding the probe. The server computes its
  dot product with the reference template, which sums the slots by
  rotations (Galois keys, about 19 MB in the public context, sent once).

What each party learns:

* The server learns nothing about the probe's values (CKKS is IND-CPA under
  RLWE). It does see which collection or subject is searched, the gallery
  size, when and how often a site searches, and the timing of each search.
  It holds the protected gallery in plaintext anyway (orthonormal-v1
  templates: unlinkable to other keys, but not irreversible for a holder of
  the protection key, which the server never has).
* The site learns every score it decrypts: in 1:N mode the score of every
  template searched, not just the best. A site that submits chosen probes
  (for example d basis vectors) could solve for the searched templates in
  the protected space, and with the protection key, which sites hold, for
  the embeddings themselves. What limits it: `score_many` takes
  `candidates`, so the server scores (and the site sees) only a short list,
  for example the top-k of a coarse search on an irreversible biohash-v1
  probe sent in the clear; the server also rate-limits searches per site.
  With candidates the site still learns k scores per search.
* In 1:1 mode the site learns one score; the packed dot product leaves the
  same sum in every slot, so no partial products leak.

FIXME: a columns probe is about 30 MB for a 128-d template (128 ciphertexts
of 235 KB), sent once per 1:N search. Poly modulus 4096 would cut it to about
10 MB, but its decrypted scores drift by about 1e-3, the accuracy budget, so
large galleries on slow links pay in transfer time.

Parameters: poly_modulus_degree 8192 with coefficient moduli (60, 40, 60)
bits and scale 2^40, which the Homomorphic Encryption Standard (Albrecht et
al., 2018) rates at 128-bit security (total 160 bits <= 218). Decrypted
scores differ from plaintext ones by about 1e-7.
"""

import logging
import secrets
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from facefed.core.errors import TemplateError

if TYPE_CHECKING:
    import tenseal as ts

logger = logging.getLogger(__name__)

ProbeLayout = Literal["columns", "packed"]

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 60)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2

MAX_CONTEXT_BYTES = 64 * 1024 * 1024
"""Largest public context accepted (Galois keys make it about 19 MB)."""

MAX_PROBE_BYTES = 96 * 1024 * 1024
"""Largest encrypted probe accepted (a 128-d columns probe is about 30 MB)."""

MAX_SCORES_BYTES = 256 * 1024 * 1024
MAX_DIM = 1024
MAX_GALLERY = 1_000_000

_MAGIC = b"FFHE"
_FORMAT = 1
_KIND_PROBE = 1
_KIND_SCORES = 2
_LAYOUT_CODES: dict[str, int] = {"columns": 1, "packed": 2}
_HEADER = struct.Struct("<4sBBB16sII")  # magic, format, kind, layout, ctx, dim, count


class HEError(TemplateError):
    """Raised for a malformed, oversized or mismatched context or ciphertext."""


_CONTEXT_HEADER = struct.Struct("<4sBB16s")  # magic, format, kind, context id
_KIND_PUBLIC_CONTEXT = 3
_KIND_SITE_CONTEXT = 4


def _frame_context(kind: int, context_id: bytes, body: bytes) -> bytes:
    return _CONTEXT_HEADER.pack(_MAGIC, _FORMAT, kind, context_id) + body


def _unframe_context(data: bytes, *, kind: int) -> tuple[bytes, bytes]:
    if not isinstance(data, bytes) or len(data) <= _CONTEXT_HEADER.size:
        raise HEError("A context must be non-empty bytes.")
    if len(data) > MAX_CONTEXT_BYTES:
        raise HEError(
            f"A context of {len(data)} bytes exceeds the limit of {MAX_CONTEXT_BYTES}."
        )
    magic, version, found_kind, context_id = _CONTEXT_HEADER.unpack_from(data)
    if magic != _MAGIC or version != _FORMAT or found_kind != kind:
        raise HEError("The data is not a TenSEAL context framed by facefed.")
    return context_id, data[_CONTEXT_HEADER.size :]


@dataclass(frozen=True)
class _Frame:
    kind: int
    layout: str
    context_id: bytes
    dim: int
    parts: list[bytes]


def _pack(
    kind: int, layout: str, context_id: bytes, dim: int, parts: list[bytes]
) -> bytes:
    header = _HEADER.pack(
        _MAGIC, _FORMAT, kind, _LAYOUT_CODES[layout], context_id, dim, len(parts)
    )
    body = b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return header + body


def _unpack(data: bytes, *, kind: int, limit: int, what: str) -> _Frame:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HEError(f"An encrypted {what} must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) > limit:
        raise HEError(
            f"An encrypted {what} of {len(data)} bytes exceeds the limit of {limit}."
        )
    if len(data) < _HEADER.size:
        raise HEError(f"An encrypted {what} of {len(data)} bytes is truncated.")
    magic, version, found_kind, layout_code, context_id, dim, count = (
        _HEADER.unpack_from(data)
    )
    if magic != _MAGIC or version != _FORMAT or found_kind != kind:
        raise HEError(f"The data is not an encrypted {what} of format {_FORMAT}.")
    layouts = {code: name for name, code in _LAYOUT_CODES.items()}
    if layout_code not in layouts:
        raise HEError(
            f"Unknown probe layout code {layout_code} in an encrypted {what}."
        )
    parts, offset = [], _HEADER.size
    for _ in range(count):
        if offset + 4 > len(data):
            raise HEError(f"An encrypted {what} is truncated.")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise HEError(f"An encrypted {what} is truncated.")
        parts.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise HEError(f"An encrypted {what} has {len(data) - offset} trailing bytes.")
    return _Frame(found_kind, layouts[layout_code], context_id, dim, parts)


def _check_vector(vector: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64)
    if array.ndim != 1 or not 0 < array.size <= MAX_DIM:
        raise HEError(
            f"A {what} must be a vector of 1..{MAX_DIM} values, got {array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise HEError(f"A {what} contains NaN or infinite values.")
    return array


class SiteHEContext:
    """The site's CKKS context: it alone holds the secret key.

    Create one with `create`, keep it with `to_bytes` (secret included: store
    it like a key), send `public_bytes` to the server once.
    """

    def __init__(self, context: "ts.Context", context_id: bytes) -> None:
        if not context.is_private():
            raise HEError("A site context must hold its secret key.")
        self._context = context
        # A random id, not a hash: TenSEAL's serialisation is not deterministic.
        self.context_id = context_id
        self._public = _frame_context(
            _KIND_PUBLIC_CONTEXT,
            context_id,
            context.serialize(save_secret_key=False),
        )

    @classmethod
    def create(
        cls, *, galois_keys: bool = True, n_threads: int | None = None
    ) -> "SiteHEContext":
        """Create a fresh context with a new secret key.

        Args:
            galois_keys: Generate rotation keys so the server can compute 1:1
                dot products on packed probes (adds about 19 MB to the public
                context). Without them only the columns layout works.
            n_threads: Threads TenSEAL may use; all cores when None.
        """
        import tenseal as ts

        options = {} if n_threads is None else {"n_threads": n_threads}
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
            **options,
        )
        context.global_scale = 2.0**SCALE_BITS
        if galois_keys:
            context.generate_galois_keys()
        logger.info("created a CKKS context (galois keys: %s)", galois_keys)
        return cls(context, secrets.token_bytes(16))

    def public_bytes(self) -> bytes:
        """The context without its secret key, for the server."""
        return self._public

    def to_bytes(self) -> bytes:
        """The whole context, secret key included, for the site's own storage."""
        return _frame_context(
            _KIND_SITE_CONTEXT,
            self.context_id,
            self._context.serialize(save_secret_key=True),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "SiteHEContext":
        """Load a context saved by `to_bytes`."""
        import tenseal as ts

        context_id, body = _unframe_context(data, kind=_KIND_SITE_CONTEXT)
        try:
            context = ts.context_from(body)
        except (ValueError, RuntimeError) as error:
            raise HEError("The data is not a TenSEAL context.") from error
        return cls(context, context_id)

    def encrypt_probe(
        self, vector: np.ndarray, *, layout: ProbeLayout = "columns"
    ) -> bytes:
        """Encrypt a protected probe template (float scheme) for the server.

        Args:
            vector: The protected probe, e.g. an orthonormal-v1 template.
            layout: ``columns`` for 1:N and 1:1, ``packed`` for 1:1 only
                (small and fast, needs Galois keys); see the module docstring.
        """
        import tenseal as ts

        probe = _check_vector(vector, "probe")
        if layout == "columns":
            parts = [
                ts.ckks_vector(
                    self._context, np.full(SLOTS, value).tolist()
                ).serialize()
                for value in probe
            ]
        elif layout == "packed":
            if not self._context.has_galois_keys():
                raise HEError(
                    "A packed probe needs a context created with galois_keys."
                )
            parts = [ts.ckks_vector(self._context, probe.tolist()).serialize()]
        else:
            raise HEError(
                f"Unknown probe layout {layout!r}; known layouts: columns, packed."
            )
        return _pack(_KIND_PROBE, layout, self.context_id, probe.size, parts)

    def decrypt_scores(self, data: bytes, n: int) -> np.ndarray:
        """Decrypt `n` scores returned by the server (float64)."""
        import tenseal as ts

        frame = _unpack(
            data, kind=_KIND_SCORES, limit=MAX_SCORES_BYTES, what="score set"
        )
        if frame.context_id != self.context_id:
            raise HEError("The scores were computed under another context.")
        if not 0 < n <= frame.dim:
            raise HEError(f"Asked for {n} scores; the score set holds {frame.dim}.")
        values = []
        try:
            for part in frame.parts:
                values.extend(ts.ckks_vector_from(self._context, part).decrypt())
        except (ValueError, RuntimeError) as error:
            raise HEError("An encrypted score is malformed.") from error
        if frame.layout == "packed":
            return np.asarray(values[:1], dtype=np.float64)
        return np.asarray(values[:n], dtype=np.float64)


class ServerHEScorer:
    """Scores encrypted probes against plaintext templates, never decrypting.

    Args:
        public_context: `SiteHEContext.public_bytes` of the site.
    """

    def __init__(self, public_context: bytes) -> None:
        import tenseal as ts

        context_id, body = _unframe_context(public_context, kind=_KIND_PUBLIC_CONTEXT)
        try:
            context = ts.context_from(body)
        except (ValueError, RuntimeError) as error:
            raise HEError("The public context is not a TenSEAL context.") from error
        if context.is_private():
            raise HEError(
                "The context holds a secret key; send only the public context."
            )
        self._context = context
        self.context_id = context_id

    def _load_probe(self, data: bytes) -> tuple[str, int, list["ts.CKKSVector"]]:
        import tenseal as ts

        frame = _unpack(data, kind=_KIND_PROBE, limit=MAX_PROBE_BYTES, what="probe")
        if frame.context_id != self.context_id:
            raise HEError("The probe was encrypted under another context.")
        expected = frame.dim if frame.layout == "columns" else 1
        if len(frame.parts) != expected or not 0 < frame.dim <= MAX_DIM:
            raise HEError(
                f"A {frame.layout} probe of {frame.dim} values needs {expected} "
                f"ciphertexts, got {len(frame.parts)}."
            )
        try:
            vectors = [ts.ckks_vector_from(self._context, part) for part in frame.parts]
        except (ValueError, RuntimeError) as error:
            raise HEError("An encrypted probe ciphertext is malformed.") from error
        return frame.layout, frame.dim, vectors

    def score_one(self, probe: bytes, template: np.ndarray) -> bytes:
        """Encrypted score of the probe against one protected template."""
        layout, dim, vectors = self._load_probe(probe)
        reference = _check_vector(template, "template")
        if reference.size != dim:
            raise HEError(
                f"A {dim}-value probe cannot be scored against {reference.size} values."
            )
        if layout == "packed":
            if not self._context.has_galois_keys():
                raise HEError(
                    "Scoring a packed probe needs Galois keys in the context."
                )
            result = vectors[0].dot(reference.tolist())
            return _pack(_KIND_SCORES, layout, self.context_id, 1, [result.serialize()])
        total = vectors[0] * float(reference[0])
        for vector, value in zip(vectors[1:], reference[1:], strict=True):
            total += vector * float(value)
        return _pack(_KIND_SCORES, layout, self.context_id, 1, [total.serialize()])

    def score_many(
        self,
        probe: bytes,
        gallery: np.ndarray,
        *,
        candidates: np.ndarray | None = None,
    ) -> bytes:
        """Encrypted scores of a columns probe against gallery rows.

        Args:
            probe: An encrypted probe in the ``columns`` layout.
            gallery: Protected templates (N, d), float.
            candidates: Row indices to score; only their scores are computed
                and returned, in this order (limits what the site learns).

        Returns:
            An encrypted score set; `decrypt_scores(data, n)` with n = number
            of rows scored.
        """
        layout, dim, vectors = self._load_probe(probe)
        if layout != "columns":
            raise HEError("1:N scoring needs a probe in the columns layout.")
        matrix = _check_gallery(gallery, dim)
        if candidates is not None:
            matrix = matrix[_check_candidates(candidates, matrix.shape[0])]
        parts = [
            _score_chunk(vectors, matrix[start : start + SLOTS]).serialize()
            for start in range(0, matrix.shape[0], SLOTS)
        ]
        return _pack(_KIND_SCORES, layout, self.context_id, matrix.shape[0], parts)


def _check_gallery(gallery: np.ndarray, dim: int) -> np.ndarray:
    matrix = np.asarray(gallery, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise HEError(
            f"A gallery for a {dim}-value probe must be (N, {dim}), got {matrix.shape}."
        )
    if not 0 < matrix.shape[0] <= MAX_GALLERY:
        raise HEError(
            f"A gallery must hold 1..{MAX_GALLERY} templates, got {matrix.shape[0]}."
        )
    if not np.all(np.isfinite(matrix)):
        raise HEError("The gallery contains NaN or infinite values.")
    return matrix


def _check_candidates(candidates: np.ndarray, size: int) -> np.ndarray:
    indices = np.asarray(candidates)
    if (
        indices.ndim != 1
        or indices.size == 0
        or not np.issubdtype(indices.dtype, np.integer)
    ):
        raise HEError("Candidates must be a non-empty vector of row indices.")
    if indices.min() < 0 or indices.max() >= size:
        raise HEError(f"A candidate index is outside the gallery of {size} templates.")
    return indices


def _score_chunk(vectors: list["ts.CKKSVector"], chunk: np.ndarray) -> "ts.CKKSVector":
    # Pad to a full ciphertext: the probe's ciphertexts hold SLOTS values each.
    padded = np.zeros((SLOTS, chunk.shape[1]))
    padded[: chunk.shape[0]] = chunk
    total = vectors[0] * padded[:, 0].tolist()
    for column, vector in enumerate(vectors[1:], start=1):
        total += vector * padded[:, column].tolist()
    return total
