"""Interactive liveness: signed random challenges and their verification on frames.

A challenge is a random sequence of 2-3 distinct actions with a nonce and an
expiry, signed with HMAC-SHA256 (RFC 2104) so a client cannot forge or alter
one. The verifier checks the signature, the expiry and that the nonce was
never used before (a used-nonce store makes every challenge single use), then
looks for the actions, in order, in a sequence of frames, using dlib's 68
landmarks: the eye aspect ratio for blinks (Soukupova and Cech, CVWW 2016), the
inner-lip aspect ratio for an open mouth, and the head yaw from `cv2.solvePnP`
for turns. "Left" and "right" are the subject's own, for an unmirrored camera.
"""

import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facefed.core.errors import ConfigurationError, FaceError, FacefedError
from facefed.core.liveness.faces import FaceFinder, default_face_finder, largest_face
from facefed.core.liveness.landmarks import FaceMeasures, measure_face
from facefed.core.liveness.settings import get_liveness_settings
from facefed.core.settings import get_core_settings
from facefed.core.types import Face, ImageArray, LivenessResult

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
CHALLENGE_VERSION = 1
MIN_KEY_BYTES = 16


class ChallengeError(FacefedError):
    """Raised when a challenge file cannot be read as a challenge."""


class Action(StrEnum):
    """What the person in front of the camera is asked to do."""

    BLINK = "blink"
    TURN_LEFT = "turn_left"
    TURN_RIGHT = "turn_right"
    OPEN_MOUTH = "open_mouth"


@dataclass(frozen=True)
class Challenge:
    """A signed challenge.

    Attributes:
        nonce: Random single-use identifier (`secrets.token_urlsafe(16)`).
        actions: The actions to perform, in order.
        issued_at: Unix time of issue.
        expires_at: Unix time after which the challenge is refused.
        signature: Hex HMAC-SHA256 of `signed_bytes()` under the issuer's key.
    """

    nonce: str
    actions: tuple[Action, ...]
    issued_at: float
    expires_at: float
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers (everything but itself)."""
        body = {
            "v": CHALLENGE_VERSION,
            "nonce": self.nonce,
            "actions": [a.value for a in self.actions],
            "issued_at": round(self.issued_at, 3),
            "expires_at": round(self.expires_at, 3),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_dict(self) -> dict[str, Any]:
        """The challenge as a JSON-ready dictionary."""
        return {
            "version": CHALLENGE_VERSION,
            "nonce": self.nonce,
            "actions": [a.value for a in self.actions],
            "issued_at": round(self.issued_at, 3),
            "expires_at": round(self.expires_at, 3),
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: object) -> "Challenge":
        """Rebuild a challenge from `to_dict()` output, checking its shape.

        Raises:
            ChallengeError: If a field is missing or has the wrong type.
        """
        if not isinstance(data, dict):
            raise ChallengeError("A challenge must be a JSON object.")
        try:
            if data["version"] != CHALLENGE_VERSION:
                raise ChallengeError(
                    f"Unsupported challenge version {data['version']!r}; "
                    f"expected {CHALLENGE_VERSION}."
                )
            actions = tuple(Action(a) for a in data["actions"])
            challenge = cls(
                nonce=str(data["nonce"]),
                actions=actions,
                issued_at=float(data["issued_at"]),
                expires_at=float(data["expires_at"]),
                signature=str(data["signature"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ChallengeError(f"The challenge is malformed: {error}.") from None
        if not (
            math.isfinite(challenge.issued_at) and math.isfinite(challenge.expires_at)
        ):
            raise ChallengeError("The challenge's times must be finite numbers.")
        return challenge


class SilentChecker(Protocol):
    """A silent liveness checker (see `silent.SilentLivenessChecker`)."""

    @property
    def threshold(self) -> float:
        """The decision threshold on the fused score."""
        ...

    def check(self, image: ImageArray, face: Face) -> LivenessResult:
        """Score one face."""
        ...


class NonceStore(Protocol):
    """Remembers used nonces until they expire."""

    def consume(self, nonce: str, *, expires_at: float, now: float) -> bool:
        """Record a nonce; return False if it had been recorded before."""
        ...


class MemoryNonceStore:
    """A used-nonce store in memory, for one process (the server, tests)."""

    def __init__(self) -> None:
        self._used: dict[str, float] = {}

    def consume(self, nonce: str, *, expires_at: float, now: float) -> bool:
        """Record a nonce; return False if it had been recorded before."""
        # Forget nonces past their expiry: the expiry check refuses them anyway.
        self._used = {n: e for n, e in self._used.items() if e >= now}
        if nonce in self._used:
            return False
        self._used[nonce] = expires_at
        return True


class FileNonceStore:
    """A used-nonce store in a JSON file, locked so processes can share it.

    The file is replaced atomically (written beside it, then renamed) under
    an exclusive lock on `<file>.lock`, so a crash mid-write cannot empty it.
    A store that cannot be read is refused, not reset: forgetting the used
    nonces would let every unexpired challenge be answered again.

    Args:
        path: The file; created (mode 0600) on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def consume(self, nonce: str, *, expires_at: float, now: float) -> bool:
        """Record a nonce; return False if it had been recorded before.

        Raises:
            ConfigurationError: The store cannot be read, parsed or written.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise self._error(error) from None
        with os.fdopen(lock, "r+") as lock_handle:
            fcntl.flock(lock_handle, fcntl.LOCK_EX)
            used = {n: e for n, e in self._read().items() if e >= now}
            fresh = nonce not in used
            used[nonce] = max(expires_at, used.get(nonce, 0.0))
            self._write(used)
        return fresh

    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _error(self, error: Exception) -> ConfigurationError:
        return ConfigurationError(
            f"The used-nonce store {self.path} cannot be used ({error}); no "
            "challenge can be verified until it is repaired. Deleting it would "
            "let unexpired challenges be answered again."
        )

    def _read(self) -> dict[str, float]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            raise self._error(error) from None
        if not text.strip():
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object of nonces")
            return {str(k): float(v) for k, v in data.items()}
        except (ValueError, TypeError, RecursionError, OverflowError) as error:
            raise self._error(error) from None

    def _write(self, used: dict[str, float]) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                json.dump(used, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, self.path)
        except OSError as error:
            raise self._error(error) from None


def _check_key(key: bytes) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"The challenge key must have at least {MIN_KEY_BYTES} bytes, "
            f"got {len(key)}."
        )
    return key


def sign(challenge: Challenge, key: bytes) -> str:
    """Return the hex HMAC-SHA256 of a challenge's canonical bytes."""
    return hmac.new(key, challenge.signed_bytes(), hashlib.sha256).hexdigest()


