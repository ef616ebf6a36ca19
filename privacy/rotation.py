"""Key rotation: move a protected gallery to a new key without raw templates.

For ``orthonormal-v1`` a template is y = R_old x. The admin's machine, which
holds both keys, computes T = R_new @ R_old.T (`rotation_transform`) and
sends only T to the server; the server maps every stored template with
`apply_rotation` (T y = R_new x) and never sees x, R_old or R_new. T is
itself orthonormal, which the server checks before applying it.

What T does not give: it links the two keys, so anyone holding T and one of
the keys can compute the other (R_new = T R_old). Rotating after the old key
leaked to someone who can also read T (a compromised server) therefore does
not renew anything: in that case use a fresh key and re-enroll.

For ``biohash-v1`` the signs cannot be re-projected without the embedding,
so `plan_rotation` lists the subjects who must re-enroll.
"""

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facefed.core.errors import ProtectionError, TemplateError
from facefed.privacy.protection import (
    MAX_EMBEDDING_DIM,
    ProtectionKey,
    get_scheme,
    orthonormal_matrix,
)
from facefed.privacy.templates import ProtectedTemplate

logger = logging.getLogger(__name__)

ORTHONORMAL_TOLERANCE = 1e-6
"""Largest |T T^T - I| entry accepted for a rotation transform."""


