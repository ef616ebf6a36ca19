"""The verification evaluation: pairs, face choice, cache, fallback, report, CLI."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from facefed.core.errors import ConfigurationError
from facefed.core.types import Face
from facefed.models.commands import register
from facefed.models.verification_eval import (
    EmbeddingCache,
    ImageEmbedding,
    choose_face,
    read_pairs,
)


def _face(x1, y1, x2, y2):
    landmarks = np.zeros((5, 2), np.float32)
    return Face(
        box=np.array([x1, y1, x2, y2], np.float32), score=0.9, landmarks=landmarks
    )


def test_choose_face_prefers_the_centre_then_the_larger():
    off_centre_big = _face(0, 0, 150, 150)
    centred_small = _face(100, 100, 150, 150)
    assert choose_face([off_centre_big, centred_small], 250, 250) is centred_small
    same_centre_big = _face(75, 75, 175, 175)
    assert choose_face([centred_small, same_centre_big], 250, 250) is same_centre_big
    assert choose_face([], 250, 250) is None


def test_read_pairs_validates(tmp_path: Path):
    good = tmp_path / "pairs.csv"
    good.write_text("fold,path1,path2,same\n3,a.jpg,b.jpg,1\n3,a.jpg,c.jpg,0\n")
    pairs = read_pairs(good)
    assert [(p.fold, p.same) for p in pairs] == [(3, True), (3, False)]
    bad = tmp_path / "bad.csv"
    bad.write_text("fold,path1,path2,same\nx,a.jpg,b.jpg,1\n")
    with pytest.raises(ConfigurationError, match="Line 2"):
        read_pairs(bad)
    with pytest.raises(ConfigurationError, match="Cannot read"):
        read_pairs(tmp_path / "absent.csv")


def test_cache_round_trip(tmp_path: Path, test_data: Path):
    image = test_data / "lfw" / "Tim_Henman" / "Tim_Henman_0001.jpg"
    key = EmbeddingCache.key(image, "model-a", "yunet")
    assert key != EmbeddingCache.key(image, "model-b", "yunet")
    assert key != EmbeddingCache.key(image, "model-a", "hog")
    cache = EmbeddingCache(tmp_path / "cache.npz")
    vector = np.arange(4, dtype=np.float32)
    cache.put(key, ImageEmbedding(vector, True, [1.0, 2.0, 3.0, 4.0]))
    cache.save()
    again = EmbeddingCache(tmp_path / "cache.npz").get(key)
    assert again is not None and again.detected and again.box == [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(again.embedding, vector)


def _protocol(tmp_path: Path, test_data: Path) -> Path:
    """Genuine pairs of three people, impostor pairs across, a faceless image."""
    people = ["Tim_Henman", "Hillary_Clinton", "Nelson_Mandela"]
    root = tmp_path / "root"
    for person in people:
        (root / person).mkdir(parents=True)
        for n in (1, 2, 3):
            name = f"{person}_{n:04d}.jpg"
            (root / person / name).write_bytes(
                (test_data / "lfw" / person / name).read_bytes()
            )
    Image.new("RGB", (250, 250), (128, 128, 128)).save(root / "blank.jpg")
    rows = []
    for fold, person in enumerate(people, start=1):
        rows.append(
            [fold, f"{person}/{person}_0001.jpg", f"{person}/{person}_0002.jpg", 1]
        )
        rows.append(
            [fold, f"{person}/{person}_0002.jpg", f"{person}/{person}_0003.jpg", 1]
        )
        other = people[fold % 3]
        rows.append(
            [fold, f"{person}/{person}_0001.jpg", f"{other}/{other}_0003.jpg", 0]
        )
        rows.append([fold, f"{person}/{person}_0003.jpg", "blank.jpg", 0])
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fold", "path1", "path2", "same"])
        writer.writerows(rows)
    return path


def _app() -> typer.Typer:
    app = typer.Typer()
    eval_app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    register(app, eval_app)
    return app


@pytest.mark.slow
def test_eval_verify_end_to_end(tmp_path: Path, test_data: Path):
    pairs = _protocol(tmp_path, test_data)
    output = tmp_path / "out"
    cache = tmp_path / "cache.npz"
    arguments = [
        "eval",
        "verify",
        "--pairs",
        str(pairs),
        "--root",
        str(tmp_path / "root"),
        "--output",
        str(output),
        "--cache",
        str(cache),
    ]
    result = CliRunner().invoke(_app(), arguments)
    assert result.exit_code == 0, result.output
    report = json.loads((output / "report.json").read_text())
    assert report["pairs"] == 12 and report["images"] == 10
    # The blank image is counted and listed, and its pairs are still scored.
    assert report["no_face_images"] == 1
    assert report["no_face_image_paths"] == ["blank.jpg"]
    assert report["pairs_with_fallback"] == 3
    assert report["kfold_accuracy"] == 1.0
    assert report["eer"] == 0.0
    assert (output / "roc.png").stat().st_size > 1000
    assert (output / "det.png").stat().st_size > 1000
    assert "no face detected in 1 images" in result.output
    # A rerun reads every embedding from the cache.
    mtime = cache.stat().st_mtime_ns
    again = CliRunner().invoke(_app(), arguments)
    assert again.exit_code == 0, again.output
    assert cache.stat().st_mtime_ns == mtime
    assert json.loads((output / "report.json").read_text())["kfold_accuracy"] == 1.0
    # Six impostor pairs cannot calibrate FMR 1e-2: refused, nothing stored.
    refused = CliRunner().invoke(_app(), [*arguments, "--calibrate"])
    assert isinstance(refused.exception, ConfigurationError)
    assert "cannot be calibrated on 6 impostor pairs" in str(refused.exception)