class ChallengeIssuer:
    """Issues signed random challenges.

    Args:
        key: HMAC key shared with the verifier (at least 16 bytes).
        ttl_s: Seconds a challenge stays valid.
        clock: Returns the current Unix time; injectable for tests.
    """

    def __init__(self, *, key: bytes, ttl_s: float = 120.0, clock: Clock = time.time):
        if ttl_s <= 0:
            raise ConfigurationError(
                f"The challenge lifetime must be > 0, got {ttl_s}."
            )
        self._key = _check_key(key)
        self.ttl_s = ttl_s
        self._clock = clock

    def issue(self, n_actions: int | None = None) -> Challenge:
        """Draw 2 or 3 distinct actions in random order and sign them.

        Args:
            n_actions: How many actions (2 or 3); drawn at random when None.

        Returns:
            The signed challenge.

        Raises:
            ConfigurationError: If `n_actions` is not 2 or 3.
        """
        draw = secrets.SystemRandom()
        count = n_actions if n_actions is not None else draw.choice((2, 3))
        if count not in (2, 3):
            raise ConfigurationError(f"A challenge has 2 or 3 actions, got {count}.")
        actions = tuple(draw.sample(list(Action), count))
        # Times are kept to the millisecond the wire format carries, so a
        # challenge read back from JSON equals the one issued.
        now = round(self._clock(), 3)
        unsigned = Challenge(
            nonce=secrets.token_urlsafe(16),
            actions=actions,
            issued_at=now,
            expires_at=round(now + self.ttl_s, 3),
        )
        challenge = replace(unsigned, signature=sign(unsigned, self._key))
        logger.info("Issued a liveness challenge of %d actions", count)
        return challenge


@dataclass(frozen=True)
class ActionThresholds:
    """When a frame counts as showing an action.

    Attributes:
        eye_closed_abs: EAR below which eyes are closed whatever the person's
            open-eye EAR (Soukupova and Cech use about 0.2).
        eye_closed_ratio: Eyes are also closed below this fraction of the
            person's open-eye EAR (median over the frames).
        mouth_open_abs: MAR at or above which the mouth is open.
        mouth_open_gain: ... provided it is also this much above the median MAR.
        turn_deg: Yaw change from the first frame that counts as a turn.
        min_face_fraction: Share of frames that must show a face.
    """

    eye_closed_abs: float = 0.21
    eye_closed_ratio: float = 0.7
    mouth_open_abs: float = 0.35
    mouth_open_gain: float = 0.2
    turn_deg: float = 15.0
    min_face_fraction: float = 0.5


@dataclass(frozen=True)
class ActionOutcome:
    """Whether one action was seen.

    Attributes:
        action: The action.
        passed: True when seen, in order.
        frame: Index of the frame that showed it, or -1.
        reason: A sentence saying what was or was not seen.
    """

    action: Action
    passed: bool
    frame: int
    reason: str