@dataclass(frozen=True, eq=False)
class RotationTransform:
    """The map from templates under one key version to those under another.

    Attributes:
        scheme_id: Scheme of both keys (only re-keyable schemes have one).
        from_version: Key version of the templates it applies to.
        to_version: Key version of the templates it produces.
        matrix: The d x d orthonormal matrix T = R_new @ R_old.T (float64).
    """

    scheme_id: str
    from_version: int
    to_version: int
    matrix: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if not get_scheme(self.scheme_id).rekeyable:
            raise ProtectionError(
                f"Scheme {self.scheme_id!r} cannot be re-keyed without re-enrollment."
            )
        for name in ("from_version", "to_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProtectionError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.from_version == self.to_version:
            raise ProtectionError(
                f"A rotation must change the key version, got {self.from_version} "
                "twice."
            )
        matrix = np.array(self.matrix, dtype=np.float64)
        check_orthonormal(matrix)
        matrix.flags.writeable = False
        object.__setattr__(self, "matrix", matrix)

    @property
    def dim(self) -> int:
        """Embedding size the transform applies to."""
        return int(self.matrix.shape[0])

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready form: the matrix as base64 of little-endian float64, row-major."""
        return {
            "scheme": self.scheme_id,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "dim": self.dim,
            "matrix": base64.b64encode(self.matrix.astype("<f8").tobytes()).decode(),
        }

    @classmethod
    def from_wire(cls, wire: Any) -> "RotationTransform":
        """Parse and validate a transform sent to the server.

        Raises:
            ProtectionError: For missing fields, bad sizes or a matrix that is
                not orthonormal.
        """
        if not isinstance(wire, dict):
            raise ProtectionError("A rotation transform must be a JSON object.")
        missing = sorted(
            {"scheme", "from_version", "to_version", "dim", "matrix"} - set(wire)
        )
        if missing:
            raise ProtectionError(f"A rotation transform lacks the fields {missing}.")
        dim = wire["dim"]
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ProtectionError(f"dim must be an integer, got {dim!r}.")
        if not 0 < dim <= MAX_EMBEDDING_DIM:
            raise ProtectionError(f"dim must be 1..{MAX_EMBEDDING_DIM}, got {dim}.")
        if not isinstance(wire["matrix"], str):
            raise ProtectionError("A rotation matrix must be a base64 string.")
        if len(wire["matrix"]) > 4 * (8 * dim * dim + 2) // 3 + 4:
            raise ProtectionError("A rotation matrix is longer than its dim allows.")
        try:
            payload = base64.b64decode(wire["matrix"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise ProtectionError("A rotation matrix is not valid base64.") from error
        if len(payload) != 8 * dim * dim:
            raise ProtectionError(
                f"A {dim} x {dim} rotation needs {8 * dim * dim} bytes, got "
                f"{len(payload)}."
            )
        matrix = np.frombuffer(payload, dtype="<f8").reshape(dim, dim)
        if not isinstance(wire["scheme"], str):
            raise ProtectionError(f"scheme must be a string, got {wire['scheme']!r}.")
        return cls(wire["scheme"], wire["from_version"], wire["to_version"], matrix)


def check_orthonormal(
    matrix: np.ndarray, *, tolerance: float = ORTHONORMAL_TOLERANCE
) -> None:
    """Refuse anything but a finite square matrix with T T^T = I.

    A non-orthonormal map would change scores (and could, for example,
    collapse the gallery onto a few directions), so the server refuses it.

    Raises:
        ProtectionError: Naming the shape or the largest deviation found.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
        raise ProtectionError(
            f"A rotation must be a square matrix, got shape {matrix.shape}."
        )
    if not np.all(np.isfinite(matrix)):
        raise ProtectionError("A rotation matrix contains NaN or infinite values.")
    deviation = float(np.abs(matrix @ matrix.T - np.eye(matrix.shape[0])).max())
    if deviation > tolerance:
        raise ProtectionError(
            f"The rotation is not orthonormal: |T T^T - I| reaches {deviation:.3g}, "
            f"above {tolerance:g}."
        )


def rotation_transform(
    old_key: ProtectionKey, new_key: ProtectionKey, *, dim: int
) -> RotationTransform:
    """T = R_new @ R_old.T, computed where both keys are held (the admin).

    Raises:
        ProtectionError: For keys of different or non-re-keyable schemes.
    """
    if old_key.scheme_id != new_key.scheme_id:
        raise ProtectionError(
            f"Cannot rotate from a {old_key.scheme_id!r} key to a "
            f"{new_key.scheme_id!r} key."
        )
    if not get_scheme(old_key.scheme_id).rekeyable:
        raise ProtectionError(
            f"Scheme {old_key.scheme_id!r} cannot be re-keyed; subjects must "
            "re-enroll (see plan_rotation)."
        )
    matrix = orthonormal_matrix(new_key, dim) @ orthonormal_matrix(old_key, dim).T
    logger.info(
        "computed the rotation of %s from key version %d to %d",
        old_key.scheme_id,
        old_key.version,
        new_key.version,
    )
    return RotationTransform(
        old_key.scheme_id, old_key.version, new_key.version, matrix
    )


def apply_rotation_matrix(
    templates: np.ndarray, transform: RotationTransform
) -> np.ndarray:
    """Map a float32 (N, d) matrix of protected templates (server side)."""
    matrix = np.asarray(templates)
    if matrix.ndim != 2 or matrix.shape[1] != transform.dim:
        raise TemplateError(
            f"A {transform.dim}-d rotation cannot map templates of shape "
            f"{matrix.shape}."
        )
    return (matrix.astype(np.float64) @ transform.matrix.T).astype(np.float32)


def apply_rotation(
    templates: list[ProtectedTemplate], transform: RotationTransform
) -> list[ProtectedTemplate]:
    """Re-key protected templates with a transform (server side).

    Every template must be of the transform's scheme and source key version;
    nothing is changed if one is not.

    Raises:
        TemplateError: Naming the first template that does not fit.
    """
    for index, template in enumerate(templates):
        if (
            template.scheme_id != transform.scheme_id
            or template.key_version != transform.from_version
        ):
            raise TemplateError(
                f"Template {index} is {template.scheme_id!r} key version "
                f"{template.key_version}; the rotation maps {transform.scheme_id!r} "
                f"key version {transform.from_version}."
            )
    if not templates:
        return []
    rotated = apply_rotation_matrix(np.stack([t.data for t in templates]), transform)
    return [
        ProtectedTemplate(t.model_id, t.scheme_id, transform.to_version, row)
        for t, row in zip(templates, rotated, strict=True)
    ]


@dataclass(frozen=True)
class RotationPlan:
    """What a move to a new key version means for each subject.

    Attributes:
        scheme_id: The scheme being rotated.
        to_version: The new key version.
        rekey: Subjects the server can re-key itself with a transform.
        reenroll: Subjects who must enroll again (scheme not re-keyable).
        up_to_date: Subjects already under the new version.
    """

    scheme_id: str
    to_version: int
    rekey: list[str]
    reenroll: list[str]
    up_to_date: list[str]


def plan_rotation(
    scheme_id: str, subject_versions: Mapping[str, int], *, to_version: int
) -> RotationPlan:
    """Sort subjects by what rotating their templates to `to_version` needs.

    Args:
        scheme_id: Scheme of the templates.
        subject_versions: Subject id -> key version of its stored template.
        to_version: The new key version.
    """
    scheme = get_scheme(scheme_id)
    if (
        isinstance(to_version, bool)
        or not isinstance(to_version, int)
        or to_version < 1
    ):
        raise ProtectionError(
            f"to_version must be an integer >= 1, got {to_version!r}."
        )
    current = sorted(s for s, v in subject_versions.items() if v == to_version)
    stale = sorted(s for s, v in subject_versions.items() if v != to_version)
    plan = RotationPlan(
        scheme_id=scheme_id,
        to_version=to_version,
        rekey=stale if scheme.rekeyable else [],
        reenroll=[] if scheme.rekeyable else stale,
        up_to_date=current,
    )
    if plan.reenroll:
        logger.warning(
            "%d subjects of %s must re-enroll to move to key version %d",
            len(plan.reenroll),
            scheme_id,
            to_version,
        )
    return plan
