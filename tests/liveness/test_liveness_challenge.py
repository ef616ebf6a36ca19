"""Interactive challenge: signing, expiry, replay, order, and actions on real frames."""

import json
from dataclasses import replace

import numpy as np
import pytest

from facefed.core.errors import ConfigurationError
from facefed.core.liveness.challenge import (
    Action,
    Challenge,
    ChallengeError,
    ChallengeIssuer,
    ChallengeVerifier,
    FileNonceStore,
    MemoryNonceStore,
    load_challenge_key,
)
from facefed.core.liveness.faces import default_face_finder, largest_face
from facefed.core.liveness.landmarks import measure_face

KEY = b"0123456789abcdef0123456789abcdef"


class FakeClock:
    """A settable clock (seconds since the epoch)."""

    def __init__(self, now: float = 1_750_000_000.123456) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def issuer(clock) -> ChallengeIssuer:
    return ChallengeIssuer(key=KEY, ttl_s=60, clock=clock)


@pytest.fixture()
def verifier(clock) -> ChallengeVerifier:
    return ChallengeVerifier(key=KEY, nonce_store=MemoryNonceStore(), clock=clock)


def performing(actions, action_frames) -> list[np.ndarray]:
    """A recording that starts neutral and shows each action, back to neutral."""
    frames = [action_frames["neutral"]]
    for action in actions:
        frames += [action_frames[Action(action).value], action_frames["neutral"]]
    return frames


def test_frames_move_the_measures_the_actions_need(action_frames):
    finder = default_face_finder()
    m = {k: measure_face(v, largest_face(finder, v)) for k, v in action_frames.items()}
    neutral = m["neutral"]
    assert m["blink"].ear < 0.6 * neutral.ear
    assert m["open_mouth"].mar > neutral.mar + 0.3
    # positive yaw = face towards the image's right = the subject's left
    assert m["turn_left"].yaw > neutral.yaw + 15
    assert m["turn_right"].yaw < neutral.yaw - 15
    # opening the mouth or closing the eyes must not read as a head turn
    assert abs(m["open_mouth"].yaw - neutral.yaw) < 5
    assert abs(m["blink"].yaw - neutral.yaw) < 5


def test_issued_challenges_are_random_distinct_and_signed(issuer, clock):
    drawn = [issuer.issue() for _ in range(30)]
    assert {len(c.actions) for c in drawn} == {2, 3}
    assert all(len(set(c.actions)) == len(c.actions) for c in drawn)
    assert len({c.nonce for c in drawn}) == 30
    assert len({c.actions for c in drawn}) > 5
    assert all(c.expires_at == pytest.approx(clock.now + 60, abs=1e-3) for c in drawn)
    assert all(len(c.signature) == 64 for c in drawn)


@pytest.mark.parametrize("count", [2, 3])
def test_performed_challenge_passes_with_per_action_reasons(
    issuer, verifier, action_frames, count
):
    challenge = issuer.issue(count)
    verdict = verifier.verify(challenge, performing(challenge.actions, action_frames))
    assert verdict.passed, verdict.reasons
    assert [o.action for o in verdict.outcomes] == list(challenge.actions)
    frames = [o.frame for o in verdict.outcomes]
    assert frames == sorted(frames) and all(o.passed for o in verdict.outcomes)


def test_every_action_is_recognised(issuer, verifier, action_frames, clock):
    for first, second in [
        (Action.BLINK, Action.OPEN_MOUTH),
        (Action.TURN_LEFT, Action.TURN_RIGHT),
        (Action.TURN_RIGHT, Action.BLINK),
    ]:
        challenge = _signed([first, second], clock)
        verdict = verifier.verify(challenge, performing([first, second], action_frames))
        assert verdict.passed, verdict.reasons


def _signed(actions, clock) -> Challenge:
    from facefed.core.liveness.challenge import sign

    unsigned = Challenge(
        nonce=f"test-{actions}-{clock.now}",
        actions=tuple(actions),
        issued_at=clock.now,
        expires_at=clock.now + 60,
    )
    return replace(unsigned, signature=sign(unsigned, KEY))


def test_replayed_challenge_fails(issuer, verifier, action_frames):
    challenge = issuer.issue(2)
    frames = performing(challenge.actions, action_frames)
    assert verifier.verify(challenge, frames).passed
    again = verifier.verify(challenge, frames)
    assert not again.passed
    assert again.reasons == ["The challenge was already answered (replayed nonce)."]


def test_expired_challenge_fails(issuer, verifier, action_frames, clock):
    challenge = issuer.issue(2)
    clock.now += 61
    verdict = verifier.verify(challenge, performing(challenge.actions, action_frames))
    assert not verdict.passed and "expired" in verdict.reasons[0]


def test_actions_in_the_wrong_order_fail(issuer, verifier, action_frames):
    challenge = issuer.issue(3)
    reversed_order = list(reversed(challenge.actions))
    verdict = verifier.verify(challenge, performing(reversed_order, action_frames))
    assert not verdict.passed
    failed = [o.action for o in verdict.outcomes if not o.passed]
    assert failed and all("not seen" in r for r in verdict.reasons)


def test_missing_action_is_named(verifier, action_frames, clock):
    challenge = _signed([Action.BLINK, Action.OPEN_MOUTH], clock)
    verdict = verifier.verify(challenge, performing([Action.BLINK], action_frames))
    assert not verdict.passed
    assert verdict.outcomes[0].passed and not verdict.outcomes[1].passed
    assert verdict.reasons[0].startswith("open_mouth not seen")


def test_a_still_photo_fails(issuer, verifier, action_frames):
    challenge = issuer.issue(2)
    verdict = verifier.verify(challenge, [action_frames["neutral"]] * 8)
    assert not verdict.passed and len(verdict.reasons) == 2


