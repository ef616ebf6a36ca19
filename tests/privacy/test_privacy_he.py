import random

import numpy as np
import pytest

from facefed.privacy.he import HEError, ServerHEScorer, SiteHEContext
from facefed.privacy.protection import generate_key, protect


@pytest.fixture(scope="module")
def site():
    return SiteHEContext.create(galois_keys=True, n_threads=1)


@pytest.fixture(scope="module")
def lfw(test_data):
    archive = np.load(test_data / "lfw" / "dlib_embeddings.npz")
    key = generate_key("orthonormal-v1", 1, rng=random.Random(3))
    return protect(archive["embeddings"], key), archive["identities"]


def test_public_context_has_no_secret_key(site):
    scorer = ServerHEScorer(site.public_bytes())
    assert scorer.context_id == site.context_id
    with pytest.raises(HEError, match="not a TenSEAL context framed"):
        ServerHEScorer(site.to_bytes())


def test_encrypted_1n_matches_plaintext_search_on_lfw(site, lfw):
    templates, identities = lfw
    scorer = ServerHEScorer(site.public_bytes())
    enrolled = {}
    for index, identity in enumerate(identities):
        enrolled.setdefault(identity, index)
    gallery_rows = np.array(sorted(enrolled.values()))
    gallery = templates[gallery_rows]
    probes = [i for i in range(len(identities)) if i not in set(gallery_rows)][:6]
    for probe_index in probes:
        encrypted = site.encrypt_probe(templates[probe_index])
        scores = site.decrypt_scores(
            scorer.score_many(encrypted, gallery), len(gallery)
        )
        plain = gallery @ templates[probe_index]
        np.testing.assert_allclose(scores, plain, atol=1e-3)
        assert np.argmax(scores) == np.argmax(plain)


def test_candidates_limit_the_scores_returned(site, lfw):
    templates, _ = lfw
    scorer = ServerHEScorer(site.public_bytes())
    encrypted = site.encrypt_probe(templates[0])
    picked = np.array([5, 1, 9])
    data = scorer.score_many(encrypted, templates[:20], candidates=picked)
    scores = site.decrypt_scores(data, 3)
    np.testing.assert_allclose(scores, templates[picked] @ templates[0], atol=1e-3)
    with pytest.raises(HEError, match="holds 3"):
        site.decrypt_scores(data, 4)


@pytest.mark.parametrize("layout", ["columns", "packed"])
def test_encrypted_1to1(site, lfw, layout):
    templates, _ = lfw
    scorer = ServerHEScorer(site.public_bytes())
    encrypted = site.encrypt_probe(templates[0], layout=layout)
    for other in (0, 1, 100):
        score = site.decrypt_scores(scorer.score_one(encrypted, templates[other]), 1)
        assert score[0] == pytest.approx(
            float(templates[other] @ templates[0]), abs=1e-3
        )


def test_malformed_inputs_are_clear_errors(site, lfw):
    templates, _ = lfw
    scorer = ServerHEScorer(site.public_bytes())
    with pytest.raises(HEError, match="not a TenSEAL context"):
        ServerHEScorer(b"garbage" * 10)
    public = site.public_bytes()
    with pytest.raises(HEError, match="not a TenSEAL context"):
        ServerHEScorer(public[:40] + b"\x00" * 100)
    with pytest.raises(HEError, match="not an encrypted probe"):
        scorer.score_one(b"x" * 64, templates[0])
    encrypted = site.encrypt_probe(templates[0], layout="packed")
    with pytest.raises(HEError, match="truncated"):
        scorer.score_one(encrypted[:-10], templates[0])
    corrupted = bytearray(encrypted)
    corrupted[-200:-100] = b"\x00" * 100
    with pytest.raises(HEError, match="malformed"):
        scorer.score_one(bytes(corrupted), templates[0])
    with pytest.raises(HEError, match="columns layout"):
        scorer.score_many(encrypted, templates)
    with pytest.raises(HEError, match="128-value probe"):
        scorer.score_one(encrypted, templates[0][:64])
    other_site = SiteHEContext.create(galois_keys=False, n_threads=1)
    with pytest.raises(HEError, match="another context"):
        ServerHEScorer(other_site.public_bytes()).score_one(encrypted, templates[0])
    with pytest.raises(HEError, match="galois_keys"):
        other_site.encrypt_probe(templates[0], layout="packed")
    with pytest.raises(HEError, match="NaN"):
        site.encrypt_probe(np.full(4, np.nan))


def test_site_context_survives_a_round_trip(site, lfw):
    templates, _ = lfw
    again = SiteHEContext.from_bytes(site.to_bytes())
    scorer = ServerHEScorer(site.public_bytes())
    data = scorer.score_one(
        site.encrypt_probe(templates[2], layout="packed"), templates[2]
    )
    assert again.decrypt_scores(data, 1)[0] == pytest.approx(1.0, abs=1e-3)


def test_size_limits_refuse_before_parsing(site, lfw, monkeypatch):
    from facefed.privacy import he

    templates, _ = lfw
    scorer = ServerHEScorer(site.public_bytes())
    encrypted = site.encrypt_probe(templates[0], layout="packed")
    monkeypatch.setattr(he, "MAX_PROBE_BYTES", len(encrypted) - 1)
    with pytest.raises(HEError, match="exceeds the limit"):
        scorer.score_one(encrypted, templates[0])
    monkeypatch.setattr(he, "MAX_CONTEXT_BYTES", 1000)
    with pytest.raises(HEError, match="exceeds the limit"):
        ServerHEScorer(site.public_bytes())
    with pytest.raises(HEError, match="row indices"):
        he._check_candidates(np.array([0.5]), 10)
    with pytest.raises(HEError, match="outside the gallery"):
        he._check_candidates(np.array([10]), 10)
