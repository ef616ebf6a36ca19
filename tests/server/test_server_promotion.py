"""Promoting a backward-compatible model to a collection, as the gallery sees it.

The parent's templates are dlib's real LFW descriptors. A child model is
stood in for by a linear map near the identity applied to them (what
fine-tuning the final projection with the BCT term does to an embedding),
an incompatible model by a random rotation (same accuracy on its own,
incomparable with the parent's templates). Whether a published version is
compatible is measured during training (tests/federated); here the gallery
acts on that verdict.
"""

import numpy as np
import pytest
from conftest import MODEL_ID, enroll_site_subject, wire

from facefed.core.errors import ConflictError

CHILD = "facefed-ft-child"
GRANDCHILD = "facefed-ft-grandchild"


@pytest.fixture(scope="module")
def lfw():
    from pathlib import Path

    data = np.load(Path(__file__).parents[1] / "data" / "lfw" / "dlib_embeddings.npz")
    return data["identities"], data["embeddings"].astype(np.float32)


def _near_identity(seed: int, scale: float = 0.01) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal((128, 128))
    return np.eye(128) + scale * noise


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((128, 128)))
    return q


def _embed(transform: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    mapped = transform @ embedding
    return (mapped / np.linalg.norm(mapped)).astype(np.float32)


def _promote(world, model_id, parent, *, compatible=True, force=False, to="default"):
    from facefed.server.db import session_scope
    from facefed.server.service import Promotion, accept_promotion

    promotion = Promotion(model_id, parent, compatible, 0.91, 0.90)
    service = world.client.app.state.service
    with session_scope(service.sessions) as session:
        return accept_promotion(
            session,
            promotion,
            collection_id=to,
            force_new_gallery=force,
            actor="admin:test",
        )


def _collection(world, name="default", key=None):
    answer = world.client.get(
        f"/v1/collections/{name}", headers=world.auth(key or world.site_key)
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def _identify(world, embedding, model_id):
    return world.client.post(
        "/v1/identify",
        json={"template": wire(world.protection_key, embedding, model_id)},
        headers=world.auth(world.site_key),
    )


def _verify(world, subject_id, embedding, model_id):
    answer = world.client.post(
        "/v1/verify",
        json={
            "subject_id": subject_id,
            "template": wire(world.protection_key, embedding, model_id),
        },
        headers=world.auth(world.site_key),
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def _enroll_first_photos(world, identities, embeddings):
    """Enroll each identity's first photo with the parent; return probes' rows."""
    enrolled, probes = {}, []
    for name in dict.fromkeys(identities):
        rows = np.flatnonzero(identities == name)
        answer = enroll_site_subject(world.client, world, embeddings[rows[0]])
        assert answer.status_code == 201, answer.text
        enrolled[answer.json()["subject_id"]] = name
        probes.extend((row, name) for row in rows[1:])
    return enrolled, probes


def _rank1(world, enrolled, probes, embeddings, transform, model_id):
    hits = 0
    for row, name in probes:
        answer = _identify(world, _embed(transform, embeddings[row]), model_id)
        assert answer.status_code == 200, answer.text
        candidates = answer.json()["candidates"]
        hits += bool(candidates) and enrolled[candidates[0]["subject_id"]] == name
    return hits / len(probes)


def test_compatible_child_probes_match_the_parent_templates(world, lfw):
    identities, embeddings = lfw
    enrolled, probes = _enroll_first_photos(world, identities, embeddings)
    child = _near_identity(1)
    row, _ = probes[0]
    assert _identify(world, _embed(child, embeddings[row]), CHILD).status_code == 422

    assert _promote(world, CHILD, MODEL_ID) == CHILD

    described = _collection(world)
    assert described["model_id"] == MODEL_ID
    assert described["serving_model_id"] == CHILD
    assert described["accepted_model_ids"] == [MODEL_ID, CHILD]
    assert described["promoted"][0]["parent_model_id"] == MODEL_ID
    assert described["promoted"][0]["cross_accuracy"] == pytest.approx(0.91)
    assert described["promoted"][0]["parent_accuracy"] == pytest.approx(0.90)
    parent_rank1 = _rank1(world, enrolled, probes, embeddings, np.eye(128), MODEL_ID)
    child_rank1 = _rank1(world, enrolled, probes, embeddings, child, CHILD)
    assert parent_rank1 >= 0.9
    assert child_rank1 == parent_rank1


def test_child_verifies_enrolls_and_each_template_keeps_its_model(world, lfw):
    identities, embeddings = lfw
    first, second = np.flatnonzero(identities == identities[0])[:2]
    old = enroll_site_subject(world.client, world, embeddings[first]).json()
    _promote(world, CHILD, MODEL_ID)
    child = _near_identity(1)

    by_parent = _verify(world, old["subject_id"], embeddings[second], MODEL_ID)
    by_child = _verify(
        world, old["subject_id"], _embed(child, embeddings[second]), CHILD
    )
    assert by_child["match"] is by_parent["match"] is True
    assert by_child["score"] == pytest.approx(by_parent["score"], abs=0.01)
    added = world.client.post(
        f"/v1/subjects/{old['subject_id']}/templates",
        json={
            "templates": [
                wire(world.protection_key, _embed(child, embeddings[second]), CHILD)
            ]
        },
        headers=world.auth(world.site_key),
    )
    assert added.status_code == 200, added.text
    new = enroll_site_subject(
        world.client, world, _embed(child, embeddings[second]), CHILD
    )
    assert new.status_code == 201, new.text

    exported = world.client.get(
        f"/v1/subjects/{old['subject_id']}/export", headers=world.auth(world.site_key)
    ).json()
    models = [t["protected"]["model_id"] for t in exported["templates"]]
    assert sorted(models) == sorted([MODEL_ID, CHILD])


def test_incompatible_or_foreign_models_are_refused_and_change_nothing(world, lfw):
    _, embeddings = lfw
    assert enroll_site_subject(world.client, world, embeddings[0]).status_code == 201
    before = _collection(world)

    with pytest.raises(ConflictError, match="not backward-compatible"):
        _promote(world, CHILD, MODEL_ID, compatible=False)
    with pytest.raises(ConflictError, match="was trained from other-parent"):
        _promote(world, CHILD, "other-parent")
    # Training from the base model again once a child serves: not from the
    # serving model, so never measured against the child's templates.
    _promote(world, CHILD, MODEL_ID)
    with pytest.raises(ConflictError, match=f"served by model {CHILD}"):
        _promote(world, "facefed-ft-sibling", MODEL_ID)

    assert _collection(world)["accepted_model_ids"] == [MODEL_ID, CHILD]
    assert before["accepted_model_ids"] == [MODEL_ID]
    rotated = _embed(_rotation(2), embeddings[1])
    refused = _identify(world, rotated, "facefed-ft-sibling")
    assert refused.status_code == 422
    assert "facefed-ft-sibling" in refused.json()["error"]["message"]


def test_promotion_is_idempotent_and_chains_through_the_serving_model(world):
    assert _promote(world, CHILD, MODEL_ID) == CHILD
    assert _promote(world, CHILD, MODEL_ID) == CHILD
    assert _promote(world, GRANDCHILD, CHILD) == GRANDCHILD
    # An older accepted model asked again changes nothing (no step back).
    assert _promote(world, CHILD, MODEL_ID) == GRANDCHILD

    described = _collection(world, key=world.admin_key)
    assert described["accepted_model_ids"] == [MODEL_ID, CHILD, GRANDCHILD]
    assert [m["model_id"] for m in described["promoted"]] == [CHILD, GRANDCHILD]
    events = world.client.get(
        "/v1/admin/audit",
        params={"action": "admin.collection.promote"},
        headers=world.auth(world.admin_key),
    ).json()
    assert len(events) == 2


def test_force_new_gallery_moves_only_an_empty_collection(world, lfw):
    _, embeddings = lfw
    assert enroll_site_subject(world.client, world, embeddings[0]).status_code == 201
    with pytest.raises(ConflictError, match="holds 1 template"):
        _promote(world, "unrelated", "other-parent", force=True)
    assert _collection(world)["accepted_model_ids"] == [MODEL_ID]

    created = world.client.post(
        "/v1/admin/collections",
        json={
            "id": "fresh",
            "model_id": MODEL_ID,
            "scheme": "orthonormal-v1",
            "dim": 128,
        },
        headers=world.auth(world.admin_key),
    )
    assert created.status_code == 201, created.text
    _promote(world, CHILD, MODEL_ID, to="fresh")
    assert (
        _promote(world, "unrelated", "other-parent", force=True, to="fresh")
        == "unrelated"
    )
    fresh = _collection(world, "fresh")
    assert fresh["model_id"] == "unrelated"
    assert fresh["accepted_model_ids"] == ["unrelated"]
    assert fresh["promoted"] == []


def test_force_new_gallery_refusal_names_the_models_of_stored_templates(world, lfw):
    _, embeddings = lfw
    for row in (0, 1):
        assert (
            enroll_site_subject(world.client, world, embeddings[row]).status_code == 201
        )
    _promote(world, CHILD, MODEL_ID)

    with pytest.raises(ConflictError) as refused:
        _promote(world, "unrelated", "other-parent", force=True)
    message = str(refused.value)
    assert f"holds 2 template(s) (2 of {MODEL_ID})" in message
    assert CHILD not in message  # accepted, but none of its templates is stored

    child_probe = _embed(_near_identity(1), embeddings[2])
    enrolled = enroll_site_subject(world.client, world, child_probe, model_id=CHILD)
    assert enrolled.status_code == 201, enrolled.text
    with pytest.raises(ConflictError) as refused:
        _promote(world, "unrelated", "other-parent", force=True)
    assert f"holds 3 template(s) (2 of {MODEL_ID}, 1 of {CHILD})" in str(refused.value)
    assert _collection(world)["accepted_model_ids"] == [MODEL_ID, CHILD]


def test_unknown_collection_is_not_found_and_untouched(world):
    assert _promote(world, CHILD, MODEL_ID, to="nowhere") is None
    answer = world.client.get(
        "/v1/collections/nowhere", headers=world.auth(world.site_key)
    )
    assert answer.status_code == 404
    listed = world.client.get("/v1/collections", headers=world.auth(world.site_key))
    assert [c["id"] for c in listed.json()] == ["default"]
    assert listed.json()[0]["serving_model_id"] == MODEL_ID


def test_the_site_sdk_reads_the_serving_model(world):
    from fastapi.testclient import TestClient

    from facefed.client.gallery import GalleryClient
    from facefed.client.transport import RetryPolicy, Transport

    _promote(world, CHILD, MODEL_ID)
    http = TestClient(
        world.client.app,
        base_url="http://testserver/v1",
        headers=world.auth(world.site_key),
    )
    transport = Transport(
        "http://unused",
        api_key=None,
        policy=RetryPolicy(max_attempts=1),
        rng=np.random.default_rng(0),
        http=http,
    )
    with GalleryClient(transport) as client:
        models = client.models()
    assert models.serving_model_id == CHILD
    assert models.accepted_model_ids == (MODEL_ID, CHILD)
