"""The default pipeline and the embed/verify commands on real photos."""

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from facefed.core.image import decode_image
from facefed.models.commands import register
from facefed.models.zoo import default_pipeline, load_default_embedder


def _app() -> typer.Typer:
    app = typer.Typer()
    eval_app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    register(app, eval_app)
    return app


def _photo(test_data: Path, person: str, number: int) -> Path:
    return test_data / "lfw" / person / f"{person}_{number:04d}.jpg"


def test_default_pipeline_parts(test_data: Path):
    pipeline = default_pipeline(liveness=False)
    assert pipeline.liveness is None
    assert pipeline.quality_gate is not None
    assert (
        pipeline.embedder.metadata.model_id == load_default_embedder().metadata.model_id
    )
    analysis = pipeline.embed_one(
        decode_image(_photo(test_data, "Tim_Henman", 1)), check_liveness=False
    )
    assert analysis.chip.shape == (150, 150, 3)
    assert analysis.embedding.shape == (128,)
    assert np.linalg.norm(analysis.embedding) == pytest.approx(1.0, abs=1e-5)


def test_default_pipeline_has_silent_liveness():
    from facefed.core.liveness.silent import SilentLivenessChecker

    assert isinstance(default_pipeline().liveness, SilentLivenessChecker)


def test_embed_command_prints_model_box_and_embedding(test_data: Path):
    photo = _photo(test_data, "Tim_Henman", 1)
    result = CliRunner().invoke(_app(), ["embed", str(photo)])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)
    assert entry["model_id"].startswith("dlib-resnet-v1-")
    x1, y1, x2, y2 = entry["box"]
    assert 50 < x1 < x2 < 200 and 40 < y1 < y2 < 220  # LFW faces are centred
    assert len(entry["embedding"]) == 128


def test_embed_command_reports_an_image_without_face(tmp_path: Path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(blank)
    result = CliRunner().invoke(_app(), ["embed", str(blank)])
    assert result.exit_code == 4
    assert "No face" in json.loads(result.output)[0]["error"]


@pytest.mark.parametrize(
    ("other", "decision"),
    [(("Tim_Henman", 2), "same person"), (("Hillary_Clinton", 1), "different people")],
)
def test_verify_command_decides_at_the_calibrated_threshold(test_data, other, decision):
    first = _photo(test_data, "Tim_Henman", 1)
    second = _photo(test_data, *other)
    result = CliRunner().invoke(_app(), ["verify", str(first), str(second)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["decision"] == decision
    assert answer["threshold_source"] == "FMR 0.001"
    metadata = load_default_embedder().metadata
    assert answer["threshold"] == pytest.approx(metadata.threshold_for(1e-3), abs=1e-4)
