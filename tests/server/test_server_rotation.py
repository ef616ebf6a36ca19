"""Key rotation: orthonormal re-keying by a transform; re-enrollment lists."""

import numpy as np
import pytest
from conftest import MODEL_ID, bootstrap_admin, consent, make_app, setup_world, wire
from fastapi.testclient import TestClient

from facefed.privacy.protection import ProtectionKey
from facefed.privacy.rotation import rotation_transform


@pytest.fixture(scope="module")
def faces():
    from pathlib import Path

    data = np.load(Path(__file__).parents[1] / "data" / "lfw" / "dlib_embeddings.npz")
    return data["identities"], data["embeddings"]


def _admin_key(world, scheme, version):
    answer = world.client.get(
        "/v1/keys/protection",
        params={"scheme": scheme, "version": version},
        headers=world.auth(world.admin_key),
    )
    assert answer.status_code == 200, answer.text
    return ProtectionKey.from_dict(answer.json())


def test_orthonormal_rotation_keeps_every_match(world, faces):
    identities, embeddings = faces
    names = list(dict.fromkeys(identities))[:10]
    subjects = {}
    for name in names:
        row = np.flatnonzero(identities == name)[0]
        answer = world.client.post(
            "/v1/subjects",
            json={
                "consent": consent(),
                "templates": [wire(world.protection_key, embeddings[row])],
            },
            headers=world.auth(world.site_key),
        )
        subjects[answer.json()["subject_id"]] = name
    admin = world.auth(world.admin_key)
    world.client.post(
        "/v1/admin/protection-keys", json={"scheme": "orthonormal-v1"}, headers=admin
    )
    old = _admin_key(world, "orthonormal-v1", 1)
    new = _admin_key(world, "orthonormal-v1", 2)
    transform = rotation_transform(old, new, dim=128).to_wire()

    # A transform that is not orthonormal, or maps other versions, is refused.
    bad = dict(transform, from_version=2, to_version=3)
    refused = world.client.post(
        "/v1/admin/collections/default/rotate",
        json={"to_version": 2, "transform": bad},
        headers=admin,
    )
    assert refused.status_code == 422
    answer = world.client.post(
        "/v1/admin/collections/default/rotate",
        json={"to_version": 2, "transform": transform},
        headers=admin,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["rekeyed_templates"] == 10
    assert answer.json()["reenroll_subjects"] == []

    # The site now gets key 2; old-key probes are refused, new-key probes match.
    site_key = ProtectionKey.from_dict(
        world.client.get(
            "/v1/keys/protection", headers=world.auth(world.site_key)
        ).json()
    )
    assert site_key.version == 2
    stale = world.client.post(
        "/v1/identify",
        json={"template": wire(world.protection_key, embeddings[1])},
        headers=world.auth(world.site_key),
    )
    assert stale.status_code == 422
    assert "key version" in stale.json()["error"]["message"]
    references = np.stack(
        [embeddings[np.flatnonzero(identities == n)[0]] for n in names]
    )
    for name in names:
        probe_row = np.flatnonzero(identities == name)[1]
        best = world.client.post(
            "/v1/identify",
            json={"template": wire(site_key, embeddings[probe_row])},
            headers=world.auth(world.site_key),
        ).json()["candidates"][0]
        plaintext = references @ embeddings[probe_row]
        assert subjects[best["subject_id"]] == names[int(np.argmax(plaintext))]
        assert best["score"] == pytest.approx(float(plaintext.max()), abs=1e-4)


def test_biohash_rotation_lists_subjects_to_reenroll(settings):
    admin_secret = bootstrap_admin(settings)
    with TestClient(make_app(settings)) as client:
        world = setup_world(client, admin_secret, scheme="biohash-v1", dim=512)
        from facefed.privacy.templates import protect_template

        rng = np.random.default_rng(0)
        embedding = rng.standard_normal(128).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        template = protect_template(
            embedding, key=world.protection_key, model_id=MODEL_ID
        )
        enrolled = client.post(
            "/v1/subjects",
            json={"consent": consent(), "templates": [template.to_wire()]},
            headers=world.auth(world.site_key),
        ).json()
        hit = client.post(
            "/v1/identify",
            json={"template": template.to_wire()},
            headers=world.auth(world.site_key),
        ).json()
        assert hit["candidates"][0]["score"] == pytest.approx(1.0)
        admin = world.auth(world.admin_key)
        client.post(
            "/v1/admin/protection-keys", json={"scheme": "biohash-v1"}, headers=admin
        )
        answer = client.post(
            "/v1/admin/collections/default/rotate",
            json={"to_version": 2},
            headers=admin,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["reenroll_subjects"] == [enrolled["subject_id"]]
        assert client.get("/v1/health").json()["templates"] == 0
        # Re-enrollment under the new key replaces the stale template.
        new_key = ProtectionKey.from_dict(
            client.get("/v1/keys/protection", headers=world.auth(world.site_key)).json()
        )
        fresh = protect_template(embedding, key=new_key, model_id=MODEL_ID)
        added = client.post(
            f"/v1/subjects/{enrolled['subject_id']}/templates",
            json={"templates": [fresh.to_wire()]},
            headers=world.auth(world.site_key),
        )
        assert added.json()["template_count"] == 1
        assert client.get("/v1/health").json()["templates"] == 1
