"""`facefed demo --fast` runs every step end to end and stops what it started."""

import socket

import pytest
from rich.console import Console

from facefed.client import demo
from facefed.client.demo import STEPS, DemoConfig, DemoError, run_demo


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, int(port))) == 0


@pytest.mark.slow
def test_the_fast_demo_runs_every_step_and_writes_its_report(tmp_path, monkeypatch):
    servers = []

    original = demo.ServerProcess.start

    def remember(self):
        servers.append(self)
        return original(self)

    monkeypatch.setattr(demo.ServerProcess, "start", remember)
    console = Console(record=True, width=120)
    results = run_demo(DemoConfig(output=tmp_path, fast=True), console=console)

    log = console.export_text()
    for number, (name, _) in enumerate(STEPS, start=1):
        assert f"{number}. {name}" in log
    before = results["before"]
    assert before["probes"] >= 10 and before["rank1"] >= 0.9
    assert before["false_accepts"] <= 1
    assert results["spoofs_refused"] and results["refusals_in_audit"] >= 1
    training = results["training"]
    assert set(training["epsilon"]) == {"site-a", "site-b"}
    assert all(
        0 < eps <= training["target_epsilon"] for eps in training["epsilon"].values()
    )
    encrypted = results["encrypted"]
    assert abs(encrypted["genuine_score"] - encrypted["genuine_plain"]) < 1e-3
    assert encrypted["genuine_match"] and not encrypted["impostor_match"]
    assert results["subject"]["erasure_removed"]["data_key_destroyed"] is True
    report = (tmp_path / "report.md").read_text()
    assert "rank-1 accuracy" in report and "epsilon" in report
    assert (tmp_path / "scores.png").stat().st_size > 1000
    assert (tmp_path / "timings.png").stat().st_size > 1000
    # Everything started was stopped.
    assert servers and not _port_open(servers[0].url)
    # No API key or subject token is ever printed.
    assert "ffk_" not in log and "ffs_" not in log


def test_a_failing_step_stops_the_demo_naming_it(tmp_path):
    # An earlier run's report must not survive a failed run.
    stale = {name: tmp_path / name for name in demo.REPORT_FILES}
    for path in stale.values():
        path.write_text("an earlier run")
    with pytest.raises(DemoError, match="people with three photos") as caught:
        run_demo(
            # Only tests/data (48 people): the shared set is pointed elsewhere.
            DemoConfig(output=tmp_path, people_per_site=40, shared_dir=tmp_path),
            console=Console(record=True),
        )
    assert "step 'prepare folder'" in str(caught.value)
    assert not [name for name, path in stale.items() if path.exists()]
    marker = (tmp_path / demo.FAILED_MARKER).read_text()
    assert "step 'prepare folder'" in marker
