"""FacePipeline control flow on real photos, and with the real default parts."""

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefed.core.detection.yunet import YuNetDetector
from facefed.core.errors import ModelError, NoFaceError, QualityError, SpoofError
from facefed.core.image import decode_image
from facefed.core.pipeline import FacePipeline
from facefed.core.quality import QualityGate


@dataclass(frozen=True)
class _Metadata:
    alignment: str
    input_size: int


class MeanColourEmbedder:
    """Test-only embedder: the chip's mean colour per quadrant, unit length.

    Deterministic and cheap, it lets these tests check the pipeline's own
    control flow; the real embedder is tested below and in tests/models.
    """

    def __init__(self, alignment: str = "dlib_chip_150", size: int = 150) -> None:
        self.metadata = _Metadata(alignment, size)
        self.seen: list[np.ndarray] = []

    def embed(self, chips: np.ndarray) -> np.ndarray:
        self.seen.append(chips)
        h, w = chips.shape[1:3]
        quads = [
            chips[:, : h // 2, : w // 2],
            chips[:, : h // 2, w // 2 :],
            chips[:, h // 2 :, : w // 2],
            chips[:, h // 2 :, w // 2 :],
        ]
        vectors = np.concatenate([q.mean(axis=(1, 2)) for q in quads], axis=1) + 1.0
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(
            np.float32
        )


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


@pytest.fixture
def group(test_data: Path) -> np.ndarray:
    return decode_image(test_data / "detection" / "facenet_pytorch_multiface.jpg")


@pytest.fixture
def portrait(test_data: Path) -> np.ndarray:
    return decode_image(test_data / "lfw" / "Ann_Veneman" / "Ann_Veneman_0001.jpg")


def test_embed_one_takes_the_largest_face(detector, group) -> None:
    embedder = MeanColourEmbedder()
    pipeline = FacePipeline(detector, embedder)
    faces = detector.detect(group)
    largest = max(faces, key=lambda f: f.width * f.height)
    assert largest is not faces[0] or len(faces) == 1  # not simply the top score
    analysis = pipeline.embed_one(group)
    np.testing.assert_array_equal(analysis.face.box, largest.box)
    assert analysis.chip is not None and analysis.chip.shape == (150, 150, 3)
    assert analysis.embedding is not None
    assert np.linalg.norm(analysis.embedding) == pytest.approx(1.0, abs=1e-5)
    assert analysis.quality is None and analysis.liveness is None


def test_alignment_follows_the_embedder(detector, portrait) -> None:
    arcface = FacePipeline(detector, MeanColourEmbedder("arcface_112", 112))
    assert arcface.embed_one(portrait).chip.shape == (112, 112, 3)
    with pytest.raises(ModelError, match="alignment"):
        FacePipeline(detector, MeanColourEmbedder("mtcnn_160", 160))


def test_analyse_embeds_every_face_in_one_batch(detector, group) -> None:
    embedder = MeanColourEmbedder()
    pipeline = FacePipeline(detector, embedder, quality_gate=QualityGate())
    analyses = pipeline.analyse(group)
    assert len(analyses) == 6
    assert len(embedder.seen) == 1 and embedder.seen[0].shape == (6, 150, 150, 3)
    for analysis in analyses:
        assert analysis.quality is not None
        assert analysis.embedding is not None and analysis.chip is not None
    # Different faces give different chips.
    assert len({a.embedding.tobytes() for a in analyses}) == 6


def test_no_face(detector) -> None:
    pipeline = FacePipeline(detector, MeanColourEmbedder())
    with pytest.raises(NoFaceError):
        pipeline.embed_one(np.full((200, 200, 3), 90, np.uint8))
    assert pipeline.analyse(np.full((200, 200, 3), 90, np.uint8)) == []


def test_quality_refusal_carries_reasons(detector, portrait) -> None:
    embedder = MeanColourEmbedder()
    pipeline = FacePipeline(detector, embedder, quality_gate=QualityGate())
    blurred = cv2.GaussianBlur(portrait, (0, 0), 3)
    with pytest.raises(QualityError) as refused:
        pipeline.embed_one(blurred)
    assert any("blurred" in reason for reason in refused.value.reasons)
    assert embedder.seen == []  # nothing was embedded


@pytest.fixture(scope="module")
def liveness_checker():
    silent = pytest.importorskip("facefed.core.liveness.silent")
    return silent.SilentLivenessChecker()


@pytest.mark.slow
def test_spoof_is_refused_and_live_passes(
    detector, liveness_checker, test_data
) -> None:
    pipeline = FacePipeline(
        detector,
        MeanColourEmbedder(),
        quality_gate=QualityGate(),
        liveness=liveness_checker,
    )
    live = decode_image(test_data / "antispoof" / "image_T1.jpg")
    spoof = decode_image(test_data / "antispoof" / "image_F1.jpg")
    analysis = pipeline.embed_one(live)
    assert analysis.liveness is not None and analysis.liveness.is_live
    with pytest.raises(SpoofError) as refused:
        pipeline.embed_one(spoof)
    assert refused.value.reasons
    # Trusted sources may skip the check.
    assert pipeline.embed_one(spoof, check_liveness=False).liveness is None


@pytest.fixture(scope="module")
def default_embedder():
    zoo = pytest.importorskip("facefed.models.zoo")
    return zoo.load_default_embedder()


@pytest.mark.slow
def test_real_default_embedder_separates_people(
    detector, default_embedder, test_data
) -> None:
    pipeline = FacePipeline(detector, default_embedder, quality_gate=QualityGate())
    folder = test_data / "lfw"
    people = ["Ann_Veneman", "Arnold_Palmer", "Boris_Becker"]
    vectors = {
        (name, i): pipeline.embed_one(
            decode_image(folder / name / f"{name}_000{i}.jpg")
        ).embedding
        for name in people
        for i in (1, 2)
    }
    for vector in vectors.values():
        assert vector.shape == (128,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    same = [float(vectors[(n, 1)] @ vectors[(n, 2)]) for n in people]
    different = [
        float(vectors[(a, 1)] @ vectors[(b, 2)])
        for a in people
        for b in people
        if a != b
    ]
    assert min(same) > max(different)
