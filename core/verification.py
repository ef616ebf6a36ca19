"""Metrics of 1:1 verification: ROC and DET curves, EER, TAR at FAR, k-fold accuracy.

Scores are similarities (higher means more alike); a pair is accepted when its
score is at least the threshold. Terms follow ISO/IEC 19795-1: the false match
rate (FMR, also FAR) is the share of impostor pairs accepted, the true match
rate (TMR, also TAR) the share of genuine pairs accepted, and the false
non-match rate FNMR = 1 - TMR. The k-fold accuracy follows the LFW protocol
(Huang et al. 2007, "unrestricted" view 2): each fold is scored with the
threshold that maximises accuracy on the other folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from facefed.core.errors import ConfigurationError

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class RocCurve:
    """Operating points of a score set, from the strictest threshold down.

    Attributes:
        thresholds: Decreasing thresholds (the first is +inf: accept none).
        fmr: False match rate at each threshold.
        tmr: True match rate at each threshold.
    """

    thresholds: Array
    fmr: Array
    tmr: Array

    @property
    def fnmr(self) -> Array:
        """False non-match rate at each threshold."""
        return 1.0 - self.tmr


@dataclass(frozen=True)
class KFoldAccuracy:
    """Result of the k-fold accuracy protocol.

    Attributes:
        fold_ids: The fold of each entry below.
        accuracies: Accuracy on each fold with the threshold of the others.
        thresholds: The threshold used on each fold.
    """

    fold_ids: list[int]
    accuracies: list[float]
    thresholds: list[float]

    @property
    def mean(self) -> float:
        """Mean accuracy over the folds."""
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Standard deviation of the fold accuracies."""
        return float(np.std(self.accuracies))


def _check(scores: Array, same: Array) -> tuple[Array, Array]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    same = np.asarray(same).reshape(-1)
    if scores.shape != same.shape:
        raise ConfigurationError(
            f"Got {scores.size} scores but {same.size} labels; they must match."
        )
    if not np.all(np.isfinite(scores)):
        raise ConfigurationError("Scores must be finite numbers.")
    if not np.isin(same, (0, 1, True, False)).all():
        raise ConfigurationError("Labels must be 0 (impostor) or 1 (genuine).")
    same = same.astype(bool)
    if same.all() or not same.any():
        raise ConfigurationError(
            "A verification metric needs both genuine and impostor pairs; got "
            f"{int(same.sum())} genuine of {same.size}."
        )
    return scores, same


def roc_curve(scores: Array, same: Array) -> RocCurve:
    """Return the ROC of a score set at every distinct score.

    Args:
        scores: Similarity of each pair.
        same: 1 for a genuine pair, 0 for an impostor pair.
    """
    scores, same = _check(scores, same)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    genuine = np.cumsum(same[order])
    impostor = np.cumsum(~same[order])
    # Keep the last index of each run of equal scores: accept all of a tie.
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    thresholds = np.r_[np.inf, sorted_scores[last]]
    tmr = np.r_[0.0, genuine[last] / same.sum()]
    fmr = np.r_[0.0, impostor[last] / (~same).sum()]
    return RocCurve(thresholds=thresholds, fmr=fmr, tmr=tmr)


def threshold_at_fmr(scores: Array, same: Array, fmr: float) -> float:
    """Return the lowest threshold whose empirical FMR is at most ``fmr``.

    Raises:
        ConfigurationError: ``fmr`` is not in (0, 1].
    """
    if not 0.0 < fmr <= 1.0:
        raise ConfigurationError(f"A target FMR must be in (0, 1], got {fmr}.")
    scores, same = _check(scores, same)
    impostors = np.sort(scores[~same])[::-1]
    allowed = math.floor(fmr * impostors.size + 1e-9)
    if allowed >= impostors.size:
        return float(impostors[-1])
    # Accept only scores above the (allowed+1)-th highest impostor.
    return float(np.nextafter(impostors[allowed], np.inf))


def tar_at_far(scores: Array, same: Array, far: float) -> tuple[float, float]:
    """Return (TAR, threshold) at the threshold of ``threshold_at_fmr``."""
    threshold = threshold_at_fmr(scores, same, far)
    scores, same = _check(scores, same)
    return float(np.mean(scores[same] >= threshold)), threshold


def equal_error_rate(scores: Array, same: Array) -> tuple[float, float]:
    """Return (EER, threshold): where FMR and FNMR cross on the ROC.

    The EER is interpolated linearly between the two ROC points that bracket
    the crossing of FMR and FNMR.
    """
    roc = roc_curve(scores, same)
    difference = roc.fnmr - roc.fmr  # starts at 1, ends at -1 or 0, decreasing
    after = int(np.argmax(difference <= 0))
    if after == 0:
        return 0.0, float(roc.thresholds[0])
    before = after - 1
    span = difference[before] - difference[after]
    weight = difference[before] / span if span > 0 else 0.0
    eer = roc.fmr[before] + weight * (roc.fmr[after] - roc.fmr[before])
    return float(eer), float(roc.thresholds[after])


def best_accuracy_threshold(scores: Array, same: Array) -> float:
    """Return the threshold that maximises accuracy (midpoint between scores)."""
    scores, same = _check(scores, same)
    order = np.argsort(scores, kind="stable")
    ordered, labels = scores[order], same[order]
    # Split k accepts ordered[k:]: correct = impostors below + genuines at/above.
    impostors_below = np.r_[0, np.cumsum(~labels)]
    genuine_above = labels.sum() - np.r_[0, np.cumsum(labels)]
    correct = impostors_below + genuine_above
    valid = np.r_[True, np.diff(ordered) > 0, True]  # never split a tie
    correct = np.where(valid, correct, -1)
    split = int(np.argmax(correct))
    if split == 0:
        return float(ordered[0] - 1.0)
    if split == ordered.size:
        return float(ordered[-1] + 1.0)
    return float((ordered[split - 1] + ordered[split]) / 2.0)


def accuracy_at(scores: Array, same: Array, threshold: float) -> float:
    """Return the share of pairs decided correctly at ``threshold``."""
    scores = np.asarray(scores, np.float64)
    return float(np.mean((scores >= threshold) == np.asarray(same).astype(bool)))


def kfold_accuracy(scores: Array, same: Array, folds: Array) -> KFoldAccuracy:
    """Accuracy by the LFW protocol: each fold judged with the others' threshold.

    Args:
        scores: Similarity of each pair.
        same: 1 genuine, 0 impostor.
        folds: Fold id of each pair (at least two distinct folds).

    Raises:
        ConfigurationError: Fewer than two folds, or mismatched lengths.
    """
    scores, same = _check(scores, same)
    folds = np.asarray(folds).reshape(-1)
    if folds.shape != scores.shape:
        raise ConfigurationError(
            f"Got {folds.size} fold ids for {scores.size} pairs; they must match."
        )
    fold_ids = sorted(int(f) for f in np.unique(folds))
    if len(fold_ids) < 2:
        raise ConfigurationError(
            f"k-fold accuracy needs at least two folds, got {fold_ids}."
        )
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        threshold = best_accuracy_threshold(scores[~test], same[~test])
        thresholds.append(threshold)
        accuracies.append(accuracy_at(scores[test], same[test], threshold))
    return KFoldAccuracy(
        fold_ids=fold_ids, accuracies=accuracies, thresholds=thresholds
    )
