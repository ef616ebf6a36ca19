"""The Faiss gallery: exact, IVF and binary indexes, threads, and crash recovery."""

import threading

import numpy as np
import pytest
from conftest import bootstrap_admin, consent, make_app, setup_world, unit_vectors, wire
from fastapi.testclient import TestClient

from facefed.core.errors import TemplateError
from facefed.server.gallery import CollectionIndex, IndexConfig


def test_exact_index_finds_noisy_copies_and_removes_subjects():
    rng = np.random.default_rng(0)
    vectors = unit_vectors(rng, 500)
    index = CollectionIndex("float", 128, IndexConfig(use_gpu=False))
    for i, vector in enumerate(vectors):
        index.add(f"s{i}", [1000 + i], vector[None, :])
    probe = vectors[42] + 0.05 * rng.standard_normal(128).astype(np.float32)
    probe /= np.linalg.norm(probe)
    hits = index.search(probe, top_k=3)
    assert hits[0].subject_id == "s42"
    assert hits[0].score == pytest.approx(float(probe @ vectors[42]), abs=1e-5)
    assert index.remove_subject("s42") == 1
    assert all(hit.subject_id != "s42" for hit in index.search(probe, top_k=5))
    assert index.size == 499


def test_ivf_switch_keeps_results_and_supports_removal():
    rng = np.random.default_rng(1)
    vectors = unit_vectors(rng, 3000)
    config = IndexConfig(ivf_min_size=2000, nlist=32, nprobe=32, use_gpu=False)
    index = CollectionIndex("float", 128, config)
    for start in range(0, 3000, 500):
        for i in range(start, start + 500):
            index.add(f"s{i}", [i + 1], vectors[i][None, :])
    assert index.is_ivf
    noisy = vectors[:200] + 0.05 * rng.standard_normal((200, 128)).astype(np.float32)
    found = [index.search(q / np.linalg.norm(q), top_k=1)[0].subject_id for q in noisy]
    assert found == [f"s{i}" for i in range(200)]  # nprobe = nlist: exhaustive
    index.remove_subject("s7")
    assert index.search(vectors[7], top_k=1)[0].subject_id != "s7"
    assert index.score_subject("s8", vectors[8])[1] == pytest.approx(1.0, abs=1e-5)


def test_binary_index_scores_hamming_as_cosine():
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2, size=(50, 512)).astype(np.uint8)
    packed = np.packbits(bits, axis=1)
    index = CollectionIndex("binary", 512, IndexConfig(use_gpu=False))
    for i in range(50):
        index.add(f"s{i}", [i + 1], packed[i][None, :])
    probe_bits = bits[9].copy()
    probe_bits[:64] ^= 1  # 64 of 512 bits differ
    hit = index.search(np.packbits(probe_bits), top_k=1)[0]
    assert hit.subject_id == "s9"
    assert hit.score == pytest.approx(np.cos(np.pi * 64 / 512), abs=1e-6)
    with pytest.raises(TemplateError):
        index.add("x", [999], np.zeros((1, 10), dtype=np.uint8))


def test_concurrent_enroll_identify_erase_over_threads(world):
    rng = np.random.default_rng(3)
    vectors = unit_vectors(rng, 40)
    errors: list[str] = []
    enrolled: dict[int, str] = {}

    def enroll(i: int) -> None:
        answer = world.client.post(
            "/v1/subjects",
            json={
                "consent": consent(),
                "templates": [wire(world.protection_key, vectors[i])],
            },
            headers=world.auth(world.site_key),
        )
        if answer.status_code != 201:
            errors.append(answer.text)
        else:
            enrolled[i] = answer.json()["subject_id"]

    def identify(i: int) -> None:
        answer = world.client.post(
            "/v1/identify",
            json={"template": wire(world.protection_key, vectors[i])},
            headers=world.auth(world.other_site_key),
        )
        if answer.status_code != 200:
            errors.append(answer.text)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(40)]
    threads += [threading.Thread(target=identify, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    erasers = [
        threading.Thread(
            target=lambda s=subject: world.client.delete(
                f"/v1/subjects/{s}", headers=world.auth(world.site_key)
            )
        )
        for i, subject in enrolled.items()
        if i % 2
    ]
    for thread in erasers:
        thread.start()
    for thread in erasers:
        thread.join()
    assert world.client.get("/v1/health").json()["templates"] == 20
    for i in range(40):
        best = world.client.post(
            "/v1/identify",
            json={"template": wire(world.protection_key, vectors[i])},
            headers=world.auth(world.site_key),
        ).json()["candidates"][0]
        if i % 2 == 0:
            assert best["subject_id"] == enrolled[i]
        else:
            assert best["subject_id"] != enrolled[i]
    audit = world.client.get(
        "/v1/admin/audit/verify", headers=world.auth(world.admin_key)
    )
    assert audit.json()["ok"]


class Crash(BaseException):
    """Stands for the process dying between two steps."""


def _started(settings, world=None):
    from facefed.server.service import GalleryService

    service = GalleryService(settings)
    service.start()
    return service


def _site(world):
    from facefed.server.security import Principal

    return Principal(role="site", key_id="k", site_id=world.site_id)


def _enroll_direct(service, world, vector):
    from datetime import UTC, datetime

    from facefed.privacy.templates import protect_template
    from facefed.server.service import ConsentInput

    return service.enroll(
        _site(world),
        collection_id="default",
        consent=ConsentInput("door access", "consent", "v1", datetime.now(UTC), 30),
        templates=[
            protect_template(
                vector, key=world.protection_key, model_id="test-model-0001"
            )
        ],
    )["subject_id"]


def _best(service, vector, world):
    from facefed.privacy.templates import protect_template

    probe = protect_template(
        vector, key=world.protection_key, model_id="test-model-0001"
    )
    hits = service.identify(
        _site(world), collection_id="default", template=probe, top_k=1, threshold=None
    ).candidates
    return hits[0].subject_id if hits else None


@pytest.fixture
def crash_world(settings):
    admin = bootstrap_admin(settings)
    with TestClient(make_app(settings)) as client:
        world = setup_world(client, admin)
    return world


def test_crash_between_db_commit_and_index_add(settings, crash_world, monkeypatch):
    """After a restart the template the database holds is searchable."""
    vector = unit_vectors(np.random.default_rng(4), 1)[0]
    service = _started(settings)

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(CollectionIndex, "add", crash)
    with pytest.raises(Crash):
        _enroll_direct(service, crash_world, vector)
    service.close()
    monkeypatch.undo()

    restarted = _started(settings)
    assert _best(restarted, vector, crash_world) is not None
    assert restarted.gallery.get("default").size == 1
    restarted.close()


def test_crash_between_index_remove_and_db_delete(settings, crash_world, monkeypatch):
    """An erasure cut short is finished at restart: nothing stored or searchable."""
    from facefed.core.errors import GoneError
    from facefed.server.security import Principal

    vector = unit_vectors(np.random.default_rng(5), 1)[0]
    service = _started(settings)
    subject = _enroll_direct(service, crash_world, vector)

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(type(service), "_delete_subject_rows", staticmethod(crash))
    with pytest.raises(Crash):
        service.erase(_site(crash_world), subject)
    assert _best(service, vector, crash_world) is None  # already out of the index
    service.close()
    monkeypatch.undo()

    restarted = _started(settings)
    assert _best(restarted, vector, crash_world) is None
    assert restarted.gallery.get("default").size == 0
    with pytest.raises(GoneError):
        restarted.export(Principal(role="admin", key_id="a"), subject)
    assert restarted.verify_audit().ok
    restarted.close()
