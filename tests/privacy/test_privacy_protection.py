import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefed.core.errors import ProtectionError, TemplateError
from facefed.privacy.protection import (
    KeyRing,
    ProtectionKey,
    generate_key,
    get_scheme,
    known_schemes,
    orthonormal_matrix,
    protect,
)


def _lfw(test_data):
    archive = np.load(test_data / "lfw" / "dlib_embeddings.npz")
    return archive["embeddings"], archive["identities"]


def _key(scheme: str, version: int = 1, seed: int = 0) -> ProtectionKey:
    return generate_key(scheme, version, rng=random.Random(seed))


def test_registry_names_known_schemes_on_error():
    assert known_schemes() == ["biohash-v1", "orthonormal-v1"]
    with pytest.raises(ProtectionError, match="biohash-v1, orthonormal-v1"):
        get_scheme("rot13")


def test_key_validation_and_secret_hidden():
    key = generate_key("orthonormal-v1", 1)
    assert len(key.secret) == 32
    assert key.secret.hex() not in repr(key)
    assert generate_key("orthonormal-v1", 1).secret != key.secret
    with pytest.raises(ProtectionError, match="unknown-v9"):
        ProtectionKey("unknown-v9", 1, b"x" * 32)
    with pytest.raises(ProtectionError, match="1 or more, got 0"):
        ProtectionKey("orthonormal-v1", 0, b"x" * 32)
    with pytest.raises(ProtectionError, match="got 4 bytes"):
        ProtectionKey("orthonormal-v1", 1, b"abcd")
    assert ProtectionKey.from_dict(key.to_dict()) == key
    with pytest.raises(ProtectionError, match="base64"):
        ProtectionKey.from_dict(
            {"scheme": "orthonormal-v1", "version": 1, "secret": "%%"}
        )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(2, 160))
def test_orthonormal_matrix_is_orthonormal_and_deterministic(seed, dim):
    key = _key("orthonormal-v1", seed=seed)
    matrix = orthonormal_matrix(key, dim)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(dim), atol=1e-10)
    np.testing.assert_array_equal(matrix, orthonormal_matrix(key, dim))


def test_orthonormal_keeps_lfw_cosine_scores_exactly(test_data):
    embeddings, _ = _lfw(test_data)
    protected = protect(embeddings, _key("orthonormal-v1"))
    assert protected.dtype == np.float32
    np.testing.assert_allclose(
        protected @ protected.T, embeddings @ embeddings.T, atol=1e-5
    )
    # Protection changes the vectors themselves completely.
    assert np.abs(np.sum(protected * embeddings, axis=1)).mean() < 0.3


def test_different_keys_give_unrelated_templates(test_data):
    embeddings, _ = _lfw(test_data)
    a = protect(embeddings, _key("orthonormal-v1", seed=1))
    b = protect(embeddings, _key("orthonormal-v1", seed=2))
    same_person_across_keys = np.sum(a * b, axis=1)
    assert np.abs(same_person_across_keys).mean() < 0.15


def test_biohash_is_binary_and_estimates_cosine(test_data):
    embeddings, identities = _lfw(test_data)
    scheme = get_scheme("biohash-v1")
    bits = protect(embeddings, _key("biohash-v1"))
    assert bits.dtype == np.uint8 and bits.shape == (len(embeddings), 64)
    raw = embeddings @ embeddings[0]
    estimated = scheme.similarity(bits[0], bits)
    assert estimated[0] == pytest.approx(1.0)
    assert np.abs(estimated - raw).mean() < 0.06
    # Rank-1 of the first photo of each person among the others stays mostly right.
    genuine = identities[1:] == identities[0]
    assert estimated[1:][genuine].min() > np.median(estimated[1:][~genuine])


def test_protect_refuses_bad_embeddings_and_wrong_key():
    key = _key("orthonormal-v1")
    with pytest.raises(TemplateError, match="NaN"):
        protect(np.array([1.0, np.nan]), key)
    with pytest.raises(TemplateError, match="all zeros"):
        protect(np.zeros(4), key)
    with pytest.raises(TemplateError, match="floating point"):
        protect(np.arange(4), key)
    with pytest.raises(ProtectionError, match="cannot be used"):
        get_scheme("biohash-v1").protect(np.ones(4), key)


def test_key_ring_refuses_unknown_versions():
    ring = KeyRing([_key("orthonormal-v1", 1, 1), _key("orthonormal-v1", 2, 2)])
    assert ring.get("orthonormal-v1").version == 2
    with pytest.raises(ProtectionError, match="known versions: 1, 2"):
        ring.get("orthonormal-v1", 7)
    with pytest.raises(ProtectionError, match="No key"):
        ring.get("biohash-v1")
    with pytest.raises(ProtectionError, match="another secret"):
        ring.add(_key("orthonormal-v1", 1, 9))
    again = KeyRing.from_list(ring.to_list())
    assert again.get("orthonormal-v1", 1) == ring.get("orthonormal-v1", 1)
