import random

import numpy as np
import pytest

from facefed.core.errors import ConfigurationError
from facefed.privacy.protection import generate_key, get_scheme, protect
from facefed.privacy.unlinkability import (
    local_measure,
    plot_unlinkability,
    unlinkability,
)


def test_identical_distributions_are_unlinkable():
    rng = np.random.default_rng(0)
    result = unlinkability(rng.normal(0, 0.1, 3000), rng.normal(0, 0.1, 3000))
    assert result.d_sys < 0.05


def test_disjoint_distributions_are_fully_linkable():
    rng = np.random.default_rng(1)
    result = unlinkability(rng.normal(0.8, 0.05, 2000), rng.normal(0.0, 0.05, 2000))
    assert result.d_sys > 0.98


def test_partial_overlap_matches_the_closed_form():
    # Two unit Gaussians one sigma apart: D<->sys = integral over s > mid of
    # N(s; 1, 1) * (2 LR / (1 + LR) - 1), computed here by quadrature.
    rng = np.random.default_rng(2)
    result = unlinkability(rng.normal(1, 1, 20000), rng.normal(0, 1, 20000))
    s = np.linspace(-8, 9, 20001)
    mated = np.exp(-0.5 * (s - 1) ** 2) / np.sqrt(2 * np.pi)
    non_mated = np.exp(-0.5 * s**2) / np.sqrt(2 * np.pi)
    expected = np.trapezoid(mated * local_measure(mated, non_mated), s)
    assert result.d_sys == pytest.approx(expected, abs=0.02)


def test_local_measure_values():
    local = local_measure(np.array([3.0, 1.0, 1.0]), np.array([1.0, 1.0, 3.0]))
    np.testing.assert_allclose(local, [0.5, 0.0, 0.0])


@pytest.mark.parametrize("scheme", ["orthonormal-v1", "biohash-v1"])
def test_templates_under_two_keys_are_unlinkable_on_lfw(test_data, tmp_path, scheme):
    archive = np.load(test_data / "lfw" / "dlib_embeddings.npz")
    embeddings, identities = archive["embeddings"], archive["identities"]
    a = protect(embeddings, generate_key(scheme, 1, rng=random.Random(1)))
    b = protect(embeddings, generate_key(scheme, 2, rng=random.Random(2)))
    similarity = get_scheme(scheme).similarity
    mated, non_mated = [], []
    for i in range(len(identities)):
        scores = similarity(a[i], b)
        same = identities == identities[i]
        same[i] = False
        mated.extend(scores[same])
        non_mated.extend(scores[~same][::7])
    # Under one key the same photos are plainly linkable.
    raw_mated = [
        float(embeddings[i] @ embeddings[j])
        for i in range(0, 144, 3)
        for j in (i + 1, i + 2)
    ]
    assert unlinkability(raw_mated, embeddings[::3] @ embeddings[1::3].T).d_sys > 0.8
    result = unlinkability(np.array(mated), np.array(non_mated))
    assert result.d_sys < 0.1
    plot_unlinkability(
        np.array(mated), np.array(non_mated), result, tmp_path / "u.png", title=scheme
    )
    assert (tmp_path / "u.png").stat().st_size > 1000


def test_refuses_too_few_scores():
    with pytest.raises(ConfigurationError, match="at least 10 scores, got 3"):
        unlinkability(np.ones(3), np.ones(30))
