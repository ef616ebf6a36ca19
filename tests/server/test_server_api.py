"""End-to-end behaviour of the /v1 API on real LFW descriptors, both databases."""

import base64

import numpy as np
import pytest
from conftest import (
    DIM,
    MODEL_ID,
    consent,
    expire_consent,
    raw_wire,
    unit_vectors,
    wire,
)

from facefed.server.receipts import verify_receipt


@pytest.fixture(scope="module")
def lfw():
    from pathlib import Path

    data = np.load(Path(__file__).parents[1] / "data" / "lfw" / "dlib_embeddings.npz")
    return data["identities"], data["embeddings"]


def enroll(world, embeddings, ref="alice", key=None, **extra):
    body = {
        "consent": consent(),
        "templates": [wire(world.protection_key, e) for e in embeddings],
        "external_ref": ref,
        **extra,
    }
    return world.client.post(
        "/v1/subjects", json=body, headers=world.auth(key or world.site_key)
    )


def test_identify_real_faces_rank1(world, lfw):
    identities, embeddings = lfw
    names = list(dict.fromkeys(identities))
    enrolled = {}
    probes = []
    for name in names:
        rows = np.flatnonzero(identities == name)
        answer = enroll(world, [embeddings[rows[0]]], ref=name)
        assert answer.status_code == 201, answer.text
        enrolled[answer.json()["subject_id"]] = name
        probes.extend((name, embeddings[row]) for row in rows[1:])
    gallery = np.stack([embeddings[np.flatnonzero(identities == n)[0]] for n in names])
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    correct = 0
    for name, probe in probes:
        answer = world.client.post(
            "/v1/identify",
            json={"template": wire(world.protection_key, probe), "top_k": 3},
            headers=world.auth(world.site_key),
        )
        assert answer.status_code == 200, answer.text
        best = answer.json()["candidates"][0]
        correct += enrolled[best["subject_id"]] == name
        assert best["external_ref"] == enrolled[best["subject_id"]]
        # Protected search on the server ranks exactly as plaintext search.
        plaintext_best = names[int(np.argmax(gallery @ probe))]
        assert enrolled[best["subject_id"]] == plaintext_best
    # dlib's descriptor: 91 of these 96 LFW probes are right at rank 1.
    assert correct / len(probes) >= 0.9


def test_other_site_sees_no_external_ref(world, lfw):
    _, embeddings = lfw
    assert enroll(world, [embeddings[0]]).status_code == 201
    answer = world.client.post(
        "/v1/identify",
        json={"template": wire(world.protection_key, embeddings[1])},
        headers=world.auth(world.other_site_key),
    )
    assert answer.status_code == 200
    assert answer.json()["candidates"][0]["external_ref"] is None


def test_verify_genuine_and_impostor(world, lfw):
    identities, embeddings = lfw
    subject = enroll(world, [embeddings[0]]).json()["subject_id"]
    same = np.flatnonzero(identities == identities[0])[1]
    impostors = np.flatnonzero(identities != identities[0])
    other = impostors[np.argmin(embeddings[impostors] @ embeddings[0])]
    genuine = float(embeddings[0] @ embeddings[same])
    assert float(embeddings[0] @ embeddings[other]) < genuine - 0.01
    scores = {}
    for label, row in (("same", same), ("other", other)):
        answer = world.client.post(
            "/v1/verify",
            json={
                "subject_id": subject,
                "template": wire(world.protection_key, embeddings[row]),
                "threshold": genuine - 0.005,
            },
            headers=world.auth(world.site_key),
        )
        assert answer.status_code == 200, answer.text
        scores[label] = answer.json()
    # The orthonormal scheme keeps the cosine of the raw descriptors.
    assert scores["same"]["score"] == pytest.approx(genuine, abs=1e-4)
    assert scores["same"]["match"] and not scores["other"]["match"]


def test_refuses_bad_templates_and_changes_nothing(world):
    rng = np.random.default_rng(1)
    vector = unit_vectors(rng, 1)[0]
    good = wire(world.protection_key, vector)
    version = good["key_version"]
    nan = vector.copy()
    nan[3] = np.nan
    cases = {
        "other model": wire(world.protection_key, vector, model_id="other-model"),
        "wrong dimension": raw_wire("orthonormal-v1", version, vector[:64]),
        "non-finite": raw_wire("orthonormal-v1", version, nan),
        "unknown scheme": raw_wire("rot13-v9", version, vector),
        "unknown key version": raw_wire("orthonormal-v1", version + 5, vector),
        "dim mismatch": raw_wire("orthonormal-v1", version, vector, dim=DIM + 1),
    }
    for label, template in cases.items():
        answer = world.client.post(
            "/v1/subjects",
            json={"consent": consent(), "templates": [template]},
            headers=world.auth(world.site_key),
        )
        assert 400 <= answer.status_code < 500, label
        error = answer.json()["error"]
        assert error["code"] and error["message"], label
    health = world.client.get("/v1/health").json()
    assert health["templates"] == 0


