"""Verification metrics on score sets whose answers are known."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefed.core.errors import ConfigurationError
from facefed.core.verification import (
    best_accuracy_threshold,
    equal_error_rate,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
    threshold_at_fmr,
)

# Genuine: 0.9 0.8 0.7 0.4; impostor: 0.6 0.3 0.2 0.1
SCORES = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1])
SAME = np.array([1, 1, 1, 1, 0, 0, 0, 0])


def test_roc_of_a_known_set():
    roc = roc_curve(SCORES, SAME)
    assert roc.thresholds[0] == np.inf
    np.testing.assert_allclose(
        roc.thresholds[1:], [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1]
    )
    np.testing.assert_allclose(roc.tmr, [0, 0.25, 0.5, 0.75, 0.75, 1, 1, 1, 1])
    np.testing.assert_allclose(roc.fmr, [0, 0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1])


def test_ties_are_accepted_together():
    roc = roc_curve([0.5, 0.5, 0.2], [1, 0, 0])
    np.testing.assert_allclose(roc.tmr, [0, 1, 1])
    np.testing.assert_allclose(roc.fmr, [0, 0.5, 1])


def test_eer_of_a_known_set():
    # FNMR = FMR = 0.25 between thresholds 0.6 and 0.4.
    eer, threshold = equal_error_rate(SCORES, SAME)
    assert eer == pytest.approx(0.25)
    assert 0.4 <= threshold <= 0.6
    assert equal_error_rate([0.9, 0.8, 0.1], [1, 1, 0])[0] == 0.0


def test_tar_at_far_of_a_known_set():
    tar, threshold = tar_at_far(SCORES, SAME, 0.25)  # one impostor may pass
    assert tar == 1.0 and 0.3 < threshold <= 0.4
    tar, threshold = tar_at_far(SCORES, SAME, 0.1)  # none may pass
    assert tar == 0.75 and 0.6 < threshold <= 0.7


def test_best_threshold_and_kfold():
    # 7 of 8 right between 0.3 and 0.4 (or 0.6 and 0.7); the lower split wins.
    assert best_accuracy_threshold(SCORES, SAME) == pytest.approx(0.35)
    scores = np.r_[SCORES, SCORES]
    same = np.r_[SAME, SAME]
    result = kfold_accuracy(scores, same, [1] * 8 + [2] * 8)
    assert result.accuracies == [0.875, 0.875] and result.mean == 0.875


def test_kfold_uses_the_other_folds_threshold():
    # Fold 1 alone would split at 0.5; fold 2's data puts the threshold at 0.75,
    # so fold 1's genuine pair at 0.6 is rejected.
    scores = [0.6, 0.4, 0.9, 0.8, 0.7, 0.1]
    same = [1, 0, 1, 1, 0, 0]
    result = kfold_accuracy(scores, same, [1, 1, 2, 2, 2, 2])
    assert result.thresholds[0] == pytest.approx(0.75)
    assert result.accuracies[0] == 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigurationError, match="both genuine and impostor"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ConfigurationError, match="must match"):
        roc_curve([0.1, 0.2], [1])
    with pytest.raises(ConfigurationError, match="at least two folds"):
        kfold_accuracy(SCORES, SAME, [1] * 8)
    with pytest.raises(ConfigurationError, match=r"\(0, 1\]"):
        threshold_at_fmr(SCORES, SAME, 0.0)


pairs = st.lists(
    st.tuples(st.floats(-1, 1, allow_nan=False), st.booleans()), min_size=4, max_size=60
).filter(lambda rows: 0 < sum(s for _, s in rows) < len(rows))


@settings(max_examples=80, deadline=None)
@given(rows=pairs, fmr=st.floats(0.01, 1.0))
def test_threshold_at_fmr_keeps_its_promise(rows, fmr):
    scores = np.array([s for s, _ in rows])
    same = np.array([g for _, g in rows])
    threshold = threshold_at_fmr(scores, same, fmr)
    impostors = scores[~same]
    assert np.mean(impostors >= threshold) <= fmr + 1e-12
    # and it is the lowest such threshold among the observed scores
    lower = impostors[impostors < threshold]
    if lower.size:
        assert np.mean(impostors >= lower.max()) > fmr


@settings(max_examples=80, deadline=None)
@given(rows=pairs)
def test_roc_is_monotonic_and_best_threshold_is_best(rows):
    scores = np.array([s for s, _ in rows])
    same = np.array([g for _, g in rows])
    roc = roc_curve(scores, same)
    assert np.all(np.diff(roc.fmr) >= 0) and np.all(np.diff(roc.tmr) >= 0)
    assert roc.fmr[-1] == 1.0 and roc.tmr[-1] == 1.0
    best = np.mean((scores >= best_accuracy_threshold(scores, same)) == same)
    for t in np.r_[scores, np.inf]:
        assert np.mean((scores >= t) == same) <= best + 1e-12
    eer, _ = equal_error_rate(scores, same)
    assert 0.0 <= eer <= 1.0
