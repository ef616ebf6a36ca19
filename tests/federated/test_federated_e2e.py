"""End to end: a short federated run on the simulation and deployment engines.

Each run checks that the model changed, every site recorded its epsilon,
and that what the server received holds only the shared layers' arrays,
scalar metrics and the site's name: no image, chip, embedding or label.
"""

import json
import time
from pathlib import Path

import pytest
import torch

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import SplitNetwork, load_network
from facefed.server.federated.runner import read_progress

ALLOWED_METRICS = {
    "num-examples",
    "loss",
    "steps",
    "epsilon",
    "delta",
    "noise-multiplier",
    "sample-rate",
    "accuracy",
    "tar-far-1e-2",
    "parent-accuracy",
    "parent-tar-far-1e-2",
    "cross-accuracy",
    "cross-tar-far-1e-2",
}


def _shared_shapes() -> dict[str, list[int]]:
    blocks = TrainingConfig().trainable_blocks
    split = SplitNetwork(load_network(), trainable_blocks=blocks)
    return {k: list(v.shape) for k, v in split.shared_state().items()}


def _assert_only_shared_arrays_and_metrics(run_dir: Path, site_names: set[str]):
    shapes = _shared_shapes()
    entries = [json.loads(line) for line in (run_dir / "messages.jsonl").open()]
    assert entries
    for entry in entries:
        if "error" in entry:
            continue
        records = entry["records"]
        expected = {"metrics", "site"} | (
            {"arrays"} if entry["phase"] == "train" else set()
        )
        assert set(records) == expected, records.keys()
        if "arrays" in records:
            received = {k: v[0] for k, v in records["arrays"]["items"].items()}
            assert received == shapes
        metrics = records["metrics"]["items"]
        assert set(metrics) <= ALLOWED_METRICS
        assert set(metrics.values()) <= {"float", "int"}
        site = records["site"]
        assert site["items"] == {"site": "str"}
        assert site["values"]["site"] in site_names


def _assert_model_changed_and_epsilon(
    run_dir: Path, sites: list[Path], rounds: int, budget: float = 8.0
):
    model_dir = run_dir / "model"
    summary = json.loads((model_dir / "training.json").read_text())
    weights = torch.load(model_dir / "weights.pt", weights_only=True)
    base = load_network().state_dict()
    changed = [k for k in base if not torch.equal(base[k], weights[k])]
    assert changed and set(changed) <= set(summary["shared_layers"])
    for site in sites:
        assert 0 < summary["epsilon"][site.name] <= budget
        ledger = json.loads((site / ".facefed" / "ledger.json").read_text())
        assert len(ledger["runs"]) == rounds
    onnx = list(model_dir.glob("facefed-ft-*.onnx"))
    assert len(onnx) == 1
    metadata = json.loads(onnx[0].with_suffix(".json").read_text())
    assert metadata["parent_id"].startswith("dlib-resnet-v1-")
    return summary


@pytest.mark.slow
def test_simulation_run_through_the_api_with_a_failing_site(
    admin_client, sites, tmp_path, faceless_site
):
    """Two rounds on the simulation engine, started and followed through the API.

    A third site whose photos hold no face fails every round: the rounds are
    aggregated from the two others (3 sampled, 2 replies >= min-fit-fraction).
    """
    from facefed.server.federated.runs import runs_dir

    failing = faceless_site(tmp_path / "site-that-fails")
    started = admin_client.post(
        "/v1/training/runs",
        json={
            "sites": [*map(str, sites), str(failing)],
            "rounds": 2,
            "target_epsilon": 6.0,
            "trainable_blocks": 1,
        },
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["id"]
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        run = admin_client.get(f"/v1/training/runs/{run_id}").json()
        if run["status"] != "running":
            break
        time.sleep(2)
    assert run["status"] == "finished", run
    assert run["current_round"] == 2
    assert set(run["epsilon"]) == {s.name for s in sites}
    assert all(0 < e <= 6.0 for e in run["epsilon"].values())
    assert set(run["metrics"]) == {s.name for s in sites}

    run_dir = runs_dir() / run_id
    progress = read_progress(run_dir)
    assert progress.status == "finished" and progress.round == 2
    summary = _assert_model_changed_and_epsilon(run_dir, sites, rounds=2, budget=6.0)
    assert summary["model_id"] == run["model_version_id"]
    _assert_only_shared_arrays_and_metrics(run_dir, {s.name for s in sites})
    # The third site failed in every round without failing the rounds.
    errors = [
        json.loads(line)
        for line in (run_dir / "messages.jsonl").open()
        if '"error"' in line
    ]
    assert {(e["round"], e["phase"]) for e in errors} >= {(1, "train"), (2, "train")}

    models = admin_client.get("/v1/models").json()
    assert [m["id"] for m in models] == [run["model_version_id"]]
    promoted = admin_client.post(
        f"/v1/models/{run['model_version_id']}/promote", json={"collection": "lab"}
    )
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["status"] == "promoted"
    again = admin_client.post(f"/v1/training/runs/{run_id}/cancel")
    assert again.status_code == 409


@pytest.mark.slow
def test_deployment_engine_one_round(sites, tmp_path, deployment_run):
    run_dir = tmp_path / "run"
    config = TrainingConfig(
        num_rounds=1,
        batch_size=8,
        min_sites=2,
        run_dir=str(run_dir),
        round_timeout=240,
    )
    progress = deployment_run(sites, config)
    assert progress.status == "finished", (run_dir / "flwr-run.log").read_text()[-3000:]
    _assert_model_changed_and_epsilon(run_dir, sites, rounds=1)
    _assert_only_shared_arrays_and_metrics(run_dir, {s.name for s in sites})
