"""PAD evaluation: APCER and BPCER per ISO/IEC 30107-3, DET curves, calibration.

Terms follow ISO/IEC 30107-3:2017, clause 13: an attack presentation
classification error (APCER) is an attack presentation accepted as bona fide,
computed separately for every presentation attack instrument species (here:
the label file's `attack_type`), the worst species being the figure reported;
a bona fide presentation classification error (BPCER) is a live presentation
refused as an attack.
"""

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from facefed.core.errors import ConfigurationError, FacefedError
from facefed.core.types import Face, ImageArray, LivenessResult

logger = logging.getLogger(__name__)

SampleKind = Literal["frame", "crop"]
CropMode = Literal["whole", "detect"]


@dataclass(frozen=True)
class PadSample:
    """One labelled presentation.

    Attributes:
        path: Image path.
        live: True for a bona fide presentation.
        attack_type: Presentation attack instrument species; "" when live.
        kind: `frame` for a full camera frame, `crop` for a tight face crop.
    """

    path: Path
    live: bool
    attack_type: str
    kind: SampleKind


@dataclass
class ScoredSample:
    """A sample with the checker's answer.

    Attributes:
        sample: The labelled presentation.
        score: Fused liveness score; NaN when no face could be checked.
        cues: The checker's per-cue scores.
        area: Pixels of the image as stored (before any rescaling).
        error: Why the sample could not be scored, or "".
    """

    sample: PadSample
    score: float
    cues: dict[str, float] = field(default_factory=dict)
    area: int = 0
    error: str = ""


def short_attack_type(text: str) -> str:
    """Cut an attack type description at its first parenthesis."""
    return text.split("(")[0].strip() or "unspecified"


_LABEL_COLUMNS = frozenset({"path", "label", "attack_type", "source"})


