"""Presentation attack detection: silent cues and an interactive challenge.

`default_checker()` returns the checker the default face pipeline uses
(`models.zoo.default_pipeline(liveness=True)`); its `check(image, face)` gives a
`LivenessResult`. `require_live(result)` turns a refusal into a `SpoofError`
carrying the reasons.
"""

from functools import lru_cache
from typing import TYPE_CHECKING

from facefed.core.errors import SpoofError
from facefed.core.types import LivenessResult

if TYPE_CHECKING:
    from facefed.core.liveness.silent import SilentLivenessChecker


@lru_cache(maxsize=1)
def default_checker() -> "SilentLivenessChecker":
    """Return the process-wide default silent liveness checker (loaded once)."""
    from facefed.core.liveness.silent import SilentLivenessChecker

    return SilentLivenessChecker()


def require_live(result: LivenessResult) -> None:
    """Raise SpoofError with the checker's reasons when a face is not live.

    This is what enrollment and matching call after `checker.check`; the
    error's `reasons` are the sentences to show an operator and to count in an
    audit log (they hold scores, never image data).

    Args:
        result: A liveness result.

    Raises:
        SpoofError: If `result.is_live` is False.
    """
    if not result.is_live:
        raise SpoofError(
            f"Presentation attack suspected (liveness score {result.score:.2f} "
            f"< {result.threshold:.2f}).",
            list(result.reasons),
        )


__all__ = ["default_checker", "require_live"]
