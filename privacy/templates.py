"""Protected templates and their wire format, validated at the edge.

A template on the wire is a JSON object::

    {"model_id": "...", "scheme": "orthonormal-v1", "key_version": 3,
     "dim": 128, "data": "<base64>"}

`data` holds little-endian float32 values for float schemes (`dim` floats)
and `np.packbits` bytes for binary schemes (`dim` bits). Every field is
checked by `ProtectedTemplate.from_wire`; nothing malformed gets through.
"""

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facefed.core.errors import TemplateError
from facefed.privacy.protection import (
    MAX_EMBEDDING_DIM,
    ProtectionKey,
    get_scheme,
    protect,
)

MAX_TEMPLATE_DIM = 65536
"""Most floats or bits a template may hold (a 256 KiB float payload)."""

MAX_MODEL_ID_LENGTH = 128

WIRE_FIELDS = ("model_id", "scheme", "key_version", "dim", "data")


@dataclass(frozen=True, eq=False)
class ProtectedTemplate:
    """One protected face template, tagged with everything needed to compare it.

    Two templates can be compared only when model, scheme and key version are
    equal; `similarity` refuses anything else.

    Attributes:
        model_id: Id of the embedding model that made the embedding.
        scheme_id: Protection scheme (see `protection.known_schemes`).
        key_version: Version of the scheme key used.
        data: float32 (dim,) for float schemes; uint8 (dim / 8,) packed bits
            for binary schemes.
    """

    model_id: str
    scheme_id: str
    key_version: int
    data: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        _check_model_id(self.model_id)
        scheme = get_scheme(self.scheme_id)
        _check_key_version(self.key_version)
        data = np.asarray(self.data)
        if data.ndim != 1 or data.size == 0:
            raise TemplateError(
                f"Template data must be a non-empty vector, got shape {data.shape}."
            )
        if scheme.kind == "float":
            if not np.issubdtype(data.dtype, np.floating):
                raise TemplateError(
                    f"Scheme {self.scheme_id!r} needs float data, got {data.dtype}."
                )
            data = data.astype(np.float32)
            if not np.all(np.isfinite(data)):
                raise TemplateError("Template data contains NaN or infinite values.")
        elif data.dtype != np.uint8:
            raise TemplateError(
                f"Scheme {self.scheme_id!r} needs packed uint8 bits, got {data.dtype}."
            )
        data = np.ascontiguousarray(data)
        data.flags.writeable = False
        object.__setattr__(self, "data", data)
        if self.dim > MAX_TEMPLATE_DIM:
            raise TemplateError(
                f"A template of {self.dim} values exceeds the limit of "
                f"{MAX_TEMPLATE_DIM}."
            )

    @property
    def dim(self) -> int:
        """Number of floats (float schemes) or bits (binary schemes)."""
        if get_scheme(self.scheme_id).kind == "binary":
            return int(self.data.size) * 8
        return int(self.data.size)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready wire form (see the module docstring)."""
        if get_scheme(self.scheme_id).kind == "float":
            payload = self.data.astype("<f4").tobytes()
        else:
            payload = self.data.tobytes()
        return {
            "model_id": self.model_id,
            "scheme": self.scheme_id,
            "key_version": self.key_version,
            "dim": self.dim,
            "data": base64.b64encode(payload).decode("ascii"),
        }

    @classmethod
    def from_wire(cls, wire: Any) -> "ProtectedTemplate":
        """Parse and validate a wire template.

        Raises:
            TemplateError: For a missing or extra field, a wrong type, bad
                base64, a size that does not match `dim`, or non-finite values.
            ProtectionError: For an unknown scheme.
        """
        if not isinstance(wire, dict):
            raise TemplateError(
                f"A template must be a JSON object, got {type(wire).__name__}."
            )
        missing = [name for name in WIRE_FIELDS if name not in wire]
        if missing:
            raise TemplateError(f"A template lacks the fields {missing}.")
        extra = sorted(set(wire) - set(WIRE_FIELDS))
        if extra:
            raise TemplateError(f"A template has unknown fields {extra}.")
        _check_model_id(wire["model_id"])
        if not isinstance(wire["scheme"], str):
            raise TemplateError(
                f"A template's scheme must be a string, got {wire['scheme']!r}."
            )
        scheme = get_scheme(wire["scheme"])
        _check_key_version(wire["key_version"])
        dim = _check_dim(wire["dim"], binary=scheme.kind == "binary")
        payload = _decode_base64(wire["data"])
        if scheme.kind == "float":
            if len(payload) != 4 * dim:
                raise TemplateError(
                    f"A {dim}-float template needs {4 * dim} bytes of data, got "
                    f"{len(payload)}."
                )
            data: np.ndarray = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        else:
            if len(payload) != dim // 8:
                raise TemplateError(
                    f"A {dim}-bit template needs {dim // 8} bytes of data, got "
                    f"{len(payload)}."
                )
            data = np.frombuffer(payload, dtype=np.uint8).copy()
        return cls(wire["model_id"], wire["scheme"], wire["key_version"], data)


def _check_model_id(model_id: Any) -> None:
    if not isinstance(model_id, str) or not model_id.strip():
        raise TemplateError(f"A model id must be a non-empty string, got {model_id!r}.")
    if not model_id.isprintable():
        # Control characters (NUL above all) cannot be stored or logged safely.
        raise TemplateError(f"A model id must be printable text, got {model_id!r}.")
    if len(model_id) > MAX_MODEL_ID_LENGTH:
        raise TemplateError(
            f"A model id of {len(model_id)} characters exceeds the limit of "
            f"{MAX_MODEL_ID_LENGTH}."
        )


def _check_key_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TemplateError(f"A key version must be an integer >= 1, got {version!r}.")


def _check_dim(dim: Any, *, binary: bool) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TemplateError(f"A template's dim must be an integer, got {dim!r}.")
    if not 0 < dim <= MAX_TEMPLATE_DIM:
        raise TemplateError(
            f"A template's dim must be 1..{MAX_TEMPLATE_DIM}, got {dim}."
        )
    if binary and dim % 8:
        raise TemplateError(
            f"A binary template's dim must be a multiple of 8, got {dim}."
        )
    return dim


def _decode_base64(data: Any) -> bytes:
    if not isinstance(data, str):
        raise TemplateError(
            f"A template's data must be a base64 string, got {type(data).__name__}."
        )
    # Base64 of the largest template, with padding; refuse longer before decoding.
    if len(data) > 4 * ((4 * MAX_TEMPLATE_DIM + 2) // 3):
        raise TemplateError(f"A template's data of {len(data)} characters is too long.")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise TemplateError("A template's data is not valid base64.") from error


def protect_template(
    embedding: np.ndarray, *, key: ProtectionKey, model_id: str
) -> ProtectedTemplate:
    """Protect one embedding (d,) and tag it with model and key."""
    vector = np.asarray(embedding)
    if vector.ndim != 1 or vector.size > MAX_EMBEDDING_DIM:
        raise TemplateError(
            f"protect_template takes one embedding vector, got shape {vector.shape}."
        )
    data = protect(vector, key)[0]
    return ProtectedTemplate(model_id, key.scheme_id, key.version, data)


def check_comparable(a: ProtectedTemplate, b: ProtectedTemplate) -> None:
    """Refuse to compare templates of different models, schemes or key versions.

    Raises:
        TemplateError: Naming the first field that differs.
    """
    for name in ("model_id", "scheme_id", "key_version", "dim"):
        if getattr(a, name) != getattr(b, name):
            raise TemplateError(
                f"Templates with {name} {getattr(a, name)!r} and "
                f"{getattr(b, name)!r} cannot be compared."
            )


def similarity(probe: ProtectedTemplate, reference: ProtectedTemplate) -> float:
    """Score two comparable templates on the cosine scale of their scheme.

    Float schemes give the cosine similarity; binary schemes give
    cos(pi * hamming / bits), an estimate of it (see `protection`).
    """
    check_comparable(probe, reference)
    scheme = get_scheme(probe.scheme_id)
    return float(scheme.similarity(probe.data, reference.data[None, :])[0])


def stack_templates(templates: list[ProtectedTemplate]) -> np.ndarray:
    """Stack comparable templates into one (N, ...) matrix for Faiss or scoring."""
    if not templates:
        raise TemplateError("There are no templates to stack.")
    for other in templates[1:]:
        check_comparable(templates[0], other)
    return np.stack([template.data for template in templates])
