"""1:1 verification evaluation on a pairs protocol (LFW style), with an embedding cache.

Steps: read the pairs; detect, align and embed every distinct image once
(cached in an ``.npz`` keyed by path, modification time, model id and
detector); score each pair by cosine similarity; report k-fold accuracy, TAR
at fixed FAR, EER, and ROC/DET plots; optionally calibrate the model's
thresholds by target FMR.

Images where the detector finds no face are never dropped. They are counted,
listed, and embedded from a fallback chip: the face is assumed to sit where
faces sit in the other images of the same run (the median of the detected
landmarks, in relative image coordinates), which suits LFW's centred,
deep-funneled photos. Accuracy is reported on all pairs (fallback included,
the headline figure) and, separately, on the pairs whose two faces were both
detected.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from facefed.core.embedding import Embedder
from facefed.core.errors import ConfigurationError, FacefedError
from facefed.core.types import Face, FloatArray, ImageArray
from facefed.core.verification import (
    equal_error_rate,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
    threshold_at_fmr,
)

logger = logging.getLogger(__name__)

REPORT_FARS = (1e-2, 1e-3)
CACHE_VERSION = 2
_CHUNK = 64


@dataclass(frozen=True)
class Pair:
    """One verification pair of a protocol."""

    fold: int
    path1: str
    path2: str
    same: bool


@dataclass
class ImageEmbedding:
    """Embedding of one image and how it was obtained."""

    embedding: FloatArray
    detected: bool
    box: list[float] = field(default_factory=list)


def read_pairs(csv_path: Path) -> list[Pair]:
    """Read ``fold,path1,path2,same`` rows (the fold column is optional).

    Raises:
        ConfigurationError: The file is missing or malformed.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise ConfigurationError(
            f"Cannot read pairs file {csv_path}: {error}"
        ) from error
    pairs = []
    for number, row in enumerate(rows, start=2):
        try:
            pairs.append(
                Pair(
                    fold=int(row.get("fold") or 1),
                    path1=row["path1"],
                    path2=row["path2"],
                    same=int(row["same"]) == 1,
                )
            )
        except (KeyError, ValueError, TypeError) as error:
            raise ConfigurationError(
                f"Line {number} of {csv_path} is not fold,path1,path2,same: {row}."
            ) from error
    if not pairs:
        raise ConfigurationError(f"The pairs file {csv_path} has no pairs.")
    return pairs


