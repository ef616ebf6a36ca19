"""The default pipeline refuses the Silent-Face spoof frames, with reasons."""

import pytest

from facefed.core.errors import SpoofError
from facefed.core.liveness.faces import read_rgb


@pytest.fixture(scope="module")
def pipeline():
    zoo = pytest.importorskip("facefed.models.zoo")
    return zoo.default_pipeline(liveness=True)


@pytest.mark.slow
def test_default_pipeline_embeds_the_live_frame(pipeline, test_data):
    analysis = pipeline.embed_one(read_rgb(test_data / "antispoof" / "image_T1.jpg"))
    assert analysis.liveness is not None and analysis.liveness.is_live
    assert analysis.embedding is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["image_F1.jpg", "image_F2.jpg"])
def test_default_pipeline_refuses_the_spoof_frames(pipeline, test_data, name):
    with pytest.raises(SpoofError) as refused:
        pipeline.embed_one(read_rgb(test_data / "antispoof" / name))
    reasons = refused.value.reasons
    assert any("anti-spoofing networks" in reason for reason in reasons)
    # reasons carry scores and sentences only, never pixel data
    assert all(isinstance(reason, str) and len(reason) < 300 for reason in reasons)