def load_pad_samples(root: Path, labels: Path) -> list[PadSample]:
    """Read `path,label,attack_type,subject,source` rows of an anti-spoofing set.

    Args:
        root: Folder the label paths are relative to.
        labels: The CSV file.

    Returns:
        The samples; the `silent_face` source gives full frames, the others
        tight crops.

    Raises:
        ConfigurationError: If the file cannot be read as UTF-8 CSV, lacks a
            column, holds no rows, or a label is neither `live` nor `spoof`.
    """
    try:
        with open(labels, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigurationError(
            f"Cannot read the label file {labels}: {error}."
        ) from None
    missing = sorted(_LABEL_COLUMNS - set(rows[0] if rows else ()))
    if not rows or missing:
        raise ConfigurationError(
            f"The label file {labels} holds no rows with the columns "
            f"{', '.join(sorted(_LABEL_COLUMNS))}"
            + (f" (missing: {', '.join(missing)})." if rows else ".")
        )
    samples = []
    for row in rows:
        if any(row.get(column) is None for column in _LABEL_COLUMNS):
            raise ConfigurationError(
                f"A row of {labels} has too few fields: {row.get('path')!r}."
            )
        label = row["label"].strip()
        if label not in ("live", "spoof"):
            raise ConfigurationError(
                f"Unknown label {label!r} for {row['path']} in {labels}; "
                "expected live or spoof."
            )
        kind: SampleKind = "frame" if row["source"] == "silent_face" else "crop"
        samples.append(
            PadSample(
                path=root / row["path"],
                live=label == "live",
                attack_type=""
                if label == "live"
                else short_attack_type(row["attack_type"]),
                kind=kind,
            )
        )
    return samples


def score_sample(
    check: Callable[[ImageArray, Face], LivenessResult],
    image: ImageArray,
    face: Face,
) -> tuple[float, dict[str, float]]:
    """Run a checker on one face and return its fused score and cues."""
    result = check(image, face)
    return result.score, dict(result.cues)


@dataclass(frozen=True)
class ErrorRates:
    """APCER per species, worst APCER and BPCER at one threshold.

    Attributes:
        threshold: Scores at or above it are classified bona fide.
        apcer: APCER of each attack species.
        apcer_max: The worst species' APCER (ISO/IEC 30107-3 reporting).
        bpcer: Share of live presentations classified as attacks.
        n_live: Live presentations counted.
        n_attack: Attack presentations of each species.
    """

    threshold: float
    apcer: dict[str, float]
    apcer_max: float
    bpcer: float
    n_live: int
    n_attack: dict[str, int]


def error_rates(
    live_scores: Sequence[float],
    attack_scores: dict[str, Sequence[float]],
    threshold: float,
) -> ErrorRates:
    """Compute APCER per species and BPCER at a threshold.

    Args:
        live_scores: Fused scores of bona fide presentations.
        attack_scores: Fused scores of attack presentations by species.
        threshold: Scores at or above it are classified bona fide.

    Returns:
        The error rates; a rate over an empty set is NaN.

    Raises:
        FacefedError: If there are no scores at all.
    """
    if not live_scores and not any(attack_scores.values()):
        raise FacefedError("There are no scored presentations to evaluate.")
    live = np.asarray(live_scores, dtype=np.float64)
    bpcer = float(np.mean(live < threshold)) if live.size else math.nan
    apcer = {
        species: float(np.mean(np.asarray(scores) >= threshold))
        for species, scores in attack_scores.items()
        if len(scores)
    }
    return ErrorRates(
        threshold=threshold,
        apcer=apcer,
        apcer_max=max(apcer.values()) if apcer else math.nan,
        bpcer=bpcer,
        n_live=int(live.size),
        n_attack={species: len(scores) for species, scores in attack_scores.items()},
    )


def det_points(
    live_scores: Sequence[float], attack_scores: dict[str, Sequence[float]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return thresholds and the worst-species APCER and BPCER at each.

    The thresholds are every distinct score plus one above the maximum, so the
    curve runs from (APCER 1, BPCER 0) to (APCER 0, BPCER 1).
    """
    pooled = np.concatenate(
        [np.asarray(live_scores, np.float64)]
        + [np.asarray(s, np.float64) for s in attack_scores.values()]
    )
    thresholds = np.unique(np.concatenate([pooled, [np.inf]]))
    apcer = np.empty_like(thresholds)
    bpcer = np.empty_like(thresholds)
    for index, threshold in enumerate(thresholds):
        rates = error_rates(live_scores, attack_scores, float(threshold))
        apcer[index], bpcer[index] = rates.apcer_max, rates.bpcer
    return thresholds, apcer, bpcer


def calibrate_threshold(
    live_scores: Sequence[float],
    attack_scores: dict[str, Sequence[float]],
    *,
    max_apcer: float,
) -> ErrorRates:
    """Pick the threshold with the lowest BPCER whose worst APCER is acceptable.

    Among the thresholds of `det_points` whose worst-species APCER is at most
    `max_apcer`, take the one with the lowest BPCER; ties go to the midpoint
    between that score and the next lower one, so the threshold does not sit
    exactly on a training score.

    Args:
        live_scores: Bona fide scores.
        attack_scores: Attack scores by species.
        max_apcer: The highest acceptable worst-species APCER, in [0, 1].

    Returns:
        The error rates at the chosen threshold.

    Raises:
        ConfigurationError: If `max_apcer` is outside [0, 1].
    """
    if not 0.0 <= max_apcer <= 1.0:
        raise ConfigurationError(f"max_apcer must be in [0, 1], got {max_apcer}.")
    thresholds, apcer, bpcer = det_points(live_scores, attack_scores)
    allowed = np.flatnonzero(apcer <= max_apcer)
    best = allowed[np.argmin(bpcer[allowed])]
    chosen = thresholds[best]
    if best > 0 and np.isfinite(chosen):
        chosen = (thresholds[best] + thresholds[best - 1]) / 2
    elif not np.isfinite(chosen):
        chosen = 1.0
    return error_rates(live_scores, attack_scores, float(chosen))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two sequences; NaN when either is constant."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def plot_det(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    *,
    title: str,
) -> None:
    """Draw DET curves (worst-species APCER against BPCER) on normal-deviate axes.

    Args:
        curves: Label to (APCER, BPCER) arrays.
        path: PNG file to write.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    ticks = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9])
    clip = (0.005, 0.995)
    figure, axes = plt.subplots(figsize=(5.5, 5.0))
    for label, (apcer, bpcer) in curves.items():
        axes.plot(
            norm.ppf(np.clip(apcer, *clip)),
            norm.ppf(np.clip(bpcer, *clip)),
            drawstyle="steps-post",
            label=label,
        )
    axes.set_xticks(norm.ppf(ticks), [f"{t:.0%}" for t in ticks])
    axes.set_yticks(norm.ppf(ticks), [f"{t:.0%}" for t in ticks])
    axes.set_xlim(norm.ppf(clip[0]), norm.ppf(clip[1]))
    axes.set_ylim(norm.ppf(clip[0]), norm.ppf(clip[1]))
    axes.set_xlabel("APCER (worst attack species)")
    axes.set_ylabel("BPCER")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def equal_error_rate(
    live_scores: Sequence[float], attack_scores: dict[str, Sequence[float]]
) -> tuple[float, float]:
    """Return (EER, threshold) where worst-species APCER and BPCER are closest."""
    thresholds, apcer, bpcer = det_points(live_scores, attack_scores)
    index = int(np.argmin(np.maximum(apcer, bpcer)))
    return float(max(apcer[index], bpcer[index])), float(thresholds[index])


def split_scores(
    scored: Sequence[ScoredSample], key: str | None = None
) -> tuple[list[float], dict[str, list[float]]]:
    """Split scored samples into live scores and attack scores by species.

    Args:
        scored: Scored samples; unscored ones (NaN) are left out.
        key: A cue name to use instead of the fused score.

    Returns:
        Live scores, and attack scores keyed by species.
    """
    live: list[float] = []
    attacks: dict[str, list[float]] = {}
    for item in scored:
        value = item.score if key is None else item.cues.get(key, math.nan)
        if math.isnan(value):
            continue
        if item.sample.live:
            live.append(value)
        else:
            attacks.setdefault(item.sample.attack_type, []).append(value)
    return live, attacks
