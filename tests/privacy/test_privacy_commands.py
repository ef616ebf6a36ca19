import csv
import json

import pytest

from facefed.privacy.commands import eval_privacy


@pytest.mark.slow
def test_eval_privacy_end_to_end_on_test_photos(test_data, lfw_manifest, tmp_path):
    enrolled = [row for row in lfw_manifest if row["role"] == "enrolled"]
    by_person: dict[str, list[str]] = {}
    for row in enrolled:
        by_person.setdefault(row["identity"], []).append(row["path"])
    people = sorted(by_person)[:24]
    rows = []
    for index, person in enumerate(people):
        fold = 1 + index % 2
        rows.append((fold, by_person[person][0], by_person[person][1], 1))
        other = people[(index + 2) % len(people)]
        rows.append((fold, by_person[person][2], by_person[other][0], 0))
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fold", "path1", "path2", "same"])
        writer.writerows(rows)

    output = tmp_path / "out"
    eval_privacy(
        pairs=pairs,
        data=test_data,
        pairs_per_fold=0,
        output=output,
        seed=1,
        he_gallery=30,
        he_probes=3,
    )

    report = json.loads((output / "privacy.json").read_text())
    assert report["pairs"] == 48
    schemes = {row["name"]: row for row in report["schemes"]}
    assert schemes["raw"]["accuracy"] > 0.9
    assert schemes["orthonormal-v1"]["accuracy"] == pytest.approx(
        schemes["raw"]["accuracy"]
    )
    assert report["encrypted_matching"]["max_abs_score_error"] < 1e-3
    assert report["encrypted_matching"]["rank1_identical"] == "3/3"
    assert (output / "unlinkability_biohash-v1.png").is_file()
