"""The admin training API's checks (a run through the API: test_federated_e2e)."""

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from facefed.server.federated.runs import process_alive


def test_bad_site_folder_is_refused_and_nothing_starts(admin_client, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    answer = admin_client.post(
        "/v1/training/runs",
        json={"sites": [str(tmp_path / "missing"), str(empty)], "rounds": 1},
    )
    assert answer.status_code == 400, answer.text
    assert "does not exist" in answer.text
    assert "0 training identities" in answer.text
    assert "pairs.csv" in answer.text
    assert admin_client.get("/v1/training/runs").json() == []
    assert _run_folders() == []


def _site_folders(tmp_path, count: int) -> list[str]:
    folders = [tmp_path / f"site-{index}" for index in range(count)]
    for folder in folders:
        folder.mkdir()
    return [str(folder) for folder in folders]


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [
        ({"secure_aggregaton": "secaggplus"}, 422, "secure_aggregaton"),
        ({"central-dp": "server-fixed"}, 422, "central-dp"),
        ({"secure_aggregation": "homomorphic"}, 422, "secure_aggregation"),
        (
            {"secure_aggregation": "secaggplus", "central_dp": "server-fixed"},
            400,
            "cannot be combined with central_dp='server-fixed'",
        ),
        (
            {"secure_aggregation": "secaggplus", "secagg_threshold": 5},
            400,
            "at least secagg_threshold=5 sites in every round, but the run has 2",
        ),
        (
            {"secure_aggregation": "secaggplus", "secagg_num_shares": 2},
            400,
            "secagg_num_shares must be 0",
        ),
        ({"learning_rate": 0}, 400, "learning_rate must be positive"),
    ],
)
def test_impossible_run_settings_are_refused_and_nothing_starts(
    admin_client, tmp_path, changes, status, message
):
    body = {"sites": _site_folders(tmp_path, 2), "rounds": 1, **changes}
    answer = admin_client.post("/v1/training/runs", json=body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]["message"]
    assert admin_client.get("/v1/training/runs").json() == []
    assert _run_folders() == []


def _run_folders() -> list[Path]:
    from facefed.server.federated.runs import runs_dir

    return sorted(runs_dir().glob("*")) if runs_dir().is_dir() else []


def test_an_accepted_secaggplus_request_starts_a_secaggplus_run(
    admin_client, tmp_path, faceless_site
):
    body = {
        "sites": [str(faceless_site(tmp_path / f"site-{i}")) for i in range(3)],
        "rounds": 2,
        "secure_aggregation": "secaggplus",
        "secagg_threshold": 2,
        "secagg_num_shares": 3,
        "secagg_clipping_range": 0.02,
        "local_epochs": 2,
    }
    answer = admin_client.post("/v1/training/runs", json=body)
    assert answer.status_code == 201, answer.text
    run = answer.json()
    (folder,) = _run_folders()
    pid = int((folder / "pid").read_text())
    try:
        assert folder.name == run["id"]
        assert run["status"] == "running"
        for listed in (run, admin_client.get(f"/v1/training/runs/{run['id']}").json()):
            config = listed["config"]
            assert config["secure-aggregation"] == "secaggplus"
            assert config["central-dp"] == "none"
            assert config["secagg-threshold"] == 2
            assert config["secagg-num-shares"] == 3
            assert config["secagg-clipping-range"] == 0.02
            assert config["local-epochs"] == 2
            assert config["num-rounds"] == 2
        # The run really started: its process is running.
        assert process_alive(pid)
    finally:
        admin_client.post(f"/v1/training/runs/{run['id']}/cancel")
        _wait_until_gone(pid)


