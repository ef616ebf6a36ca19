"""The admin training API's checks (a run through the API: test_federated_e2e)."""


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
