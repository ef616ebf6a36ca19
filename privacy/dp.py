"""Differential privacy settings and a persisted per-site privacy ledger.

Every DP-SGD run a site takes part in spends privacy budget. The ledger keeps
each run's accountant history (noise multiplier, sample rate, steps) in a
JSON file under the site's folder and computes the site's epsilon at a given
delta with Opacus' accountants.

Composition across runs: summing each run's epsilon is a valid upper bound
(basic composition, Dwork and Roth, 2014, Theorem 3.16), but a loose one. The
ledger instead concatenates the histories of all runs into one accountant and
converts once: RDP composes additively per order (Mironov, 2017, Proposition
1), and the PRV accountant composes the privacy loss distributions (Gopi et
al., 2021), both of which give a tighter epsilon than the sum. `summed_epsilon`
is kept for comparison and for callers that only know a planned epsilon.

FIXME: both accountants assume each batch is a Poisson sample of the site's
data at `sample_rate` (Opacus' default data loader does this). A training
loop that shuffles into fixed-size batches instead gets an epsilon that is
not a proven bound, and the ledger cannot tell the two apart.
"""

import fcntl
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from facefed.core.errors import (
    ConfigurationError,
    ConflictError,
    FacefedError,
    PrivacyBudgetExceededError,
)
from facefed.core.settings import get_core_settings

logger = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]

LEDGER_FORMAT = 1

RDP_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + [
    float(a) for a in (*range(12, 64), 80, 96, 128, 192, 256, 512)
]
"""Rényi orders searched when converting RDP to (epsilon, delta) (Mironov, 2017)."""


