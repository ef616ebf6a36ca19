import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefed.core.errors import (
    ConfigurationError,
    ConflictError,
    PrivacyBudgetExceededError,
)
from facefed.privacy.dp import (
    DPConfig,
    LedgerError,
    PrivacyLedger,
    epsilon_from_history,
    noise_for_budget,
    run_epsilon,
)


def test_config_is_keyword_only_and_validated():
    with pytest.raises(TypeError):
        DPConfig(1.0, 1.0)  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match=r"noise_multiplier .* got -1"):
        DPConfig(noise_multiplier=-1, max_grad_norm=1.0)
    with pytest.raises(ConfigurationError, match=r"delta must be in \(0, 1\), got 2"):
        DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=2)
    with pytest.raises(ConfigurationError, match="known accountants: rdp, prv"):
        DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, accountant="gdp")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_grad_norm"):
        DPConfig(noise_multiplier=1.0, max_grad_norm=float("nan"))


def test_known_value_from_opacus_rdp():
    # sigma 1.0, q 0.01, 1000 steps, delta 1e-5: the classic RDP figure is ~2.1.
    epsilon = epsilon_from_history([(1.0, 0.01, 1000)], delta=1e-5)
    assert 1.9 < epsilon < 2.3
    prv = epsilon_from_history([(1.0, 0.01, 1000)], delta=1e-5, accountant="prv")
    assert prv < epsilon  # PRV is tighter


@settings(max_examples=10, deadline=None)
@given(
    sigma=st.floats(0.6, 3.0),
    rate=st.floats(0.001, 0.2),
    steps=st.integers(1, 2000),
    extra=st.integers(1, 2000),
)
def test_epsilon_grows_with_steps(sigma, rate, steps, extra):
    fewer = epsilon_from_history([(sigma, rate, steps)], delta=1e-5)
    more = epsilon_from_history([(sigma, rate, steps + extra)], delta=1e-5)
    assert more >= fewer > 0


@settings(max_examples=10, deadline=None)
@given(
    sigma=st.floats(0.6, 3.0),
    factor=st.floats(1.05, 3.0),
    rate=st.floats(0.001, 0.2),
    steps=st.integers(1, 2000),
)
def test_epsilon_shrinks_with_noise(sigma, factor, rate, steps):
    noisy = epsilon_from_history([(sigma * factor, rate, steps)], delta=1e-5)
    quiet = epsilon_from_history([(sigma, rate, steps)], delta=1e-5)
    assert noisy <= quiet


@settings(max_examples=8, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.floats(0.7, 2.0), st.floats(0.005, 0.1), st.integers(1, 500)),
        min_size=2,
        max_size=4,
    )
)
def test_composed_epsilon_never_exceeds_sum(runs):
    composed = epsilon_from_history(runs, delta=1e-5)
    summed = sum(epsilon_from_history([run], delta=1e-5) for run in runs)
    assert composed <= summed + 1e-9
    assert composed >= max(epsilon_from_history([run], delta=1e-5) for run in runs)


def test_ledger_records_composes_and_enforces_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path / "site" / "ledger.json")
    config = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    first = ledger.record_run(
        "site-a", run_id="r1", config=config, sample_rate=0.02, steps=300
    )
    assert first.epsilon == pytest.approx(
        run_epsilon(config, sample_rate=0.02, steps=300)
    )
    ledger.record_run("site-a", run_id="r2", config=config, sample_rate=0.02, steps=300)
    ledger.record_run("site-b", run_id="r1", config=config, sample_rate=0.02, steps=10)

    reopened = PrivacyLedger(tmp_path / "site" / "ledger.json")
    assert [e.run_id for e in reopened.entries("site-a")] == ["r1", "r2"]
    composed = reopened.spent_epsilon("site-a", delta=1e-5)
    assert composed == pytest.approx(
        epsilon_from_history([(1.1, 0.02, 600)], delta=1e-5)
    )
    assert composed < reopened.summed_epsilon("site-a")

    with pytest.raises(ConflictError, match="r1"):
        reopened.record_run(
            "site-a", run_id="r1", config=config, sample_rate=0.02, steps=1
        )
    remaining = reopened.ensure_budget("site-a", budget=composed + 1.0)
    assert remaining == pytest.approx(composed)
    with pytest.raises(PrivacyBudgetExceededError, match="site-a"):
        reopened.ensure_budget("site-a", budget=composed + 0.1, planned_epsilon=0.5)
    with pytest.raises(PrivacyBudgetExceededError):
        reopened.ensure_budget(
            "site-a", budget=composed + 0.01, planned_run=(config, 0.02, 300)
        )
    with pytest.raises(PrivacyBudgetExceededError, match="over its budget"):
        reopened.ensure_budget("site-a", budget=composed)
    # Another site's budget is its own.
    reopened.ensure_budget("site-b", budget=composed)


def test_ledger_refuses_bad_input_and_changes_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    ledger.record_run("s", run_id="r", config=config, sample_rate=0.1, steps=5)
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match="sample_rate"):
        ledger.record_run("s", run_id="x", config=config, sample_rate=1.5, steps=5)
    with pytest.raises(ConfigurationError, match="steps"):
        ledger.record_run("s", run_id="x", config=config, sample_rate=0.1, steps=-1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ledger.json",
        "ledger.json.lock",
    ]
    path.write_text(json.dumps({"format": 99, "runs": []}))
    with pytest.raises(LedgerError, match="format 99"):
        ledger.entries()
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="cannot be read"):
        ledger.entries()


def test_noise_for_budget_meets_the_target():
    sigma = noise_for_budget(
        target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000
    )
    achieved = epsilon_from_history([(sigma, 0.01, 1000)], delta=1e-5)
    assert 2.9 <= achieved <= 3.0


def test_concurrent_recording_keeps_every_run(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0)

    def record(worker: int) -> None:
        ledger = PrivacyLedger(tmp_path / "ledger.json")
        for run in range(3):
            ledger.record_run(
                "s", run_id=f"w{worker}-r{run}", config=config, sample_rate=0.1, steps=2
            )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(record, range(4)))
    assert len(PrivacyLedger(tmp_path / "ledger.json").entries("s")) == 12