def _wait_until_gone(pid: int, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while process_alive(pid) and time.monotonic() < deadline:
        multiprocessing.active_children()  # reaps a multiprocessing child
        time.sleep(0.2)
    multiprocessing.active_children()
    assert not process_alive(pid)


def test_a_run_started_from_the_cli_is_followed_and_cancelled_through_the_api(
    admin_client, tmp_path
):
    """The API adopts a run folder it did not create (as `facefed train` writes it)."""
    import subprocess
    import sys

    from facefed.client.federated.config import TrainingConfig
    from facefed.server.federated.runner import RUN_CONFIG_FILE
    from facefed.server.federated.runs import new_run_id, runs_dir

    run_id = new_run_id()
    folder = runs_dir() / run_id
    folder.mkdir(parents=True)
    config = TrainingConfig(num_rounds=3, site_dirs=("a", "b"), run_dir=str(folder))
    (folder / RUN_CONFIG_FILE).write_text(json.dumps(config.to_flower()))
    # A stand-in for the run's process: alive until cancelled.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (folder / "pid").write_text(str(process.pid))
    try:
        listed = admin_client.get("/v1/training/runs").json()
        assert [run["id"] for run in listed] == [run_id]
        assert listed[0]["status"] == "running"
        assert listed[0]["rounds"] == 3
        assert listed[0]["config"]["site-dirs"] == "a,b"

        cancelled = admin_client.post(f"/v1/training/runs/{run_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert process.wait(timeout=30) != 0
        again = admin_client.get(f"/v1/training/runs/{run_id}").json()
        assert again["status"] == "cancelled"
    finally:
        process.kill()
        process.wait()
    assert admin_client.get("/v1/training/runs/no-such-run").status_code == 404


def test_training_api_is_admin_only(admin_client):
    answer = admin_client.get(
        "/v1/training/runs", headers={"Authorization": "Bearer not-a-key"}
    )
    assert answer.status_code in (401, 403)


def _shared_states(network) -> tuple[dict, dict, dict]:
    """The parent's projection, a child close to it, and a rotated one."""
    import torch

    from facefed.client.federated.model import SplitNetwork

    parent = SplitNetwork(network, trainable_blocks=1).shared_state()
    generator = torch.Generator().manual_seed(0)
    child = {
        name: value + 1e-4 * value.std() * torch.randn(value.shape, generator=generator)
        for name, value in parent.items()
    }
    rotation, _ = torch.linalg.qr(torch.randn(128, 128, generator=generator))
    # Rotating the 128-d output keeps every cosine between the model's own
    # embeddings (same accuracy) but not against the parent's.
    rotated = {name: rotation @ value for name, value in parent.items()}
    return parent, child, rotated


def _publish_measured(site, run_id: str, shared: dict, parent: dict) -> str:
    """Publish a version whose compatibility is measured on the site's pairs."""
    from facefed.client.federated.config import TrainingConfig
    from facefed.client.federated.model import SplitNetwork, load_network
    from facefed.client.federated.site import SiteRuntime
    from facefed.server.federated.publish import publish_run
    from facefed.server.federated.runs import runs_dir

    config = TrainingConfig(num_rounds=1, run_dir=str(runs_dir() / run_id))
    metrics = SiteRuntime(site, config).evaluate(shared, parent=parent)
    network = load_network()
    SplitNetwork(network, trainable_blocks=1).load_shared_state(shared)
    model_dir = publish_run(
        network,
        config=config,
        site_train={1: {"site-a": {"epsilon": 1.0, "num-examples": 24.0}}},
        site_evaluate={1: {"site-a": metrics}},
        shared_names=sorted(shared),
    )
    summary = json.loads((model_dir / "training.json").read_text())
    return str(summary["model_id"])


def _gallery(client, model_id: str) -> tuple[dict, object]:
    """A site key and protection key, and a collection `lab` of `model_id`."""
    from facefed.privacy.protection import ProtectionKey

    site = client.post("/v1/admin/sites", json={"name": "north"}).json()
    key = client.post(
        "/v1/admin/api-keys", json={"role": "site", "site_id": site["id"]}
    ).json()["key"]
    assert (
        client.post(
            "/v1/admin/protection-keys", json={"scheme": "orthonormal-v1"}
        ).status_code
        == 201
    )
    created = client.post(
        "/v1/admin/collections",
        json={
            "id": "lab",
            "model_id": model_id,
            "scheme": "orthonormal-v1",
            "dim": 128,
        },
    )
    assert created.status_code == 201, created.text
    site_headers = {"Authorization": f"Bearer {key}"}
    fetched = client.get(
        "/v1/keys/protection", params={"collection": "lab"}, headers=site_headers
    )
    return site_headers, ProtectionKey.from_dict(fetched.json())


@pytest.mark.slow
def test_promoted_compatible_child_matches_parent_templates(admin_client, sites):
    """Real chips: parent templates enrolled, the child's probes match them."""
    from facefed.client.federated.model import SplitNetwork, load_network
    from facefed.client.federated.store import SiteDataStore
    from facefed.privacy.templates import protect_template
    from facefed.server.federated.publish import parent_model_id

    parent, child, rotated = _shared_states(load_network())
    child_id = _publish_measured(sites[0], "20260101T000000Z-aaaaaa", child, parent)
    rotated_id = _publish_measured(sites[0], "20260101T000001Z-bbbbbb", rotated, parent)
    dlib_id = parent_model_id("")
    site_headers, key = _gallery(admin_client, dlib_id)

    samples = SiteDataStore(sites[0]).training_samples()
    split = SplitNetwork(load_network(), trainable_blocks=1)
    features = split.trunk_features(samples.chips)
    embeddings = {}
    for model_id, state in (
        (dlib_id, parent),
        (child_id, child),
        (rotated_id, rotated),
    ):
        split.load_shared_state(state)
        embeddings[model_id] = split.embed_features(features)

    def template(model_id: str, row: int) -> dict:
        return protect_template(
            embeddings[model_id][row], key=key, model_id=model_id
        ).to_wire()

    def identify(model_id: str, row: int):
        return admin_client.post(
            "/v1/identify",
            json={"collection": "lab", "template": template(model_id, row)},
            headers=site_headers,
        )

    enrolled, probes = {}, []
    for label in range(len(samples.identities)):
        rows = np.flatnonzero(samples.labels == label)
        answer = admin_client.post(
            "/v1/subjects",
            json={
                "collection": "lab",
                "consent": _consent(),
                "templates": [template(dlib_id, rows[0])],
            },
            headers=site_headers,
        )
        assert answer.status_code == 201, answer.text
        enrolled[answer.json()["subject_id"]] = label
        probes.extend((row, label) for row in rows[1:])
    assert identify(child_id, probes[0][0]).status_code == 422

    refused = admin_client.post(
        f"/v1/models/{rotated_id}/promote", json={"collection": "lab"}
    )
    assert refused.status_code == 409, refused.text
    assert "not backward-compatible" in refused.json()["error"]["message"]
    assert identify(rotated_id, probes[0][0]).status_code == 422
    forbidden = admin_client.post(
        f"/v1/models/{child_id}/promote",
        json={"collection": "lab"},
        headers=site_headers,
    )
    assert forbidden.status_code == 403
    for sloppy in (
        {"collection": "lab", "force_new_gallery": "yes"},
        {"collection": "lab", "force": True},
    ):
        rejected = admin_client.post(f"/v1/models/{child_id}/promote", json=sloppy)
        assert rejected.status_code == 422, rejected.text
    assert identify(child_id, probes[0][0]).status_code == 422

    for _ in range(2):  # idempotent
        promoted = admin_client.post(
            f"/v1/models/{child_id}/promote", json={"collection": "lab"}
        )
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["status"] == "promoted"
    described = admin_client.get("/v1/collections/lab", headers=site_headers).json()
    assert described["serving_model_id"] == child_id
    assert described["accepted_model_ids"] == [dlib_id, child_id]
    assert len(described["promoted"]) == 1
    measured = described["promoted"][0]
    assert measured["cross_accuracy"] >= measured["parent_accuracy"] > 0.5

    def rank1(model_id: str) -> float:
        hits = 0
        for row, label in probes:
            answer = identify(model_id, row)
            assert answer.status_code == 200, answer.text
            candidates = answer.json()["candidates"]
            hits += bool(candidates) and enrolled[candidates[0]["subject_id"]] == label
        return hits / len(probes)

    parent_rank1 = rank1(dlib_id)
    assert parent_rank1 >= 0.75
    assert rank1(child_id) == parent_rank1
    assert identify(rotated_id, probes[0][0]).status_code == 422


def _consent() -> dict:
    from datetime import UTC, datetime

    return {
        "purpose": "access control",
        "lawful_basis": "consent",
        "consent_text_version": "v1",
        "given_at": datetime.now(UTC).isoformat(),
        "retention_days": 30,
    }


def _publish_scaled(run_id: str, *, parent_model: str = "", bump: float) -> Path:
    """Publish dlib's network with its projection scaled (a distinct version)."""
    import torch

    from facefed.client.federated.config import TrainingConfig
    from facefed.client.federated.model import load_network
    from facefed.server.federated.publish import publish_run
    from facefed.server.federated.runs import runs_dir

    network = load_network(parent_model)
    with torch.no_grad():
        network.embedding.fc.weight.mul_(1.0 + bump)
    config = TrainingConfig(
        num_rounds=1, run_dir=str(runs_dir() / run_id), parent_model=parent_model
    )
    metrics = {"num-examples": 8.0, "accuracy": 0.9}
    return publish_run(
        network,
        config=config,
        site_train={1: {"site-a": {"epsilon": 1.0, "num-examples": 24.0}}},
        site_evaluate={
            1: {"site-a": metrics | {"cross-accuracy": 0.9, "parent-accuracy": 0.9}}
        },
        shared_names=["embedding.fc.weight"],
    )


@pytest.mark.slow
def test_every_published_version_is_listed_under_its_parents_registry_id(
    admin_client,
):
    from facefed.core.embedding import load_metadata
    from facefed.server.federated.publish import parent_model_id

    dlib_id = parent_model_id("")
    assert admin_client.get("/v1/models").json() == []
    first_dir = _publish_scaled("20260101T000000Z-aaaaaa", bump=0.01)
    second_dir = _publish_scaled(
        "20260101T000001Z-bbbbbb", parent_model=str(first_dir), bump=0.01
    )
    first = json.loads((first_dir / "training.json").read_text())
    second = json.loads((second_dir / "training.json").read_text())

    # One id for a parent everywhere: training.json, metadata, the API.
    assert first["parent_model"] == dlib_id
    assert dlib_id.startswith("dlib-resnet-v1-")
    assert second["parent_model"] == first["model_id"]
    assert second["config"]["parent-model"] == str(first_dir)
    for folder, summary in ((first_dir, first), (second_dir, second)):
        metadata = load_metadata(folder / f"{summary['model_id']}.json")
        assert metadata.parent_id == summary["parent_model"]

    # Published from outside the API (as `facefed train` does), never promoted.
    listed = {m["id"]: m for m in admin_client.get("/v1/models").json()}
    assert set(listed) == {first["model_id"], second["model_id"]}
    assert listed[first["model_id"]]["parent_id"] == dlib_id
    assert listed[second["model_id"]]["parent_id"] == first["model_id"]
    assert {m["status"] for m in listed.values()} == {"published"}

    promoted = admin_client.post(
        f"/v1/models/{first['model_id']}/promote", json={"collection": "lab"}
    )
    assert promoted.status_code == 200, promoted.text
    listed = {m["id"]: m for m in admin_client.get("/v1/models").json()}
    assert listed[first["model_id"]]["status"] == "promoted"
    assert listed[second["model_id"]]["status"] == "published"