def test_limits(world):
    rng = np.random.default_rng(2)
    vectors = unit_vectors(rng, 25)
    too_many = enroll(world, list(vectors))  # default limit: 20 per subject
    assert too_many.status_code == 422
    assert "20 templates" in too_many.json()["error"]["message"]
    answer = world.client.post(
        "/v1/identify",
        json={"template": wire(world.protection_key, vectors[0]), "top_k": 10_000},
        headers=world.auth(world.site_key),
    )
    assert answer.status_code == 422
    huge = world.client.post(
        "/v1/subjects",
        content=b"{" + b" " * (5 * 1024 * 1024) + b"}",
        headers={**world.auth(world.site_key), "content-type": "application/json"},
    )
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "body_too_large"


def test_idempotent_enrollment_replays_first_answer(world):
    rng = np.random.default_rng(3)
    vector = unit_vectors(rng, 1)[0]
    body = {"consent": consent(), "templates": [wire(world.protection_key, vector)]}
    headers = {**world.auth(world.site_key), "Idempotency-Key": "abc-123"}
    first = world.client.post("/v1/subjects", json=body, headers=headers)
    second = world.client.post("/v1/subjects", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert world.client.get("/v1/health").json()["templates"] == 1
    body["external_ref"] = "someone else"
    conflict = world.client.post("/v1/subjects", json=body, headers=headers)
    assert conflict.status_code == 409


def test_subject_export_and_erasure_with_token(world, lfw):
    _, embeddings = lfw
    enrolled = enroll(world, [embeddings[0], embeddings[1]]).json()
    subject, token = enrolled["subject_id"], enrolled["subject_token"]
    bearer = {"Authorization": f"Bearer {token}"}

    exported = world.client.get(f"/v1/subjects/{subject}/export", headers=bearer)
    assert exported.status_code == 200
    body = exported.json()
    assert body["consents"][0]["lawful_basis"] == "consent"
    assert len(body["templates"]) == 2
    protected = body["templates"][0]["protected"]
    assert protected["model_id"] == MODEL_ID
    data = np.frombuffer(base64.b64decode(protected["data"]), dtype="<f4")
    # Exported in protected form: not the raw descriptor.
    assert not np.allclose(data, embeddings[0] / np.linalg.norm(embeddings[0]))

    # The token is good for export and erasure only.
    probe = {"template": wire(world.protection_key, embeddings[0])}
    assert (
        world.client.post("/v1/identify", json=probe, headers=bearer).status_code == 403
    )

    receipt = world.client.delete(f"/v1/subjects/{subject}", headers=bearer)
    assert receipt.status_code == 200
    receipt = receipt.json()
    assert receipt["removed"]["templates"] == 2
    assert receipt["removed"]["data_key_destroyed"] is True
    pem = world.client.get("/v1/receipts/public-key").json()["public_key_pem"]
    assert verify_receipt(receipt, pem)
    assert not verify_receipt({**receipt, "subject_id": "someone"}, pem)

    # Gone from search, and a second erasure changes nothing.
    search = world.client.post(
        "/v1/identify", json=probe, headers=world.auth(world.site_key)
    )
    assert search.json()["candidates"] == []
    again = world.client.delete(
        f"/v1/subjects/{subject}", headers=world.auth(world.admin_key)
    )
    assert again.status_code == 410
    events = world.client.get(
        "/v1/admin/audit",
        params={"action": "subject.erase"},
        headers=world.auth(world.admin_key),
    ).json()
    assert len(events) == 1
    assert subject not in str(events)


def test_site_erases_only_its_own_subjects(world, lfw):
    _, embeddings = lfw
    subject = enroll(world, [embeddings[0]]).json()["subject_id"]
    other = world.client.delete(
        f"/v1/subjects/{subject}", headers=world.auth(world.other_site_key)
    )
    assert other.status_code == 403
    own = world.client.delete(
        f"/v1/subjects/{subject}", headers=world.auth(world.site_key)
    )
    assert own.status_code == 200


def test_consent_withdrawal_erases(world, lfw):
    _, embeddings = lfw
    enrolled = enroll(world, [embeddings[0]]).json()
    answer = world.client.post(
        f"/v1/subjects/{enrolled['subject_id']}/consent/withdraw",
        headers={"X-Subject-Token": enrolled["subject_token"]},
    )
    assert answer.status_code == 200
    assert answer.json()["reason"] == "consent_withdrawn"
    assert world.client.get("/v1/health").json()["templates"] == 0


def test_purge_expired_consents(world, lfw, settings):
    _, embeddings = lfw
    old = enroll(world, [embeddings[0]], ref="old")
    assert old.status_code == 201
    expire_consent(settings, old.json()["subject_id"])
    assert enroll(world, [embeddings[5]]).status_code == 201
    purged = world.client.post(
        "/v1/admin/purge-expired", headers=world.auth(world.admin_key)
    )
    assert purged.json() == {"erased": 1}
    assert world.client.get("/v1/health").json()["templates"] == 1


def test_add_templates(world, lfw):
    _, embeddings = lfw
    subject = enroll(world, [embeddings[0]]).json()["subject_id"]
    added = world.client.post(
        f"/v1/subjects/{subject}/templates",
        json={"templates": [wire(world.protection_key, embeddings[1])]},
        headers=world.auth(world.site_key),
    )
    assert added.status_code == 200
    assert added.json()["template_count"] == 2
    assert world.client.get("/v1/health").json()["templates"] == 2
