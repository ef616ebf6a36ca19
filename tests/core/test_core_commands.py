"""`facefed detect` and `facefed align` through the root app, on real photos."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facefed.core import cli


@pytest.fixture(scope="module")
def app():
    cli._register_commands()
    return cli.app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _photos(test_data: Path) -> tuple[Path, Path]:
    return (
        test_data / "detection" / "facenet_pytorch_multiface.jpg",
        test_data / "lfw" / "Ann_Veneman" / "Ann_Veneman_0001.jpg",
    )


def test_detect_json(app, runner, test_data: Path) -> None:
    group, portrait = _photos(test_data)
    result = runner.invoke(app, ["detect", "--json", str(group), str(portrait)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["detector"] == "yunet"
    counts = [len(entry["faces"]) for entry in payload["images"]]
    assert counts == [6, 1]
    face = payload["images"][1]["faces"][0]
    assert len(face["box"]) == 4 and len(face["landmarks"]) == 5
    assert face["landmarks"][0][0] < face["landmarks"][1][0]


def test_detect_table_and_drawing(app, runner, test_data: Path, tmp_path: Path) -> None:
    _, portrait = _photos(test_data)
    drawn = tmp_path / "drawn.png"
    result = runner.invoke(
        app, ["detect", str(portrait), "--draw", str(drawn)], env={"COLUMNS": "150"}
    )
    assert result.exit_code == 0, result.output
    assert "Ann_Veneman_0001.jpg" in result.stdout
    assert "Faces found by yunet" in result.stdout
    original = np.asarray(Image.open(portrait).convert("RGB"))
    picture = np.asarray(Image.open(drawn))
    assert picture.shape == original.shape
    changed = np.any(picture != original, axis=2)
    assert 0.005 < changed.mean() < 0.2  # a box and dots, not a new image


def test_detect_with_dlib_hog(app, runner, test_data: Path) -> None:
    _, portrait = _photos(test_data)
    result = runner.invoke(app, ["detect", "--json", "-d", "hog", str(portrait)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["detector"] == "hog" and len(payload["images"][0]["faces"]) == 1


def test_detect_unknown_detector(app, runner, test_data: Path) -> None:
    _, portrait = _photos(test_data)
    result = runner.invoke(app, ["detect", "-d", "haar", str(portrait)])
    assert result.exit_code != 0
    assert "known detectors" in str(result.exception)


def test_detect_reports_bad_files_and_goes_on(
    app, runner, test_data: Path, tmp_path: Path
) -> None:
    _, portrait = _photos(test_data)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    result = runner.invoke(app, ["detect", "--json", str(text), str(portrait)])
    assert result.exit_code == 3
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert "not an image" in payload["images"][0]["error"]
    assert len(payload["images"][1]["faces"]) == 1


@pytest.mark.parametrize(("geometry", "size"), [("arcface", 112), ("dlib", 150)])
def test_align_writes_chips(
    app, runner, test_data: Path, tmp_path: Path, geometry: str, size: int
) -> None:
    group, portrait = _photos(test_data)
    out = tmp_path / "chips"
    result = runner.invoke(
        app, ["align", str(group), str(portrait), "--out", str(out), "-g", geometry]
    )
    assert result.exit_code == 0, result.output
    assert f"Wrote 7 {geometry} chips" in result.stdout
    chips = sorted(out.glob("*.png"))
    assert len(chips) == 7
    assert (out / "Ann_Veneman_0001_1.png").is_file()
    for chip in chips:
        assert Image.open(chip).size == (size, size)


def test_detect_with_a_user_scrfd_file(
    app, runner, test_data: Path, tmp_path: Path
) -> None:
    from tests.core.test_core_scrfd import _build

    model = _build(tmp_path / "scrfd_const.onnx", batch_dim=False)
    group, _ = _photos(test_data)
    result = runner.invoke(
        app, ["detect", "--json", "-d", f"scrfd:{model}", str(group)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["detector"] == "scrfd"
    scores = [face["score"] for face in payload["images"][0]["faces"]]
    assert scores == [0.9, 0.7]  # the graph's known anchors, after NMS