def test_closed_eyes_that_never_reopen_are_not_a_blink(verifier, action_frames, clock):
    challenge = _signed([Action.OPEN_MOUTH, Action.BLINK], clock)
    frames = [action_frames["neutral"], action_frames["open_mouth"]]
    frames += [action_frames["blink"]] * 3
    verdict = verifier.verify(challenge, frames)
    assert not verdict.passed and verdict.reasons[0].startswith("blink not seen")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.update(actions=list(reversed(d["actions"]))),
        lambda d: d.update(expires_at=d["expires_at"] + 3600),
        lambda d: d.update(nonce="chosen-by-the-client"),
        lambda d: d.update(signature="0" * 64),
    ],
)
def test_altered_challenge_fails_its_signature(issuer, verifier, action_frames, tamper):
    data = issuer.issue(2).to_dict()
    tamper(data)
    challenge = Challenge.from_dict(data)
    verdict = verifier.verify(challenge, performing(challenge.actions, action_frames))
    assert not verdict.passed and "signature" in verdict.reasons[0]


def test_challenge_signed_with_another_key_fails(clock, verifier, action_frames):
    other = ChallengeIssuer(key=b"another key of sixteen+ bytes", clock=clock)
    challenge = other.issue(2)
    verdict = verifier.verify(challenge, performing(challenge.actions, action_frames))
    assert not verdict.passed and "signature" in verdict.reasons[0]


def test_json_round_trip_keeps_the_signature_valid(issuer, verifier, action_frames):
    challenge = issuer.issue(3)
    restored = Challenge.from_dict(json.loads(json.dumps(challenge.to_dict())))
    assert restored == challenge
    assert verifier.verify(restored, performing(restored.actions, action_frames)).passed


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"version": 1},
        {"version": 9, "nonce": "x"},
        {
            "version": 1,
            "nonce": "n",
            "actions": ["jump"],
            "issued_at": 0,
            "expires_at": 1,
            "signature": "",
        },
    ],
)
def test_malformed_challenge_is_refused(data):
    with pytest.raises(ChallengeError):
        Challenge.from_dict(data)


def test_file_nonce_store_is_shared_between_verifiers(
    tmp_path, issuer, clock, action_frames
):
    store_path = tmp_path / "nonces.json"
    challenge = issuer.issue(2)
    frames = performing(challenge.actions, action_frames)
    first = ChallengeVerifier(
        key=KEY, nonce_store=FileNonceStore(store_path), clock=clock
    )
    second = ChallengeVerifier(
        key=KEY, nonce_store=FileNonceStore(store_path), clock=clock
    )
    assert first.verify(challenge, frames).passed
    assert not second.verify(challenge, frames).passed
    assert oct(store_path.stat().st_mode & 0o777) == "0o600"


def test_expired_nonces_are_forgotten(tmp_path):
    store = FileNonceStore(tmp_path / "nonces.json")
    assert store.consume("a", expires_at=100.0, now=50.0)
    assert not store.consume("a", expires_at=100.0, now=60.0)
    assert store.consume("b", expires_at=300.0, now=200.0)
    assert "a" not in json.loads((tmp_path / "nonces.json").read_text())


def test_short_keys_and_bad_counts_are_refused(issuer):
    with pytest.raises(ConfigurationError, match="16 bytes"):
        ChallengeIssuer(key=b"short")
    with pytest.raises(ConfigurationError, match="got 4"):
        issuer.issue(4)


def test_installation_key_is_created_once_with_private_mode(tmp_path, monkeypatch):
    key = load_challenge_key()
    assert len(key) == 32 and load_challenge_key() == key
    from facefed.core.settings import get_core_settings

    path = get_core_settings().home / "liveness" / "challenge.key"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_video_file_is_verified_like_a_folder(
    tmp_path, issuer, verifier, action_frames
):
    import cv2

    from facefed.core.liveness.faces import read_frames

    challenge = issuer.issue(2)
    frames = performing(challenge.actions, action_frames)
    path = tmp_path / "response.avi"
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (width, height)
    )
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    decoded = read_frames(path)
    assert len(decoded) == len(frames) and decoded[0].shape == frames[0].shape
    assert verifier.verify(challenge, decoded).passed


def test_unreadable_recordings_are_refused(tmp_path):
    from facefed.core.errors import ImageError
    from facefed.core.liveness.faces import read_frames

    with pytest.raises(ImageError, match="no video file or folder"):
        read_frames(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no image files"):
        read_frames(tmp_path / "empty")
    (tmp_path / "junk.avi").write_bytes(b"not a video")
    with pytest.raises(ImageError, match="No frame"):
        read_frames(tmp_path / "junk.avi")


def test_silent_check_runs_on_the_recording(issuer, clock, action_frames):
    from facefed.core.liveness import default_checker
    from facefed.core.liveness.silent import SilentConfig, SilentLivenessChecker

    challenge = issuer.issue(2)
    frames = performing(challenge.actions, action_frames)
    with_default = ChallengeVerifier(
        key=KEY, nonce_store=MemoryNonceStore(), clock=clock, silent=default_checker()
    )
    assert with_default.verify(challenge, frames).passed
    # The same recording under a threshold its frames cannot reach: every
    # action is still seen, and the silent check alone fails the response.
    strict = SilentLivenessChecker(SilentConfig(threshold=0.99))
    verifier = ChallengeVerifier(
        key=KEY, nonce_store=MemoryNonceStore(), clock=clock, silent=strict
    )
    verdict = verifier.verify(challenge, frames)
    assert not verdict.passed
    assert all(outcome.passed for outcome in verdict.outcomes)
    assert verdict.reasons[-1].startswith("The recording looks like a presentation")