@dataclass(frozen=True)
class ChallengeVerdict:
    """The answer to a challenge response.

    Attributes:
        passed: True when the challenge was valid and every action was seen in
            order.
        reasons: Sentences explaining a failure; empty on success.
        outcomes: Per-action outcomes (empty when the challenge itself was
            refused before looking at the frames).
    """

    passed: bool
    reasons: list[str] = field(default_factory=list)
    outcomes: list[ActionOutcome] = field(default_factory=list)


class ChallengeVerifier:
    """Checks a challenge and looks for its actions in a frame sequence.

    Args:
        key: The issuer's HMAC key.
        nonce_store: Where used nonces are remembered.
        clock: Returns the current Unix time; injectable for tests.
        finder: Face detector; the configured default when None.
        thresholds: Action thresholds.
        silent: A silent checker also run on up to `silent_frames` frames
            spread over the recording; the response fails when their median
            score is under the checker's threshold (a recording shown on a
            screen). None skips this check.
        silent_frames: How many frames the silent checker sees.
    """

    def __init__(
        self,
        *,
        key: bytes,
        nonce_store: NonceStore,
        clock: Clock = time.time,
        finder: FaceFinder | None = None,
        thresholds: ActionThresholds | None = None,
        silent: SilentChecker | None = None,
        silent_frames: int = 8,
    ) -> None:
        self._key = _check_key(key)
        self._store = nonce_store
        self._clock = clock
        self._finder = finder
        self.thresholds = thresholds or ActionThresholds()
        self._silent = silent
        self._silent_frames = max(1, silent_frames)

    def verify(
        self, challenge: Challenge, frames: Iterable[ImageArray]
    ) -> ChallengeVerdict:
        """Answer pass or fail for a challenge and the frames recorded for it.

        The nonce is consumed before the frames are looked at, so a challenge
        can be answered once, whatever the outcome.

        Args:
            challenge: The challenge as issued.
            frames: RGB frames in recording order.

        Returns:
            The verdict with per-action reasons.
        """
        refusal = self._refusal(challenge)
        if refusal:
            logger.info("Liveness challenge refused: %s", refusal)
            return ChallengeVerdict(passed=False, reasons=[refusal])
        recording = list(frames)
        measures = self._measure(recording)
        verdict = self._match_actions(challenge.actions, measures)
        silent_reason = self._silent_refusal(recording, measures)
        if silent_reason:
            verdict = ChallengeVerdict(
                passed=False,
                reasons=[*verdict.reasons, silent_reason],
                outcomes=verdict.outcomes,
            )
        logger.info("Liveness challenge %s", "passed" if verdict.passed else "failed")
        return verdict

    def _silent_refusal(
        self, recording: list[ImageArray], measures: list[FaceMeasures | None]
    ) -> str:
        if self._silent is None:
            return ""
        with_face = [i for i, m in enumerate(measures) if m is not None]
        if not with_face:
            return ""
        picks = np.linspace(0, len(with_face) - 1, self._silent_frames)
        finder = self._finder or default_face_finder()
        scores = []
        for index in sorted({with_face[round(p)] for p in picks}):
            frame = recording[index]
            scores.append(self._silent.check(frame, largest_face(finder, frame)).score)
        median = float(np.median(scores))
        if median >= self._silent.threshold:
            return ""
        return (
            "The recording looks like a presentation attack: median silent "
            f"liveness score {median:.2f} over {len(scores)} frames is below "
            f"{self._silent.threshold:.2f}."
        )

    def _refusal(self, challenge: Challenge) -> str:
        expected = sign(challenge, self._key).encode()
        # Compared as bytes: compare_digest refuses non-ASCII text, and a
        # forged signature may hold anything.
        given = challenge.signature.encode("utf-8", "replace")
        if not hmac.compare_digest(expected, given):
            return "The challenge's signature is not valid (forged or altered)."
        if len(challenge.actions) not in (2, 3) or len(set(challenge.actions)) != len(
            challenge.actions
        ):
            return "The challenge does not hold 2 or 3 distinct actions."
        now = self._clock()
        if now > challenge.expires_at:
            return f"The challenge expired {now - challenge.expires_at:.0f} s ago."
        if now < challenge.issued_at - 5:
            return "The challenge was issued in the future (clock mismatch)."
        if not self._store.consume(
            challenge.nonce, expires_at=challenge.expires_at, now=now
        ):
            return "The challenge was already answered (replayed nonce)."
        return ""

    def _measure(self, frames: Iterable[ImageArray]) -> list[FaceMeasures | None]:
        finder = self._finder or default_face_finder()
        measures: list[FaceMeasures | None] = []
        for frame in frames:
            try:
                measures.append(measure_face(frame, largest_face(finder, frame)))
            except FaceError:
                measures.append(None)
        return measures

    def _match_actions(
        self, actions: Sequence[Action], measures: list[FaceMeasures | None]
    ) -> ChallengeVerdict:
        seen = [(i, m) for i, m in enumerate(measures) if m is not None]
        limits = self.thresholds
        if not measures or len(seen) < limits.min_face_fraction * len(measures):
            return ChallengeVerdict(
                passed=False,
                reasons=[
                    f"A face was found in {len(seen)} of {len(measures)} frames; at "
                    f"least {limits.min_face_fraction:.0%} are needed."
                ],
            )
        reference = _Reference.of([m for _, m in seen])
        outcomes = []
        cursor = -1
        for action in actions:
            frame = _first_frame(action, seen, reference, limits, after=cursor)
            if frame < 0:
                outcomes.append(
                    ActionOutcome(action, False, -1, _missing(action, cursor, limits))
                )
                continue
            outcomes.append(
                ActionOutcome(
                    action, True, frame, f"{action.value} seen in frame {frame}."
                )
            )
            cursor = frame
        reasons = [o.reason for o in outcomes if not o.passed]
        return ChallengeVerdict(passed=not reasons, reasons=reasons, outcomes=outcomes)


