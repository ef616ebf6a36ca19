"""The admin training API: start a run, follow it, list and promote its model."""

import time

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def admin_client(tmp_path):
    from facefed.privacy.envelope import encode_master_key
    from facefed.server.app import create_app
    from facefed.server.service import GalleryService
    from facefed.server.settings import ServerSettings

    settings = ServerSettings(
        home=tmp_path / "server-home",
        database_url=f"sqlite:///{tmp_path / 'server.db'}",
        master_key=encode_master_key(bytes(range(32))),
        purge_interval_s=0,
        use_gpu=False,
    )
    service = GalleryService(settings)
    service.start()
    try:
        _, admin_key = service.create_api_key("test", role="admin", site_id=None)
    finally:
        service.close()
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {admin_key}"
        yield client


def test_bad_site_folder_is_refused_and_nothing_starts(admin_client, tmp_path):
    answer = admin_client.post(
        "/v1/training/runs", json={"sites": [str(tmp_path / "missing")], "rounds": 1}
    )
    assert answer.status_code == 400, answer.text
    assert "does not exist" in answer.text
    assert admin_client.get("/v1/training/runs").json() == []


def test_training_api_is_admin_only(admin_client):
    answer = admin_client.get(
        "/v1/training/runs", headers={"Authorization": "Bearer not-a-key"}
    )
    assert answer.status_code in (401, 403)


@pytest.mark.slow
def test_run_through_the_api(admin_client, sites):
    started = admin_client.post(
        "/v1/training/runs",
        json={"sites": [str(s) for s in sites], "rounds": 1, "target_epsilon": 6.0},
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["id"]
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        run = admin_client.get(f"/v1/training/runs/{run_id}").json()
        if run["status"] != "running":
            break
        time.sleep(2)
    assert run["status"] == "finished", run
    assert run["current_round"] == 1
    assert set(run["epsilon"]) == {s.name for s in sites}
    assert all(0 < e <= 6.0 for e in run["epsilon"].values())
    assert set(run["metrics"]) == {s.name for s in sites}

    models = admin_client.get("/v1/models").json()
    assert [m["id"] for m in models] == [run["model_version_id"]]
    promoted = admin_client.post(
        f"/v1/models/{run['model_version_id']}/promote", json={"collection": "lab"}
    )
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["status"] == "promoted"
    again = admin_client.post(f"/v1/training/runs/{run_id}/cancel")
    assert again.status_code == 409
