"""Silent (passive) liveness: MiniFASNet V2 + V1SE fused with weight-free cues."""

import logging
from dataclasses import dataclass, field

import numpy as np

from facefed.core.errors import ConfigurationError
from facefed.core.liveness import require_live
from facefed.core.liveness.minifasnet import MiniFASNet, load_minifasnets
from facefed.core.liveness.settings import ExecutionMode, get_liveness_settings
from facefed.core.liveness.texture import TextureConfig, measure_texture
from facefed.core.types import Face, ImageArray, LivenessResult

logger = logging.getLogger(__name__)

# Fused-score threshold chosen by `facefed eval liveness --calibrate` on the
# shared anti-spoofing set (85 webcam crops of one subject and the 3
# Silent-Face frames): the lowest BPCER among thresholds with APCER <= 5 % for
# every attack type (there: APCER 4.8 %, BPCER 4.5 %). See README, section
# liveness, for the numbers and the caveats of so small a set.
CALIBRATED_THRESHOLD = 0.228

# Silent-Face's crops were made from the boxes of its RetinaFace detector,
# trained on WIDER FACE. YuNet's boxes match WIDER FACE annotations to within
# 2 % in width and height (median over the 36 faces of at least 16 px in the
# shared WIDER val images), so no rescaling of our boxes is needed; the factor
# stays a setting so another detector can be adapted.
DEFAULT_BOX_SCALE = 1.0

# Scores are floored before logarithms and powers so a zero cannot give NaN.
_FLOOR = 1e-6


@dataclass(frozen=True)
class SilentConfig:
    """How the silent checker fuses its cues and decides.

    Attributes:
        threshold: Fused score at or above which a face is live.
        network_weight: Exponent of the MiniFASNet score (geometric mean of
            the live probabilities of V2 and V1SE) in the fused score.
        texture_weight: Exponent of the weight-free texture score.
        cue_threshold: A cue below this adds a sentence to the reasons.
        box_scale: Factor applied to detector boxes before the context crops.
        texture: Settings of the weight-free cues.
    """

    threshold: float = CALIBRATED_THRESHOLD
    network_weight: float = 0.75
    texture_weight: float = 0.25
    cue_threshold: float = 0.5
    box_scale: float = DEFAULT_BOX_SCALE
    texture: TextureConfig = field(default_factory=TextureConfig)

    def __post_init__(self) -> None:
        """Reject weights and thresholds that cannot give a score in [0, 1]."""
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigurationError(
                f"The liveness threshold must be in [0, 1], got {self.threshold}."
            )
        weights = (self.network_weight, self.texture_weight)
        if min(weights) < 0 or not np.isclose(sum(weights), 1.0):
            raise ConfigurationError(
                "The liveness cue weights must be non-negative and sum to 1, got "
                f"network={self.network_weight}, texture={self.texture_weight}."
            )
        if not 0.5 <= self.box_scale <= 2.0:
            raise ConfigurationError(
                f"The liveness box scale must be in [0.5, 2], got {self.box_scale}."
            )


def _scaled(face: Face, factor: float) -> Face:
    if factor == 1.0:
        return face
    x1, y1, x2, y2 = (float(v) for v in face.box[:4])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) * factor / 2, (y2 - y1) * factor / 2
    box = np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h], np.float32)
    return Face(box=box, score=face.score, landmarks=face.landmarks)


class SilentLivenessChecker:
    """Passive presentation attack detection on a single image.

    The fused score is the weighted geometric mean
    `network ** network_weight * texture ** texture_weight`, where `network` is
    the geometric mean of the live probabilities of MiniFASNetV2 and V1SE and
    `texture` the weaker of the chroma and moire scores. A geometric mean lets
    any one cue that is sure of an attack veto the others (a product rule, as
    in score-level fusion of independent detectors), whereas an arithmetic mean
    let a confident but wrong cue outvote a sure one; on the shared set it gave
    the lower equal-error rate (see README). Every cue is reported in
    `LivenessResult.cues`, and each cue under `cue_threshold` explains itself in
    `LivenessResult.reasons` when the face is refused.

    Args:
        config: Fusion and decision settings; the calibrated defaults when None.
        device: Where the networks run; the `FACEFED_LIVENESS_DEVICE` setting
            when None.
    """

    def __init__(
        self,
        config: SilentConfig | None = None,
        *,
        device: ExecutionMode | None = None,
    ) -> None:
        settings = get_liveness_settings()
        if config is None:
            threshold = settings.threshold
            config = SilentConfig(
                threshold=CALIBRATED_THRESHOLD if threshold is None else threshold
            )
        self.config = config
        self.networks: list[MiniFASNet] = load_minifasnets(device or settings.device)

    @property
    def threshold(self) -> float:
        """The decision threshold on the fused score."""
        return self.config.threshold

    def check(self, image: ImageArray, face: Face) -> LivenessResult:
        """Decide whether one detected face is a live person.

        Args:
            image: RGB uint8 image the face was detected in.
            face: The face, with its box in the image's pixels.

        Returns:
            The decision, fused score, per-cue scores and refusal reasons.
        """
        face = _scaled(face, self.config.box_scale)

        # Step 1: the two networks, each on its own context crop.
        cues: dict[str, float] = {}
        for network in self.networks:
            crop = network.crop(image, face.box)
            cues[network.spec.name] = float(network.live_probability(crop[None])[0])
        probabilities = [max(cues[n.spec.name], _FLOOR) for n in self.networks]
        network_score = float(np.exp(np.mean(np.log(probabilities))))
        cues["network"] = network_score

        # Step 2: the weight-free cues on the face region itself.
        texture = measure_texture(image, face.box, self.config.texture)
        cues.update(
            chroma=texture.chroma_score,
            moire=texture.moire_score,
            texture=texture.score,
            chroma_spread=texture.chroma,
            moire_peak=texture.moire,
        )

        # Step 3: fuse and decide.
        score = max(network_score, _FLOOR) ** self.config.network_weight * max(
            texture.score, _FLOOR
        ) ** (self.config.texture_weight)
        is_live = score >= self.config.threshold
        reasons = [] if is_live else self._reasons(score, cues)
        logger.debug("Liveness score %.3f (network %.3f)", score, network_score)
        return LivenessResult(
            is_live=is_live,
            score=float(score),
            threshold=self.config.threshold,
            reasons=reasons,
            cues=cues,
        )

    def _reasons(self, score: float, cues: dict[str, float]) -> list[str]:
        limit = self.config.cue_threshold
        reasons = [
            f"The fused liveness score {score:.2f} is below the threshold "
            f"{self.config.threshold:.2f}."
        ]
        if cues["network"] < limit:
            reasons.append(
                "The anti-spoofing networks see a presentation attack (live "
                f"probability {cues['network']:.2f} from MiniFASNetV2 "
                f"{cues['minifasnet_v2']:.2f} and MiniFASNetV1SE "
                f"{cues['minifasnet_v1se']:.2f})."
            )
        if cues["chroma"] < limit:
            reasons.append(
                f"The face's colours spread like a recaptured image (chroma spread "
                f"{cues['chroma_spread']:.1f}, live score {cues['chroma']:.2f})."
            )
        if cues["moire"] < limit:
            reasons.append(
                f"The face shows a periodic moire pattern typical of a screen "
                f"(spectral peak {cues['moire_peak']:.1f}, live score "
                f"{cues['moire']:.2f})."
            )
        return reasons


__all__ = ["SilentConfig", "SilentLivenessChecker", "require_live"]
