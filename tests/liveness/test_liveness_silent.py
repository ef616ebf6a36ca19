"""Silent liveness on real frames: MiniFASNet crops, weight-free cues, fusion."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from facefed.core.errors import ConfigurationError, FaceError, SpoofError
from facefed.core.liveness import default_checker
from facefed.core.liveness.crops import context_crop, scaled_box
from facefed.core.liveness.faces import default_face_finder, largest_face, read_rgb
from facefed.core.liveness.silent import (
    SilentConfig,
    SilentLivenessChecker,
    require_live,
)
from facefed.core.liveness.texture import measure_texture
from facefed.core.types import Face

SAMPLES = {"image_T1.jpg": True, "image_F1.jpg": False, "image_F2.jpg": False}


@pytest.fixture(scope="module")
def checker() -> SilentLivenessChecker:
    return default_checker()


@pytest.fixture(scope="module")
def sample_faces(test_data):
    finder = default_face_finder()
    out = {}
    for name in SAMPLES:
        image = read_rgb(test_data / "antispoof" / name)
        out[name] = (image, largest_face(finder, image))
    return out


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_silent_face_samples_are_classified_from_the_full_frame(
    checker, sample_faces, name
):
    image, face = sample_faces[name]
    result = checker.check(image, face)
    assert result.is_live is SAMPLES[name]
    assert result.threshold == checker.threshold
    assert 0.0 <= result.score <= 1.0
    for cue in ("minifasnet_v2", "minifasnet_v1se", "network", "chroma", "moire"):
        assert 0.0 <= result.cues[cue] <= 1.0
    if SAMPLES[name]:
        assert result.reasons == []
    else:
        assert result.reasons[0].startswith("The fused liveness score")
        assert any("anti-spoofing networks" in r for r in result.reasons)


def test_live_frame_scores_far_above_both_spoofs(checker, sample_faces):
    scores = {n: checker.check(*sample_faces[n]).score for n in SAMPLES}
    assert scores["image_T1.jpg"] > 0.9
    assert max(scores["image_F1.jpg"], scores["image_F2.jpg"]) < 0.2


@pytest.mark.parametrize("factor", [0.9, 1.15])
def test_decisions_hold_when_the_detector_box_is_somewhat_off(sample_faces, factor):
    # Silent-Face's crops came from another detector's boxes; the decision must
    # not hinge on the exact box size (measured: F1 flips to live only when
    # YuNet's box is shrunk by 15 %, see README).
    scaled = SilentLivenessChecker(SilentConfig(box_scale=factor))
    for name, live in SAMPLES.items():
        assert scaled.check(*sample_faces[name]).is_live is live


def test_require_live_raises_spoof_error_with_the_reasons(checker, sample_faces):
    result = checker.check(*sample_faces["image_F2.jpg"])
    with pytest.raises(SpoofError) as caught:
        require_live(result)
    assert caught.value.reasons == result.reasons
    assert caught.value.exit_code == 4
    require_live(checker.check(*sample_faces["image_T1.jpg"]))


def test_default_checker_is_loaded_once():
    assert default_checker() is default_checker()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1.5},
        {"network_weight": 0.9, "texture_weight": 0.3},
        {"network_weight": -0.1, "texture_weight": 1.1},
        {"box_scale": 3.0},
    ],
)
def test_invalid_config_is_refused_with_the_value(kwargs):
    with pytest.raises(ConfigurationError, match=str(next(iter(kwargs.values())))):
        SilentConfig(**kwargs)


def test_threshold_setting_is_read_from_the_environment(monkeypatch):
    from facefed.core.liveness.settings import get_liveness_settings

    monkeypatch.setenv("FACEFED_LIVENESS_THRESHOLD", "0.9")
    get_liveness_settings.cache_clear()
    try:
        assert SilentLivenessChecker().threshold == 0.9
    finally:
        get_liveness_settings.cache_clear()


@given(
    width=st.integers(80, 800),
    height=st.integers(80, 800),
    fx=st.floats(0.0, 1.0),
    fy=st.floats(0.0, 1.0),
    size=st.floats(0.2, 0.9),
    scale=st.sampled_from([1.0, 2.7, 4.0]),
)
def test_scaled_box_stays_inside_and_keeps_the_aspect(
    width, height, fx, fy, size, scale
):
    bw, bh = size * width, size * height * 0.9
    x1, y1 = fx * (width - bw), fy * (height - bh)
    box = np.array([x1, y1, x1 + bw, y1 + bh], np.float32)
    left, top, right, bottom = scaled_box(box, (height, width, 3), scale)
    assert 0 <= left < right <= width
    assert 0 <= top < bottom <= height
    # the crop covers the face box (it is grown, then only shifted)
    assert left <= x1 + 1 and right >= x1 + bw - 1
    assert top <= y1 + 1 and bottom >= y1 + bh - 1
    assert (right - left) / (bottom - top) == pytest.approx(bw / bh, rel=0.1, abs=0.05)


def test_box_outside_the_image_is_refused():
    with pytest.raises(FaceError, match="outside"):
        scaled_box(np.array([500, 500, 600, 600], np.float32), (100, 100, 3), 2.7)


def test_context_crop_is_80x80_rgb(sample_faces):
    image, face = sample_faces["image_T1.jpg"]
    crop = context_crop(image, face.box, scale=2.7)
    assert crop.shape == (80, 80, 3) and crop.dtype == np.uint8


@pytest.mark.shared_data
def test_chroma_cue_separates_the_replay_crops(shared_data):
    def spread(folder):
        values = []
        for path in sorted(
            (shared_data / "antispoof/apfol_webcam_crops" / folder).glob("*.png")
        )[:15]:
            image = read_rgb(path)
            box = np.array([0, 0, image.shape[1], image.shape[0]], np.float32)
            values.append(measure_texture(image, box).chroma)
        return float(np.median(values))

    assert spread("real") + 2.0 < spread("fake")


def test_whole_image_box_scores_a_tight_crop(checker, sample_faces):
    image, face = sample_faces["image_T1.jpg"]
    x1, y1, x2, y2 = face.box.astype(int)
    crop = np.ascontiguousarray(image[y1:y2, x1:x2])
    whole = Face(
        box=np.array([0, 0, crop.shape[1], crop.shape[0]], np.float32), score=1
    )
    result = checker.check(crop, whole)
    assert 0.0 <= result.score <= 1.0 and set(result.cues) >= {"network", "texture"}


def test_a_screen_grating_raises_the_moire_measure(sample_faces):
    # A fine periodic pattern over the face, as a camera sees a screen's pixel
    # grid, must show as a spectral peak and lower the moire live score.
    image, face = sample_faces["image_T1.jpg"]
    clean = measure_texture(image, face.box)
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    grating = 18 * np.sin(2 * np.pi * (xx * 0.16 + yy * 0.05))
    striped = np.clip(image.astype(np.float32) + grating[..., None], 0, 255)
    moire = measure_texture(striped.astype(np.uint8), face.box)
    assert moire.moire > clean.moire + 2.0
    assert moire.moire_score < 0.5 < clean.moire_score


def test_a_colour_cast_gradient_raises_the_chroma_measure(sample_faces):
    image, face = sample_faces["image_T1.jpg"]
    clean = measure_texture(image, face.box)
    centre, half = (face.box[0] + face.box[2]) / 2, (face.box[2] - face.box[0]) / 2
    columns = np.arange(image.shape[1], dtype=np.float32)
    ramp = (40 * np.clip((columns - centre) / half, -1, 1))[None, :]
    cast = image.astype(np.float32)
    cast[..., 0] += ramp  # a red-to-cyan sweep, as on a tilted screen
    cast[..., 2] -= ramp
    tinted = measure_texture(np.clip(cast, 0, 255).astype(np.uint8), face.box)
    assert tinted.chroma > clean.chroma + 3.0
    assert tinted.chroma_score < clean.chroma_score


def test_cuda_request_without_a_cuda_provider_is_refused(monkeypatch, caplog):
    import logging

    from facefed.core.errors import ModelError
    from facefed.core.liveness import minifasnet

    monkeypatch.setattr(
        minifasnet.ort, "get_available_providers", lambda: ["CPUExecutionProvider"]
    )
    with pytest.raises(ModelError, match="CUDA"):
        minifasnet.providers_for("cuda")
    with caplog.at_level(logging.INFO, logger="facefed.core.liveness.minifasnet"):
        assert minifasnet.providers_for("auto") == ["CPUExecutionProvider"]
    assert "CPU" in caplog.text
    monkeypatch.setattr(
        minifasnet.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert minifasnet.providers_for("auto")[0] == "CUDAExecutionProvider"
    assert minifasnet.providers_for("cpu") == ["CPUExecutionProvider"]
