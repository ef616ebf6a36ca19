import itertools

import numpy as np
import pytest

from facefed.privacy.evaluation import (
    PairSet,
    evaluate_schemes,
    inversion_attack,
    invert_biohash,
    make_keys,
)
from facefed.privacy.protection import protect


@pytest.fixture(scope="module")
def lfw_pairs(test_data):
    archive = np.load(test_data / "lfw" / "dlib_embeddings.npz")
    embeddings, identities = archive["embeddings"], archive["identities"]
    people = sorted(set(identities))
    fold = {person: k % 4 for k, person in enumerate(people)}
    rng = np.random.default_rng(0)
    rows = []
    for i, j in itertools.combinations(range(len(identities)), 2):
        if fold[identities[i]] != fold[identities[j]]:
            continue
        if identities[i] == identities[j] or rng.random() < 0.1:
            rows.append(
                (i, j, int(identities[i] == identities[j]), fold[identities[i]])
            )
    i, j, same, folds = map(np.array, zip(*rows, strict=True))
    return PairSet(embeddings[i], embeddings[j], same, folds)


def test_schemes_side_by_side_on_lfw(lfw_pairs, tmp_path):
    reports = {
        r.name: r
        for r in evaluate_schemes(lfw_pairs, keys=make_keys(seed=4), plot_dir=tmp_path)
    }
    assert set(reports) == {"raw", "orthonormal-v1", "biohash-v1"}
    assert reports["raw"].accuracy > 0.95
    # Orthonormal protection is exact; biohash loses a little.
    assert reports["orthonormal-v1"].accuracy == pytest.approx(reports["raw"].accuracy)
    assert reports["orthonormal-v1"].extra["max_abs_score_change"] < 1e-5
    assert (
        reports["raw"].accuracy - 0.06
        < reports["biohash-v1"].accuracy
        <= reports["raw"].accuracy + 0.01
    )
    for scheme in ("orthonormal-v1", "biohash-v1"):
        assert reports[scheme].d_sys < 0.15
        assert (tmp_path / f"unlinkability_{scheme}.png").is_file()


def test_inversion_attack_with_the_key_gets_close(lfw_pairs):
    key = make_keys(seed=2)["biohash-v1"][0]
    report = inversion_attack(lfw_pairs, key, threshold=0.905)
    assert report["targets"] > 10
    # The MAP attack beats the linear one; both land near the true embedding.
    assert report["map_mean_cosine"] > report["least_squares_mean_cosine"] > 0.85


def test_inversion_without_the_key_fails(lfw_pairs):
    keys = make_keys(seed=3)
    bits = protect(lfw_pairs.first[:20], keys["biohash-v1"][0])
    _, guess = invert_biohash(bits, keys["biohash-v1"][1], prior=lfw_pairs.second[20:])
    # A wrong key yields the population mean, not the person: no better than a
    # random other face from the same population.
    own = np.sum(guess * lfw_pairs.first[:20], axis=1).mean()
    others = np.mean(guess @ lfw_pairs.second[40:80].T)
    assert own < others + 0.02


def test_pairs_subset_stays_balanced(tmp_path):
    from facefed.privacy.commands import _read_pairs

    csv_path = tmp_path / "pairs.csv"
    lines = ["fold,path1,path2,same"]
    for fold in (1, 2):
        lines += [f"{fold},a{i}.jpg,b{i}.jpg,1" for i in range(5)]
        lines += [f"{fold},c{i}.jpg,d{i}.jpg,0" for i in range(5)]
    csv_path.write_text("\n".join(lines) + "\n")
    rows = _read_pairs(csv_path, 4)
    assert len(rows) == 8
    assert [(p.fold, p.same) for p in rows].count((1, True)) == 2
    assert len(_read_pairs(csv_path, 0)) == 20


def test_pairs_file_errors_name_the_file(tmp_path):
    from facefed.core.errors import ConfigurationError
    from facefed.privacy.commands import _read_pairs

    with pytest.raises(ConfigurationError, match="does not exist"):
        _read_pairs(tmp_path / "missing.csv", 0)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigurationError, match="is not fold,path1,path2,same"):
        _read_pairs(bad, 0)
