import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefed.core.errors import ProtectionError, TemplateError
from facefed.privacy.protection import generate_key, protect
from facefed.privacy.rotation import (
    RotationTransform,
    apply_rotation,
    apply_rotation_matrix,
    check_orthonormal,
    plan_rotation,
    rotation_transform,
)
from facefed.privacy.templates import protect_template


def _key(version, seed, scheme="orthonormal-v1"):
    return generate_key(scheme, version, rng=random.Random(seed))


def _embeddings(test_data):
    return np.load(test_data / "lfw" / "dlib_embeddings.npz")["embeddings"]


def test_rotation_rekeys_lfw_gallery_exactly(test_data):
    embeddings = _embeddings(test_data)
    old, new = _key(1, 1), _key(2, 2)
    gallery = [protect_template(e, key=old, model_id="m") for e in embeddings]
    transform = RotationTransform.from_wire(
        rotation_transform(old, new, dim=128).to_wire()
    )
    rotated = apply_rotation(gallery, transform)
    assert {t.key_version for t in rotated} == {2}
    expected = protect(embeddings, new)
    np.testing.assert_allclose(np.stack([t.data for t in rotated]), expected, atol=1e-5)
    # Probes made with the new key match the re-keyed gallery as before.
    scores = np.stack([t.data for t in rotated]) @ expected[0]
    np.testing.assert_allclose(scores, embeddings @ embeddings[0], atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(a=st.integers(0, 10**9), b=st.integers(0, 10**9), dim=st.integers(2, 64))
def test_transforms_compose(a, b, dim):
    k1, k2, k3 = _key(1, a), _key(2, b), _key(3, a + b + 1)
    t12, t23, t13 = (
        rotation_transform(k1, k2, dim=dim),
        rotation_transform(k2, k3, dim=dim),
        rotation_transform(k1, k3, dim=dim),
    )
    np.testing.assert_allclose(t23.matrix @ t12.matrix, t13.matrix, atol=1e-9)


def test_server_refuses_bad_transforms(test_data):
    with pytest.raises(ProtectionError, match="not orthonormal"):
        RotationTransform("orthonormal-v1", 1, 2, np.eye(4) * 1.01)
    with pytest.raises(ProtectionError, match="square"):
        check_orthonormal(np.ones((2, 3)))
    with pytest.raises(ProtectionError, match="re-enrollment"):
        RotationTransform("biohash-v1", 1, 2, np.eye(4))
    with pytest.raises(ProtectionError, match="change the key version"):
        RotationTransform("orthonormal-v1", 2, 2, np.eye(4))
    wire = rotation_transform(_key(1, 1), _key(2, 2), dim=8).to_wire()
    with pytest.raises(ProtectionError, match="needs 512 bytes"):
        RotationTransform.from_wire({**wire, "matrix": wire["matrix"][:40]})
    with pytest.raises(ProtectionError, match="lacks"):
        RotationTransform.from_wire({"scheme": "orthonormal-v1"})
    transform = RotationTransform.from_wire(wire)
    wrong_version = protect_template(
        _embeddings(test_data)[0][:8], key=_key(5, 1), model_id="m"
    )
    with pytest.raises(TemplateError, match="key version 5"):
        apply_rotation([wrong_version], transform)
    with pytest.raises(TemplateError, match="cannot map"):
        apply_rotation_matrix(np.ones((3, 4), np.float32), transform)


def test_plan_rotation():
    versions = {"s1": 1, "s2": 2, "s3": 1}
    plan = plan_rotation("orthonormal-v1", versions, to_version=2)
    assert (
        plan.rekey == ["s1", "s3"] and plan.reenroll == [] and plan.up_to_date == ["s2"]
    )
    plan = plan_rotation("biohash-v1", versions, to_version=2)
    assert plan.rekey == [] and plan.reenroll == ["s1", "s3"]
    with pytest.raises(ProtectionError, match="cannot be re-keyed"):
        rotation_transform(_key(1, 1, "biohash-v1"), _key(2, 2, "biohash-v1"), dim=128)
    with pytest.raises(ProtectionError, match="known schemes"):
        plan_rotation("nope", versions, to_version=2)