class LedgerError(FacefedError):
    """Raised when the ledger file is unreadable or was written by another format."""

    exit_code = 7


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """DP-SGD settings of one training run (Abadi et al., 2016).

    Attributes:
        noise_multiplier: Gaussian noise standard deviation over the clipping
            norm (sigma); larger is more private.
        max_grad_norm: Per-sample gradient clipping norm (C).
        delta: Target delta of the (epsilon, delta) guarantee; keep it below
            1 / number of samples at the site.
        target_epsilon: Budget the site allows itself in total (across runs).
        accountant: ``rdp`` (Rényi DP, Mironov, 2017) or ``prv`` (privacy loss
            random variables, Gopi et al., 2021; tighter, slower).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    target_epsilon: float = 8.0
    accountant: AccountantName = "rdp"

    def __post_init__(self) -> None:
        _check_positive("noise_multiplier", self.noise_multiplier)
        _check_positive("max_grad_norm", self.max_grad_norm)
        _check_positive("target_epsilon", self.target_epsilon)
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise ConfigurationError(f"delta must be in (0, 1), got {self.delta!r}.")
        _check_accountant(self.accountant)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number, got {value!r}.")


def _check_accountant(name: Any) -> None:
    if name not in get_args(AccountantName):
        raise ConfigurationError(
            f"Unknown accountant {name!r}; known accountants: "
            f"{', '.join(get_args(AccountantName))}."
        )


def _check_sample_rate(sample_rate: Any) -> None:
    if not _is_number(sample_rate) or not 0 < sample_rate <= 1:
        raise ConfigurationError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigurationError(f"steps must be an integer >= 0, got {steps!r}.")


History = list[tuple[float, float, int]]


def epsilon_from_history(
    history: History, *, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon at `delta` of a composed history of (sigma, sample rate, steps).

    Args:
        history: One entry per homogeneous stretch of DP-SGD steps.
        delta: Target delta.
        accountant: ``rdp`` or ``prv`` (see `DPConfig`).

    Returns:
        The epsilon Opacus' accountant reports; 0.0 for an empty history.
    """
    from opacus.accountants import PRVAccountant, RDPAccountant

    _check_accountant(accountant)
    if not 0 < delta < 1:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta!r}.")
    entries = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not entries:
        return 0.0
    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = entries
        # Orders above Opacus' default 63 tighten the bound for small epsilons.
        return float(rdp.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    prv = PRVAccountant()
    prv.history = entries
    return float(prv.get_epsilon(delta=delta))


def run_epsilon(
    config: DPConfig, *, sample_rate: float, steps: int, delta: float | None = None
) -> float:
    """Epsilon of one run on its own, at `delta` (the config's by default)."""
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    return epsilon_from_history(
        [(config.noise_multiplier, sample_rate, steps)],
        delta=config.delta if delta is None else delta,
        accountant=config.accountant,
    )


def noise_for_budget(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
) -> float:
    """Smallest noise multiplier whose run stays within `target_epsilon`.

    Wraps Opacus' `get_noise_multiplier`, which bisects on the accountant.
    """
    from opacus.accountants.utils import get_noise_multiplier

    _check_positive("target_epsilon", target_epsilon)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    _check_accountant(accountant)
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One training run recorded in the ledger.

    Attributes:
        site_id: Site that trained.
        run_id: Training run id (unique per site).
        noise_multiplier: Sigma used.
        sample_rate: Batch size over the site's number of samples (Poisson rate).
        steps: Optimizer steps taken.
        delta: Delta the run was accounted at.
        accountant: Accountant of the run's config.
        epsilon: The run's epsilon on its own at `delta`.
        recorded_at: UTC time of recording, ISO 8601.
    """

    site_id: str
    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon: float
    recorded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


def default_ledger_path() -> Path:
    """Where a site keeps its ledger: `$FACEFED_HOME/privacy/ledger.json`."""
    return get_core_settings().home / "privacy" / "ledger.json"


class PrivacyLedger:
    """Persisted record of every DP run per site, with budget enforcement.

    The file is rewritten atomically (write to a temporary file in the same
    folder, fsync, rename), so a crash leaves either the old or the new
    ledger, never half of one.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_ledger_path()

    # Reading and writing.

    def entries(self, site_id: str | None = None) -> list[LedgerEntry]:
        """All recorded runs, of one site when `site_id` is given, oldest first."""
        entries = self._load()
        if site_id is not None:
            entries = [e for e in entries if e.site_id == site_id]
        return entries

    def _load(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        try:
            document = json.loads(self.path.read_text())
            if document.get("format") != LEDGER_FORMAT:
                raise LedgerError(
                    f"The ledger {self.path} has format {document.get('format')!r}, "
                    f"expected {LEDGER_FORMAT}."
                )
            entries = [LedgerEntry(**item) for item in document["runs"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise LedgerError(
                f"The ledger {self.path} cannot be read: {error}."
            ) from error
        self._check_entries(entries)
        return entries

    def _check_entries(self, entries: list[LedgerEntry]) -> None:
        """Refuse an edited or damaged ledger rather than under-count its runs.

        A run with negative steps, a string sample rate or a foreign site id
        would otherwise count as no spending at all: a silent budget reset.
        """
        seen: set[tuple[str, str]] = set()
        for number, entry in enumerate(entries, start=1):
            try:
                _check_entry(entry)
            except ConfigurationError as error:
                raise LedgerError(
                    f"The ledger {self.path} is damaged at run {number}: {error}"
                ) from error
            if (entry.site_id, entry.run_id) in seen:
                raise LedgerError(
                    f"The ledger {self.path} records run {entry.run_id!r} of site "
                    f"{entry.site_id!r} twice."
                )
            seen.add((entry.site_id, entry.run_id))

    def _save(self, entries: list[LedgerEntry]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"format": LEDGER_FORMAT, "runs": [asdict(e) for e in entries]}
        handle, temporary = tempfile.mkstemp(
            dir=self.path.parent, prefix=".ledger-", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(document, stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # Accounting.

    def record_run(
        self,
        site_id: str,
        *,
        run_id: str,
        config: DPConfig,
        sample_rate: float,
        steps: int,
    ) -> LedgerEntry:
        """Record a finished (or partly finished) run and return its entry.

        Raises:
            ConflictError: When the site already recorded a run with this id.
            ConfigurationError: For an invalid sample rate or step count.
        """
        _check_id("site_id", site_id)
        _check_id("run_id", run_id)
        epsilon = run_epsilon(config, sample_rate=sample_rate, steps=steps)
        entry = LedgerEntry(
            site_id=site_id,
            run_id=run_id,
            noise_multiplier=float(config.noise_multiplier),
            sample_rate=float(sample_rate),
            steps=steps,
            delta=float(config.delta),
            accountant=config.accountant,
            epsilon=epsilon,
        )
        # Read, check and write under one lock: two processes recording at
        # once must not drop each other's runs.
        with self._locked():
            entries = self._load()
            if any(e.site_id == site_id and e.run_id == run_id for e in entries):
                raise ConflictError(
                    f"Site {site_id!r} already recorded run {run_id!r}."
                )
            self._save([*entries, entry])
        logger.info(
            "site %s run %s spent epsilon %.3f (delta %g)",
            site_id,
            run_id,
            epsilon,
            config.delta,
        )
        return entry

    def history(self, site_id: str) -> History:
        """The site's composed accountant history across every recorded run."""
        return [
            (e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries(site_id)
        ]

    def spent_epsilon(
        self, site_id: str, *, delta: float, accountant: AccountantName = "rdp"
    ) -> float:
        """Epsilon of all the site's runs composed in one accountant, at `delta`."""
        return epsilon_from_history(
            self.history(site_id), delta=delta, accountant=accountant
        )

    def summed_epsilon(self, site_id: str) -> float:
        """Sum of the runs' own epsilons: the basic-composition upper bound."""
        return sum(e.epsilon for e in self.entries(site_id))

    def ensure_budget(
        self,
        site_id: str,
        *,
        budget: float,
        delta: float = 1e-5,
        planned_epsilon: float = 0.0,
        planned_run: tuple[DPConfig, float, int] | None = None,
        accountant: AccountantName = "rdp",
    ) -> float:
        """Refuse training that would take the site past its budget.

        Give either `planned_run` = (config, sample_rate, steps), which is
        composed with the site's history in one accountant (the tight way), or
        `planned_epsilon`, which is added to the spent epsilon (basic
        composition, always valid). With neither, only checks that some budget
        is left.

        Returns:
            The epsilon that would be spent after the planned run.

        Raises:
            PrivacyBudgetExceededError: When that epsilon exceeds `budget`, or
                the budget is already spent.
        """
        _check_positive("budget", budget)
        if planned_run is not None:
            config, sample_rate, steps = planned_run
            _check_sample_rate(sample_rate)
            _check_steps(steps)
            history = [
                *self.history(site_id),
                (config.noise_multiplier, sample_rate, steps),
            ]
            after = epsilon_from_history(history, delta=delta, accountant=accountant)
        else:
            # `not >= 0` also refuses NaN, which passes every `>` comparison.
            if not _is_number(planned_epsilon) or not planned_epsilon >= 0:
                raise ConfigurationError(
                    f"planned_epsilon must be a number >= 0, got {planned_epsilon!r}."
                )
            after = self.spent_epsilon(site_id, delta=delta, accountant=accountant)
            after += planned_epsilon
        spent_already = planned_run is None and planned_epsilon == 0
        if math.isnan(after) or after > budget or (spent_already and after >= budget):
            raise PrivacyBudgetExceededError(
                f"Site {site_id!r} would reach epsilon {after:.3f} at delta {delta:g}, "
                f"over its budget of {budget:g}."
            )
        return after


def _check_entry(entry: LedgerEntry) -> None:
    """Check a loaded run's fields as `record_run` checked them when writing."""
    _check_id("site_id", entry.site_id)
    _check_id("run_id", entry.run_id)
    _check_positive("noise_multiplier", entry.noise_multiplier)
    _check_sample_rate(entry.sample_rate)
    _check_steps(entry.steps)
    if not _is_number(entry.delta) or not 0 < entry.delta < 1:
        raise ConfigurationError(f"delta must be in (0, 1), got {entry.delta!r}.")
    _check_accountant(entry.accountant)
    # An infinite epsilon is a legitimate (useless) run; NaN or < 0 is not.
    if not _is_number(entry.epsilon) or not entry.epsilon >= 0:
        raise ConfigurationError(f"epsilon must be >= 0, got {entry.epsilon!r}.")
    if not isinstance(entry.recorded_at, str):
        raise ConfigurationError(
            f"recorded_at must be an ISO 8601 string, got {entry.recorded_at!r}."
        )


def _check_id(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}.")
