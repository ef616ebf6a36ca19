"""Presentation attack detection: silent cues and an interactive challenge.

`default_checker()` returns the checker the default face pipeline uses
(`models.zoo.default_pipeline(liveness=True)`); its `check(image, face)` gives a
`LivenessResult`. `require_live(result)` turns a refusal into a `SpoofError`
carrying the reasons.
"""

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facefed.core.liveness.silent import SilentLivenessChecker


@lru_cache(maxsize=1)
def default_checker() -> "SilentLivenessChecker":
    """Return the process-wide default silent liveness checker (loaded once)."""
    from facefed.core.liveness.silent import SilentLivenessChecker

    return SilentLivenessChecker()


__all__ = ["default_checker"]
