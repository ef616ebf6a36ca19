"""Unlinkability of protected templates: the D<->(s) and D<->sys measures.

Gomez-Barrero, Galbally, Rathgeb and Busch (2018), "General Framework to
Evaluate Unlinkability in Biometric Template Protection Systems", IEEE
Transactions on Information Forensics and Security 13(6), as adopted by
ISO/IEC 30136. Templates of the same subject made with two different keys
give *mated* scores; templates of different subjects under the two keys give
*non-mated* scores. If the two score distributions coincide, a score tells an
attacker nothing about whether two templates belong to the same person.

With the likelihood ratio LR(s) = p(s | mated) / p(s | non-mated) and the
prior ratio omega = p(mated) / p(non-mated) (1 here: no prior knowledge),

    D<->(s) = 2 * LR(s) * omega / (1 + LR(s) * omega) - 1   if LR(s) * omega > 1
            = 0                                              otherwise,

which is p(mated | s) - p(non-mated | s) where mated is the more likely, and

    D<->sys = integral of p(s | mated) * D<->(s) ds,

0 for fully unlinkable templates and 1 for fully linkable ones. The score
densities are estimated with Gaussian kernel density estimates (Scott's
bandwidth) on a common grid.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

GRID_POINTS = 1024
MIN_SCORES = 10


@dataclass(frozen=True)
class UnlinkabilityResult:
    """D<->sys and the local measure on its score grid.

    Attributes:
        d_sys: The global measure D<->sys, in [0, 1].
        grid: Scores at which the densities and D<->(s) are evaluated.
        mated_density: Estimated p(s | mated) on `grid`.
        non_mated_density: Estimated p(s | non-mated) on `grid`.
        local: D<->(s) on `grid`.
    """

    d_sys: float
    grid: np.ndarray
    mated_density: np.ndarray
    non_mated_density: np.ndarray
    local: np.ndarray


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size < MIN_SCORES:
        raise ConfigurationError(
            f"{name} needs at least {MIN_SCORES} scores, got {values.size}."
        )
    if not np.all(np.isfinite(values)):
        raise ConfigurationError(f"{name} contains NaN or infinite values.")
    return values


def _density(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    from scipy.stats import gaussian_kde

    if np.ptp(values) == 0:
        # A constant score set has no spread for the kernel: use a narrow bump.
        width = (grid[-1] - grid[0]) / 200
        density = np.exp(-0.5 * ((grid - values[0]) / width) ** 2)
    else:
        density = gaussian_kde(values)(grid)
    return density / np.trapezoid(density, grid)


def local_measure(
    mated_density: np.ndarray, non_mated_density: np.ndarray, *, omega: float = 1.0
) -> np.ndarray:
    """D<->(s) from the two densities at the same scores (Gomez-Barrero, 2018)."""
    # 2 LR w / (1 + LR w) - 1 = (w m - n) / (w m + n): no overflow where n -> 0.
    weighted = omega * np.asarray(mated_density, dtype=np.float64)
    non_mated = np.asarray(non_mated_density, dtype=np.float64)
    total = weighted + non_mated
    linked = np.divide(
        weighted - non_mated, total, out=np.zeros_like(total), where=total > 0
    )
    return np.where(weighted > non_mated, linked, 0.0)


def unlinkability(
    mated: np.ndarray, non_mated: np.ndarray, *, omega: float = 1.0
) -> UnlinkabilityResult:
    """Estimate D<->sys from mated and non-mated cross-key scores.

    Args:
        mated: Scores between templates of the same subject under two keys.
        non_mated: Scores between different subjects under the two keys.
        omega: Prior ratio p(mated) / p(non-mated); 1 assumes nothing.

    Returns:
        The global measure with the densities and local measure behind it.
    """
    mated_scores = _check_scores(mated, "mated")
    non_mated_scores = _check_scores(non_mated, "non_mated")
    if not np.isfinite(omega) or omega <= 0:
        raise ConfigurationError(f"omega must be a positive number, got {omega!r}.")
    low = min(mated_scores.min(), non_mated_scores.min())
    high = max(mated_scores.max(), non_mated_scores.max())
    margin = 0.1 * max(high - low, 1e-3)
    grid = np.linspace(low - margin, high + margin, GRID_POINTS)
    mated_density = _density(mated_scores, grid)
    non_mated_density = _density(non_mated_scores, grid)
    local = local_measure(mated_density, non_mated_density, omega=omega)
    d_sys = float(np.clip(np.trapezoid(mated_density * local, grid), 0.0, 1.0))
    return UnlinkabilityResult(d_sys, grid, mated_density, non_mated_density, local)


def plot_unlinkability(
    mated: np.ndarray,
    non_mated: np.ndarray,
    result: UnlinkabilityResult,
    path: Path,
    *,
    title: str,
) -> None:
    """Save the mated and non-mated histograms with D<->(s) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(result.grid[0], result.grid[-1], 60).tolist()
    axis.hist(non_mated, bins=bins, density=True, alpha=0.5, label="non-mated")
    axis.hist(mated, bins=bins, density=True, alpha=0.5, label="mated")
    axis.set_xlabel("cross-key score")
    axis.set_ylabel("density")
    local_axis = axis.twinx()
    local_axis.plot(result.grid, result.local, color="black", linewidth=1.2)
    local_axis.set_ylim(0, 1.05)
    local_axis.set_ylabel("D<->(s)")
    axis.set_title(f"{title}: D<->sys = {result.d_sys:.3f}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