@dataclass(frozen=True)
class _Reference:
    ear: float
    mar: float
    yaw: float

    @classmethod
    def of(cls, measures: list[FaceMeasures]) -> "_Reference":
        yaws = [m.yaw for m in measures if not math.isnan(m.yaw)]
        return cls(
            ear=float(np.median([m.ear for m in measures])),
            mar=float(np.median([m.mar for m in measures])),
            # Turns are measured from the pose the recording starts in.
            yaw=yaws[0] if yaws else math.nan,
        )


def _shows(
    action: Action, m: FaceMeasures, ref: _Reference, limits: ActionThresholds
) -> bool:
    if action is Action.BLINK:
        return m.ear < min(limits.eye_closed_abs, limits.eye_closed_ratio * ref.ear)
    if action is Action.OPEN_MOUTH:
        return m.mar >= max(limits.mouth_open_abs, ref.mar + limits.mouth_open_gain)
    change = m.yaw - ref.yaw
    if math.isnan(change):
        return False
    # Positive yaw: the face points to the image's right, the subject's left.
    if action is Action.TURN_LEFT:
        return change >= limits.turn_deg
    return change <= -limits.turn_deg


def _first_frame(
    action: Action,
    seen: list[tuple[int, FaceMeasures]],
    ref: _Reference,
    limits: ActionThresholds,
    *,
    after: int,
) -> int:
    for position, (index, measure) in enumerate(seen):
        if index <= after or not _shows(action, measure, ref, limits):
            continue
        if action is Action.BLINK and not any(
            not _shows(action, later, ref, limits) for _, later in seen[position + 1 :]
        ):
            continue  # closed eyes that never reopen are not a blink
        return index
    return -1


def _missing(action: Action, after: int, limits: ActionThresholds) -> str:
    where = "" if after < 0 else f"after frame {after} "
    what = {
        Action.BLINK: "closed eyes followed by open eyes "
        f"(eye aspect ratio below {limits.eye_closed_abs})",
        Action.OPEN_MOUTH: "an open mouth "
        f"(mouth aspect ratio of at least {limits.mouth_open_abs})",
        Action.TURN_LEFT: f"a turn to the subject's left of {limits.turn_deg:.0f}°",
        Action.TURN_RIGHT: f"a turn to the subject's right of {limits.turn_deg:.0f}°",
    }[action]
    return f"{action.value} not seen: no frame {where}shows {what}."


def load_challenge_key() -> bytes:
    """Return the challenge signing key of this installation.

    `FACEFED_LIVENESS_CHALLENGE_KEY` wins; otherwise a random 32-byte key is
    kept in `home/liveness/challenge.key`, created with mode 0600 on first use.
    """
    settings = get_liveness_settings()
    if settings.challenge_key is not None:
        return _check_key(settings.challenge_key.get_secret_value().encode())
    path = get_core_settings().home / "liveness" / "challenge.key"
    try:
        if not path.exists() and not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
            logger.info("Created a new liveness challenge key in %s", path.parent)
        key = path.read_bytes()
    except OSError as error:
        raise ConfigurationError(
            f"Cannot read or create the challenge key {path}: "
            f"{error.strerror or error}."
        ) from None
    return _check_key(key)


def default_nonce_store() -> FileNonceStore:
    """The used-nonce file of this installation (see `LivenessSettings`)."""
    settings = get_liveness_settings()
    path = settings.nonce_store or (
        get_core_settings().home / "liveness" / "used_nonces.json"
    )
    return FileNonceStore(path)
