"""Encrypted matching over HTTP: CKKS probes scored without the server decrypting."""

import base64

import numpy as np
import pytest
from conftest import consent, wire

from facefed.privacy.he import SiteHEContext
from facefed.privacy.templates import protect_template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def he_context():
    return SiteHEContext.create(galois_keys=False, n_threads=1)


@pytest.fixture(scope="module")
def faces():
    from pathlib import Path

    data = np.load(Path(__file__).parents[1] / "data" / "lfw" / "dlib_embeddings.npz")
    return data["identities"], data["embeddings"]


def test_encrypted_identify_and_verify_match_plaintext(world, he_context, faces):
    identities, embeddings = faces
    names = list(dict.fromkeys(identities))[:8]
    subject_of = {}
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
        subject_of[answer.json()["subject_id"]] = name
    site = world.auth(world.site_key)
    uploaded = world.client.post(
        "/v1/he/contexts",
        content=he_context.public_bytes(),
        headers={**site, "content-type": "application/octet-stream"},
    )
    assert uploaded.status_code == 201, uploaded.text
    context_id = uploaded.json()["context_id"]

    probe_row = np.flatnonzero(identities == names[2])[1]
    probe = protect_template(
        embeddings[probe_row], key=world.protection_key, model_id="test-model-0001"
    )
    encrypted = he_context.encrypt_probe(probe.data, layout="columns")
    answer = world.client.post(
        f"/v1/he/contexts/{context_id}/identify",
        content=encrypted,
        headers={**site, "content-type": "application/octet-stream"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    scores = he_context.decrypt_scores(base64.b64decode(body["scores"]), body["count"])
    plaintext = world.client.post(
        "/v1/identify",
        json={"template": probe.to_wire(), "top_k": 8},
        headers=site,
    ).json()["candidates"]
    expected = {c["subject_id"]: c["score"] for c in plaintext}
    for subject_id, score in zip(body["subject_ids"], scores, strict=True):
        assert score == pytest.approx(expected[subject_id], abs=1e-3)
    best = body["subject_ids"][int(np.argmax(scores))]
    assert best == plaintext[0]["subject_id"]

    # Candidate-limited: the site gets only the named subjects' scores.
    chosen = list(subject_of)[:2]
    limited = world.client.post(
        f"/v1/he/contexts/{context_id}/identify",
        params={"candidate": chosen},
        content=encrypted,
        headers={**site, "content-type": "application/octet-stream"},
    ).json()
    assert limited["count"] == 2 and limited["subject_ids"] == chosen

    # 1:1 against one subject.
    one = world.client.post(
        f"/v1/he/contexts/{context_id}/verify/{best}",
        content=encrypted,
        headers={**site, "content-type": "application/octet-stream"},
    ).json()
    score = he_context.decrypt_scores(base64.b64decode(one["scores"]), one["count"])[0]
    assert score == pytest.approx(expected[best], abs=1e-3)

    # Another site cannot use this context; junk is refused clearly.
    other = world.client.post(
        f"/v1/he/contexts/{context_id}/identify",
        content=encrypted,
        headers={**world.auth(world.other_site_key)},
    )
    assert other.status_code == 403
    junk = world.client.post(
        f"/v1/he/contexts/{context_id}/identify", content=b"junk", headers=site
    )
    assert junk.status_code == 422