def choose_face(faces: Sequence[Face], width: int, height: int) -> Face | None:
    """Pick the face nearest the image centre (larger first on a tie).

    Protocol images such as LFW's are centred on the person of interest;
    the closest face to the centre is that person even when others appear.
    """
    usable = [f for f in faces if f.landmarks is not None]
    if not usable:
        return None
    centre = np.array([width / 2.0, height / 2.0])

    def rank(face: Face) -> tuple[float, float]:
        middle = np.array(
            [(face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2]
        )
        distance = float(np.linalg.norm(middle - centre)) / max(width, height)
        return round(distance, 2), -face.width * face.height

    return min(usable, key=rank)


class EmbeddingCache:
    """Embeddings of images on disk, keyed by path, mtime, model and detector."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, tuple[FloatArray, bool, list[float]]] = {}
        self._landmarks: list[FloatArray] = []
        self._dirty = False
        if path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if int(data["version"]) not in (1, CACHE_VERSION):
                    return
                for key, emb, det, box in zip(
                    data["keys"],
                    data["embeddings"],
                    data["detected"],
                    data["boxes"],
                    strict=True,
                ):
                    self._entries[str(key)] = (emb, bool(det), box.tolist())
                if "landmarks" in data:  # version 1 files have none
                    self._landmarks = list(data["landmarks"])
        except (OSError, KeyError, ValueError) as error:
            logger.warning(
                "Ignoring unreadable embedding cache %s: %s", self.path, error
            )

    @staticmethod
    def key(image_path: Path, model_id: str, detector: str) -> str:
        """Return the cache key of an image for a model and detector."""
        stat = image_path.stat()
        parts = (
            image_path.resolve(),
            stat.st_mtime_ns,
            stat.st_size,
            model_id,
            detector,
        )
        text = "|".join(str(part) for part in parts)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> ImageEmbedding | None:
        """Return a cached embedding, if any."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        return ImageEmbedding(entry[0], entry[1], [v for v in entry[2] if v == v])

    def put(self, key: str, item: ImageEmbedding) -> None:
        """Store an embedding (written by ``save``)."""
        box = (item.box + [float("nan")] * 4)[:4]
        self._entries[key] = (item.embedding, item.detected, box)
        self._dirty = True

    def add_landmarks(self, relative: FloatArray) -> None:
        """Remember detected landmarks (relative to image size) for fallbacks."""
        self._landmarks.append(np.asarray(relative, np.float32))

    def landmarks(self) -> list[FloatArray]:
        """Every remembered relative landmark set."""
        return list(self._landmarks)

    def save(self) -> None:
        """Write the cache atomically if anything changed."""
        if not self._dirty or not self._entries:
            return
        keys = sorted(self._entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.stem}.tmp.npz")
        np.savez(
            temporary,
            version=np.array(CACHE_VERSION),
            keys=np.array(keys),
            embeddings=np.stack([self._entries[k][0] for k in keys]),
            detected=np.array([self._entries[k][1] for k in keys]),
            boxes=np.array([self._entries[k][2] for k in keys], dtype=np.float32),
            landmarks=np.array(self._landmarks, np.float32).reshape(-1, 5, 2),
        )
        temporary.replace(self.path)
        self._dirty = False


@dataclass
class _Missed:
    key: str
    path: Path
    image: ImageArray


Aligner = Callable[[ImageArray, npt.NDArray[np.float32]], ImageArray]


def aligner_for(embedder: Embedder) -> Aligner:
    """Return the alignment function the embedder's metadata asks for."""
    from facefed.core.align import align_arcface, align_dlib_chip

    meta = embedder.metadata
    if meta.alignment == "dlib_chip_150":
        return lambda image, points: align_dlib_chip(
            image, points, size=meta.input_size, padding=0.25
        )
    return lambda image, points: align_arcface(image, points, size=meta.input_size)


class ImageEmbedder:
    """Detect, align and embed protocol images, with fallback and cache."""

    def __init__(
        self,
        detector: Any,
        embedder: Embedder,
        *,
        detector_name: str,
        cache: EmbeddingCache | None,
    ) -> None:
        self.detector = detector
        self.embedder = embedder
        self.detector_name = detector_name
        self.cache = cache
        self._align = aligner_for(embedder)
        self._relative_landmarks: list[FloatArray] = []

    def embed_all(
        self, paths: Sequence[Path], progress: Callable[[int], None] | None = None
    ) -> dict[Path, ImageEmbedding]:
        """Embed every image; ``progress(n)`` is called as images complete.

        Images are processed in chunks so only chips stay in memory; images
        without a face wait for the fallback chip, placed by the median of the
        landmarks detected in the other images.
        """
        results: dict[Path, ImageEmbedding] = {}
        missed: list[_Missed] = []
        todo: list[tuple[str, Path]] = []
        meta = self.embedder.metadata
        # Flip augmentation changes the embeddings: it is part of the key.
        model_id = meta.model_id + ("+flip" if meta.test_time_flip else "")
        for path in paths:
            key = EmbeddingCache.key(path, model_id, self.detector_name)
            cached = self.cache.get(key) if self.cache else None
            if cached is not None:
                results[path] = cached
                if progress:
                    progress(1)
            else:
                todo.append((key, path))
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start : start + _CHUNK]
            missed += self._embed_detected(chunk, results)
            if self.cache and (start // _CHUNK) % 16 == 15:
                self.cache.save()  # keep work done if the run is interrupted
            if progress:
                progress(len(chunk))
        if missed:
            self._embed_missed(missed, results)
        if self.cache:
            self.cache.save()
        return results

    def _embed_detected(
        self, chunk: list[tuple[str, Path]], results: dict[Path, ImageEmbedding]
    ) -> list[_Missed]:
        from facefed.core.image import decode_image

        missed, chips, found = [], [], []
        for key, path in chunk:
            image = decode_image(path)
            face = choose_face(
                self.detector.detect(image), image.shape[1], image.shape[0]
            )
            if face is None or face.landmarks is None:
                missed.append(_Missed(key, path, image))
                continue
            size = np.array([image.shape[1], image.shape[0]], np.float32)
            relative = face.landmarks / size
            if self.cache:
                self.cache.add_landmarks(relative)
            else:
                self._relative_landmarks.append(relative)
            chips.append(self._align(image, face.landmarks))
            found.append((key, path, face.box.tolist()))
        if chips:
            embeddings = self.embedder.embed(np.stack(chips))
            for (key, path, box), embedding in zip(found, embeddings, strict=True):
                self._store(key, path, ImageEmbedding(embedding, True, box), results)
        return missed

    def _embed_missed(
        self, missed: list[_Missed], results: dict[Path, ImageEmbedding]
    ) -> None:
        relative = (
            self.cache.landmarks() if self.cache else list(self._relative_landmarks)
        )
        if not relative:
            raise FacefedError(
                "No face was detected in any image; cannot place a fallback chip."
            )
        fallback = np.median(np.stack(relative), axis=0).astype(np.float32)
        logger.info("No face found in %d images; using a fallback chip.", len(missed))
        chips = np.stack(
            [
                self._align(
                    m.image,
                    fallback
                    * np.array([m.image.shape[1], m.image.shape[0]], np.float32),
                )
                for m in missed
            ]
        )
        for item, embedding in zip(missed, self.embedder.embed(chips), strict=True):
            self._store(item.key, item.path, ImageEmbedding(embedding, False), results)

    def _store(
        self,
        key: str,
        path: Path,
        item: ImageEmbedding,
        results: dict[Path, ImageEmbedding],
    ) -> None:
        results[path] = item
        if self.cache:
            self.cache.put(key, item)


@dataclass
class VerificationReport:
    """Every metric of a scored pairs protocol (see ``build_report``)."""

    model_id: str
    detector: str
    pairs: int
    images: int
    no_face_images: list[str]
    pairs_with_fallback: int
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    accuracy_detected_only: float | None
    tar_at_far: dict[str, float]
    thresholds_at_fmr: dict[str, float]
    eer: float
    eer_threshold: float
    scores: FloatArray = field(repr=False)
    same: npt.NDArray[np.bool_] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """Return the report as JSON-ready values (no per-pair scores)."""
        return {
            "model_id": self.model_id,
            "detector": self.detector,
            "pairs": self.pairs,
            "images": self.images,
            "no_face_images": len(self.no_face_images),
            "no_face_image_paths": self.no_face_images,
            "pairs_with_fallback": self.pairs_with_fallback,
            "kfold_accuracy": self.accuracy,
            "kfold_accuracy_std": self.accuracy_std,
            "fold_accuracies": self.fold_accuracies,
            "fold_thresholds": self.fold_thresholds,
            "kfold_accuracy_detected_pairs_only": self.accuracy_detected_only,
            "tar_at_far": self.tar_at_far,
            "thresholds_at_fmr": self.thresholds_at_fmr,
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
        }


def score_pairs(
    pairs: Sequence[Pair], root: Path, embeddings: dict[Path, ImageEmbedding]
) -> FloatArray:
    """Cosine similarity of every pair (embeddings are unit length)."""
    return np.array(
        [
            float(
                embeddings[root / p.path1].embedding
                @ embeddings[root / p.path2].embedding
            )
            for p in pairs
        ],
        dtype=np.float32,
    )


def build_report(
    pairs: Sequence[Pair],
    root: Path,
    embeddings: dict[Path, ImageEmbedding],
    *,
    model_id: str,
    detector: str,
) -> VerificationReport:
    """Compute every metric of a scored protocol."""
    scores = score_pairs(pairs, root, embeddings)
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    both = np.array(
        [
            embeddings[root / p.path1].detected and embeddings[root / p.path2].detected
            for p in pairs
        ]
    )
    result = kfold_accuracy(scores, same, folds)
    detected_only = None
    if both.sum() and not both.all():
        detected_only = kfold_accuracy(scores[both], same[both], folds[both]).mean
    tars, thresholds = {}, {}
    for far in REPORT_FARS:
        tar, threshold = tar_at_far(scores, same, far)
        tars[f"{far:g}"] = tar
        thresholds[f"{far:g}"] = threshold
    eer, eer_threshold = equal_error_rate(scores, same)
    missed = sorted(
        str(path.relative_to(root)) for path, e in embeddings.items() if not e.detected
    )
    return VerificationReport(
        model_id=model_id,
        detector=detector,
        pairs=len(pairs),
        images=len(embeddings),
        no_face_images=missed,
        pairs_with_fallback=int((~both).sum()),
        accuracy=result.mean,
        accuracy_std=result.std,
        fold_accuracies=result.accuracies,
        fold_thresholds=result.thresholds,
        accuracy_detected_only=detected_only,
        tar_at_far=tars,
        thresholds_at_fmr=thresholds,
        eer=eer,
        eer_threshold=eer_threshold,
        scores=scores,
        same=same,
    )


def calibrated_thresholds(
    report: VerificationReport, fmrs: Sequence[float] = REPORT_FARS
) -> dict[str, float]:
    """Thresholds at each target FMR measured on the report's pairs.

    Raises:
        ConfigurationError: A target FMR is finer than the impostor pairs can
            measure (fewer than one expected false match).
    """
    from facefed.core.embedding import fmr_key

    impostors = int((~report.same).sum())
    thresholds = {}
    for fmr in fmrs:
        if fmr * impostors < 1:
            raise ConfigurationError(
                f"FMR {fmr:g} cannot be calibrated on {impostors} impostor pairs."
            )
        thresholds[fmr_key(fmr)] = threshold_at_fmr(report.scores, report.same, fmr)
    return thresholds


def save_plots(report: VerificationReport, folder: Path) -> list[Path]:
    """Save the ROC (TAR vs FAR, log scale) and DET (normal deviates) curves as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    folder.mkdir(parents=True, exist_ok=True)
    roc = roc_curve(report.scores, report.same)
    label = f"{report.model_id} + {report.detector}"
    paths = []

    figure, axes = plt.subplots(figsize=(5, 4))
    axes.semilogx(np.clip(roc.fmr, 1e-5, 1), roc.tmr, label=label)
    axes.set(
        xlabel="False accept rate (FAR)",
        ylabel="True accept rate (TAR)",
        title=f"ROC, {report.pairs} pairs",
        xlim=(1e-4, 1),
        ylim=(0.8, 1.0),
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=7)
    paths.append(folder / "roc.png")
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5, 4))
    eps = 1e-4
    axes.plot(
        norm.ppf(np.clip(roc.fmr, eps, 1 - eps)),
        norm.ppf(np.clip(roc.fnmr, eps, 1 - eps)),
        label=label,
    )
    ticks = [1e-3, 1e-2, 0.05, 0.2, 0.5]
    axes.set_xticks(norm.ppf(ticks), [f"{t:g}" for t in ticks])
    axes.set_yticks(norm.ppf(ticks), [f"{t:g}" for t in ticks])
    axes.set(
        xlabel="False match rate",
        ylabel="False non-match rate",
        title="DET (normal deviate scale)",
        xlim=norm.ppf([5e-4, 0.5]),
        ylim=norm.ppf([5e-4, 0.5]),
    )
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right", fontsize=7)
    paths.append(folder / "det.png")
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths
