"""SecAgg+ runs: the server learns the sites' average update, never one site's."""

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import SplitNetwork, load_network
from facefed.client.federated.store import SiteDataStore
from facefed.core.errors import ConfigurationError

QUANTISATION_LEVELS = 2**22
"""Flower's default SecAgg+ quantisation range (`secure_aggregation.make_workflow`)."""

SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def _federated_conftest():
    # The site-building helpers of this folder's conftest, loaded by path (a
    # second module named `conftest` cannot be imported by name).
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("federated_site_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def _third_cached_site(_cached_sites, tmp_path_factory, test_data) -> Path:
    """A third site of 12 other identities (the shared fixture builds two)."""
    from facefed.client.federated.chips import pipeline_chip_fn
    from facefed.core.settings import get_core_settings

    helpers = _federated_conftest()
    names = helpers._identities(test_data)[24:36]
    base = tmp_path_factory.mktemp("federated-third-site")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACEFED_HOME", str(base / "home"))
        models = str(_cached_sites[0].parent / "models")
        patch.setenv(
            "FACEFED_MODEL_CACHE", os.environ.get("FACEFED_TEST_MODEL_CACHE", models)
        )
        get_core_settings.cache_clear()
        site = helpers._build_site(base / "site2", test_data, names[:8], names[8:])
        SiteDataStore(site).prepare(pipeline_chip_fn())
    get_core_settings.cache_clear()
    return site


@pytest.fixture
def three_sites(sites, _third_cached_site, tmp_path) -> list[Path]:
    import shutil

    third = tmp_path / _third_cached_site.name
    shutil.copytree(_third_cached_site, third)
    return [*sites, third]


def _simulate_capturing_replies(config: TrainingConfig) -> list:
    """Run `run_training` on the simulation engine; return every reply received.

    The ServerApp runs in this process (Flower's simulation engine runs it in
    a thread), so a grid wrapper can keep what reached the server.
    """
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from facefed.client.federated.app import app as client_app
    from facefed.server.federated.app import run_training
    from facefed.server.federated.runner import quiet_flower_env
    from facefed.server.federated.secure_aggregation import AuditedGrid
    from facefed.server.federated.strategy import RunLog

    received: list = []

    class CapturingGrid(AuditedGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            received.extend(replies)
            return replies

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context) -> None:
        capture_log = RunLog(Path(config.run_dir) / "capture")
        run_training(CapturingGrid(grid, capture_log), config)

    quiet_flower_env()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(config.site_dirs),
        backend_config={
            "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            "init_args": {"num_cpus": max(1, os.cpu_count() or 1)},
        },
    )
    return received


def _masked_vectors(replies: list) -> list[list[np.ndarray]]:
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
    )

    vectors = []
    for reply in replies:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            vectors.append([bytes_to_ndarray(b) for b in configs["masked_params"]])
    return vectors


@pytest.mark.slow
def test_secaggplus_run_shows_the_server_only_masked_updates(three_sites, tmp_path):
    """Two SecAgg+ rounds; a fourth site with no photo fails in every round.

    The failing site drops out after sharing its keys, so the server must
    rebuild its pairwise masks from the other sites' shares to unmask the sum.
    """
    from facefed.server.federated.runner import read_progress

    failing = tmp_path / "site-that-fails"
    failing.mkdir()
    run_dir = tmp_path / "run"
    config = TrainingConfig(
        num_rounds=2,
        batch_size=8,
        target_epsilon=8.0,
        min_sites=4,
        site_dirs=(*map(str, three_sites), str(failing)),
        run_dir=str(run_dir),
        round_timeout=240,
        secure_aggregation="secaggplus",
    )
    started = time.monotonic()
    replies = _simulate_capturing_replies(config)
    print(f"SecAgg+ run, 4 sites, 2 rounds: {time.monotonic() - started:.1f} s")

    # The run finished, with every site's epsilon and evaluation recorded.
    progress = read_progress(run_dir)
    assert progress.status == "finished", progress.error
    assert progress.round == 2
    names = {site.name for site in three_sites}
    assert set(progress.epsilon) == names
    assert all(0 < eps <= 8.0 for eps in progress.epsilon.values())
    assert set(progress.metrics) == names
    for site in three_sites:
        ledger = json.loads((site / ".facefed" / "ledger.json").read_text())
        assert len(ledger["runs"]) == 2

    # The published model moved, only in the shared layers, by less than the
    # clipping range a round allows.
    split = SplitNetwork(load_network(), trainable_blocks=1)
    parent = split.shared_state()
    weights = torch.load(run_dir / "model" / "weights.pt", weights_only=True)
    for name, before in parent.items():
        change = (weights[name] - before).abs()
        assert 0 < change.max() <= 2 * config.secagg_clipping_range
    base = load_network().state_dict()
    assert {k for k in base if not torch.equal(base[k], weights[k])} == set(parent)

    # No training reply carried arrays: what came back for the update were
    # masked integer vectors, one per working site and round, of the shared
    # shapes. The failing site's only errors are its two training rounds.
    train_replies = [r for r in replies if r.metadata.message_type == "train"]
    assert sum(r.has_error() for r in train_replies) == 2
    train_replies = [r for r in train_replies if not r.has_error()]
    for reply in train_replies:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    vectors = _masked_vectors(train_replies)
    assert len(vectors) == 6
    shapes = [tuple(v.shape) for v in parent.values()]
    average_update = np.concatenate(
        [(weights[k] - parent[k]).numpy().ravel() for k in parent]
    )
    for vector in vectors:
        assert [a.shape for a in vector[1:]] == shapes
        values = np.concatenate([a.ravel() for a in vector[1:]]).astype(np.float64)
        # An unmasked quantised update lies within the 2**22 quantisation
        # levels and follows the average update; a masked one is uniform over
        # the 2**32 modulus and unrelated to it.
        assert np.mean(values > QUANTISATION_LEVELS) > 0.99
        assert abs(np.corrcoef(values, average_update)[0, 1]) < 0.05

    # The audit log shows the four SecAgg+ stages per round and evaluation.
    entries = [json.loads(line) for line in (run_dir / "messages.jsonl").open()]
    phases = {(e["round"], e["phase"]) for e in entries}
    assert phases == {
        (r, p)
        for r in (1, 2)
        for p in [*(f"train:{s}" for s in SECAGG_STAGES), "evaluate"]
    }
    failed = {(e["round"], e["phase"]) for e in entries if "error" in e}
    assert failed == {
        (r, p) for r in (1, 2) for p in ("train:collect_masked_vectors", "evaluate")
    }
    for entry in entries:
        if entry["phase"].startswith("train") and "error" not in entry:
            kinds = {name: r["kind"] for name, r in entry["records"].items()}
            for name, record in entry["records"].items():
                assert kinds[name] != "arrays" or record["items"] == {}, name


@pytest.mark.slow
def test_secaggplus_round_on_the_deployment_engine(
    three_sites, tmp_path, deployment_run
):
    """One SecAgg+ round through a SuperLink and three SuperNodes on loopback."""
    run_dir = tmp_path / "run"
    config = TrainingConfig(
        num_rounds=1,
        batch_size=8,
        min_sites=3,
        run_dir=str(run_dir),
        round_timeout=240,
        secure_aggregation="secaggplus",
    )
    progress = deployment_run(three_sites, config)

    assert progress.status == "finished", progress.error
    assert set(progress.epsilon) == {site.name for site in three_sites}
    entries = [json.loads(line) for line in (run_dir / "messages.jsonl").open()]
    assert {e["phase"] for e in entries} == {
        *(f"train:{stage}" for stage in SECAGG_STAGES),
        "evaluate",
    }
    masked = [e for e in entries if e["phase"] == "train:collect_masked_vectors"]
    assert len(masked) == 3 and not any("error" in e for e in masked)
    for entry in entries:
        if entry["phase"].startswith("train"):
            for name, record in entry["records"].items():
                assert record["kind"] != "arrays" or record["items"] == {}, name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"central_dp": "server-fixed"}, "cannot be combined with central_dp"),
        ({"secagg_threshold": 4}, "at least secagg_threshold=4 sites"),
        ({"secagg_threshold": 1}, "secagg_threshold must be an integer of at least 2"),
        ({"secagg_num_shares": 2}, "secagg_num_shares must be 0"),
        ({"secagg_num_shares": 3, "secagg_threshold": 3}, "must be smaller than"),
        ({"secagg_clipping_range": 0.0}, "secagg_clipping_range must be positive"),
    ],
)
def test_impossible_secaggplus_settings_are_refused(changes, message):
    with pytest.raises(ConfigurationError, match=message):
        TrainingConfig(
            secure_aggregation="secaggplus",
            site_dirs=("a", "b", "c"),
            min_sites=3,
            **changes,
        )


def test_secaggplus_settings_travel_in_flowers_run_config():
    plain = TrainingConfig().to_flower()
    assert plain["secure-aggregation"] == "none"
    assert TrainingConfig.from_flower(plain).secure_aggregation == "none"
    secure = TrainingConfig(
        secure_aggregation="secaggplus",
        min_sites=4,
        secagg_threshold=3,
        secagg_clipping_range=0.01,
    )
    flat = secure.to_flower()
    assert flat["secure-aggregation"] == "secaggplus"
    assert flat["secagg-threshold"] == 3
    assert TrainingConfig.from_flower(flat) == secure
    with pytest.raises(ConfigurationError, match="secure_aggregation must be one of"):
        TrainingConfig.from_flower({"secure-aggregation": "homomorphic"})


def test_train_refuses_secaggplus_with_central_dp_and_starts_nothing(
    tmp_path, facefed_cli
):
    from facefed.server.federated.runs import runs_dir

    for name in "abc":
        (tmp_path / name).mkdir()
    done = facefed_cli(
        "train",
        *[arg for name in "abc" for arg in ("--site", str(tmp_path / name))],
        "--secure-aggregation",
        "secaggplus",
        "--central-dp",
        "server-fixed",
    )
    assert done.returncode == 2
    assert "cannot be combined with central-dp" in " ".join(done.stderr.split())
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
