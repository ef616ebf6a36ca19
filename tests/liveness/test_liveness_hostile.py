"""Hostile input to liveness: tampered challenges, broken stores, bad recordings.

Every failure must be a `FacefedError` (printed as one line by `cli.main`),
a replay must stay refused whatever happened to the used-nonce file, and a
recording must not be able to exhaust memory.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facefed.core import cli
from facefed.core.errors import ConfigurationError, ImageError
from facefed.core.liveness.challenge import (
    Challenge,
    ChallengeError,
    ChallengeIssuer,
    ChallengeVerifier,
    FileNonceStore,
    MemoryNonceStore,
)
from facefed.core.liveness.faces import read_frames

KEY = b"0123456789abcdef0123456789abcdef"
NOW = 1_750_000_000.0


@pytest.fixture(scope="module")
def app():
    cli._register_commands()
    return cli.app


@pytest.fixture
def challenge() -> Challenge:
    return ChallengeIssuer(key=KEY, clock=lambda: NOW).issue(2)


def _verifier(store) -> ChallengeVerifier:
    return ChallengeVerifier(key=KEY, nonce_store=store, clock=lambda: NOW + 1)


# --- challenge files -----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("issued_at", 10**400),  # beyond float: OverflowError
        ("expires_at", float("inf")),
        ("expires_at", float("nan")),
        ("actions", None),
    ],
)
def test_malformed_challenge_fields_are_refused(
    challenge: Challenge, field: str, value: object
) -> None:
    data = challenge.to_dict()
    data[field] = value
    with pytest.raises(ChallengeError):
        Challenge.from_dict(json.loads(json.dumps(data)))


def test_non_ascii_signature_reads_as_forged(challenge: Challenge) -> None:
    forged = replace(challenge, signature="é" * 64)
    verdict = _verifier(MemoryNonceStore()).verify(forged, [])
    assert not verdict.passed
    assert "signature is not valid" in verdict.reasons[0]


def test_cli_refuses_a_deeply_nested_challenge_file(app, tmp_path: Path) -> None:
    nested = tmp_path / "challenge.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    frames = tmp_path / "frames"
    frames.mkdir()
    result = CliRunner().invoke(
        app,
        ["liveness", "challenge", "verify", "--challenge", str(nested), str(frames)],
    )
    assert isinstance(result.exception, ChallengeError), repr(result.exception)


def test_cli_challenge_new_onto_a_folder_fails_cleanly(app, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["liveness", "challenge", "new", "--out", str(tmp_path)]
    )
    assert isinstance(result.exception, ChallengeError), repr(result.exception)
    assert "Cannot write the challenge" in str(result.exception)


# --- the used-nonce file -------------------------------------------------------


@pytest.mark.parametrize(
    "content", ['{"abc": ', "[1, 2]", '{"abc": null}', '"text"', "\xff"]
)
def test_a_damaged_nonce_store_is_refused_not_reset(
    tmp_path: Path, challenge: Challenge, content: str
) -> None:
    path = tmp_path / "used_nonces.json"
    path.write_text(content, encoding="latin-1")
    with pytest.raises(ConfigurationError, match="used-nonce store"):
        _verifier(FileNonceStore(path)).verify(challenge, [])
    # Nothing was changed: the operator still has the file to inspect.
    assert path.read_text(encoding="latin-1") == content


def test_replay_stays_refused_across_store_instances(
    tmp_path: Path, challenge: Challenge
) -> None:
    path = tmp_path / "used_nonces.json"
    _verifier(FileNonceStore(path)).verify(challenge, [])
    verdict = _verifier(FileNonceStore(path)).verify(challenge, [])
    assert verdict.reasons == ["The challenge was already answered (replayed nonce)."]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text()) == {challenge.nonce: challenge.expires_at}


def test_an_empty_nonce_file_is_a_new_store(
    tmp_path: Path, challenge: Challenge
) -> None:
    path = tmp_path / "used_nonces.json"
    path.write_text("")
    store = FileNonceStore(path)
    assert store.consume("n", expires_at=NOW + 60, now=NOW)
    assert not store.consume("n", expires_at=NOW + 60, now=NOW)


def test_a_folder_in_place_of_the_nonce_store_is_refused(
    tmp_path: Path, challenge: Challenge
) -> None:
    path = tmp_path / "used_nonces.json"
    path.mkdir()
    with pytest.raises(ConfigurationError, match="used-nonce store"):
        _verifier(FileNonceStore(path)).verify(challenge, [])


# --- settings ------------------------------------------------------------------


def test_bad_liveness_settings_name_the_variable(monkeypatch) -> None:
    from facefed.core.liveness.settings import get_liveness_settings

    monkeypatch.setenv("FACEFED_LIVENESS_THRESHOLD", "2")
    get_liveness_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="FACEFED_LIVENESS_THRESHOLD"):
            get_liveness_settings()
    finally:
        monkeypatch.delenv("FACEFED_LIVENESS_THRESHOLD")
        get_liveness_settings.cache_clear()


# --- recordings ----------------------------------------------------------------


def _frames_folder(folder: Path, count: int, size: tuple[int, int]) -> Path:
    folder.mkdir()
    for index in range(count):
        Image.new("RGB", size, (index, 0, 0)).save(folder / f"{index:03d}.png")
    return folder


def test_recording_over_the_pixel_budget_is_refused(tmp_path: Path) -> None:
    folder = _frames_folder(tmp_path / "frames", 4, (100, 100))
    assert len(read_frames(folder, max_total_pixels=40_000)) == 4
    with pytest.raises(ImageError, match="pixels in all"):
        read_frames(folder, max_total_pixels=39_999)


def test_video_over_the_pixel_budget_is_refused(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for value in range(5):
        writer.write(np.full((48, 64, 3), value * 40, np.uint8))
    writer.release()
    assert len(read_frames(path)) == 5
    with pytest.raises(ImageError, match="pixels in all"):
        read_frames(path, max_total_pixels=4 * 64 * 48)
    with pytest.raises(ImageError, match="longer than 3 frames"):
        read_frames(path, max_frames=3)


def test_video_with_frames_over_the_image_limit_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    import cv2

    from facefed.core.settings import get_core_settings

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    monkeypatch.setenv("FACEFED_MAX_IMAGE_PIXELS", str(64 * 48 - 1))
    get_core_settings.cache_clear()
    try:
        with pytest.raises(ImageError, match="pixels a frame"):
            read_frames(path)
    finally:
        monkeypatch.delenv("FACEFED_MAX_IMAGE_PIXELS")
        get_core_settings.cache_clear()


def test_a_bad_frame_in_a_folder_is_refused(tmp_path: Path) -> None:
    folder = _frames_folder(tmp_path / "frames", 2, (32, 32))
    (folder / "002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageError):
        read_frames(folder)


# --- liveness check on several files -------------------------------------------


def test_check_reports_a_bad_file_and_goes_on(
    app, test_data: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    faceless = tmp_path / "wall.png"
    Image.new("RGB", (64, 64), (120, 120, 120)).save(faceless)
    live = test_data / "antispoof" / "image_T1.jpg"
    result = CliRunner().invoke(
        app, ["liveness", "check", "--json", str(empty), str(live), str(faceless)]
    )
    assert result.exit_code == 3  # the first error: an image error
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [row["image"] for row in rows] == [str(empty), str(live), str(faceless)]
    assert "no bytes" in rows[0]["error"]
    assert rows[1]["is_live"] is True
    assert "No face" in rows[2]["error"]


def test_a_non_finite_face_box_is_a_face_error() -> None:
    from facefed.core.errors import FaceError
    from facefed.core.liveness import default_checker
    from facefed.core.types import Face

    face = Face(box=np.full(4, np.nan, np.float32), score=0.9)
    with pytest.raises(FaceError, match="non-finite"):
        default_checker().check(np.zeros((100, 100, 3), np.uint8), face)


# --- eval liveness label files -------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"garbage,,,\n", "holds no rows"),
        (b"path,label\nx.jpg,live\n", "missing: attack_type, source"),
        (b"path,label,attack_type,source\nx.jpg\n", "too few fields"),
        (b"\xff\xfe\x00garbage", "Cannot read the label file"),
    ],
)
def test_bad_label_files_are_refused_and_write_nothing(
    app, tmp_path: Path, content: bytes, match: str
) -> None:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "antispoof_labels.csv").write_bytes(content)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", "liveness", "--data", str(tmp_path), "--out", str(out)]
    )
    assert isinstance(result.exception, ConfigurationError), repr(result.exception)
    assert match in str(result.exception)
    assert not out.exists()


def test_eval_out_onto_a_file_is_refused_before_scoring(
    app, tmp_path: Path, monkeypatch
) -> None:
    from facefed.core.liveness import report

    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "antispoof_labels.csv").write_text(
        "path,label,attack_type,source\nx.jpg,live,,webcam\n"
    )
    blocker = tmp_path / "report"
    blocker.write_text("mine")

    def no_scoring(*args, **kwargs):
        raise AssertionError("scoring started before --out was checked")

    monkeypatch.setattr(report, "score_samples", no_scoring)
    result = CliRunner().invoke(
        app, ["eval", "liveness", "--data", str(tmp_path), "--out", str(blocker)]
    )
    assert isinstance(result.exception, ConfigurationError), repr(result.exception)
    assert "is a file" in str(result.exception)
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("blocker", ["folder", "dangling link"])
def test_an_unusable_challenge_key_file_is_a_configuration_error(
    tmp_path: Path, monkeypatch, blocker: str
) -> None:
    from facefed.core.liveness.challenge import load_challenge_key
    from facefed.core.liveness.settings import get_liveness_settings
    from facefed.core.settings import get_core_settings

    key_path = tmp_path / "liveness" / "challenge.key"
    key_path.parent.mkdir()
    if blocker == "folder":
        key_path.mkdir()
    else:
        key_path.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("FACEFED_HOME", str(tmp_path))
    monkeypatch.delenv("FACEFED_LIVENESS_CHALLENGE_KEY", raising=False)
    get_core_settings.cache_clear()
    get_liveness_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="challenge key"):
            load_challenge_key()
    finally:
        monkeypatch.undo()
        get_core_settings.cache_clear()
        get_liveness_settings.cache_clear()
    # Nothing was written through the link.
    assert not (tmp_path / "elsewhere").exists()
