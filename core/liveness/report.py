"""`facefed eval liveness`: score a labelled set several ways and report PAD errors."""

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facefed.core.errors import FaceError, ImageError
from facefed.core.liveness.evaluation import (
    CropMode,
    PadSample,
    ScoredSample,
    calibrate_threshold,
    det_points,
    equal_error_rate,
    error_rates,
    pearson,
    plot_det,
    split_scores,
)
from facefed.core.liveness.faces import (
    FaceFinder,
    largest_face,
    read_rgb,
    whole_image_face,
)
from facefed.core.liveness.silent import SilentLivenessChecker
from facefed.core.types import Face, ImageArray

logger = logging.getLogger(__name__)

# Crops are resampled to this many pixels (keeping their aspect ratio) for the
# size-bias check: the shared set's live crops are about 2.7 times larger than
# its spoof crops.
COMMON_CROP_AREA = 120 * 150

CAVEAT = (
    "The shared anti-spoofing set is small and biased: the 85 crops show one "
    "subject (plus a few frames of a second person among the spoofs) from one "
    "webcam, a single attack species (video replay), and the live crops are "
    "larger than the spoof crops, so image size alone separates the classes; "
    "the 3 Silent-Face frames are the only full frames. The threshold was "
    "calibrated on this same set. Treat every figure as a smoke test, not an "
    "accuracy claim."
)

CUES = ("minifasnet_v2", "minifasnet_v1se", "network", "chroma", "moire", "texture")


def _rescaled(image: ImageArray, area: int) -> ImageArray:
    height, width = image.shape[:2]
    factor = math.sqrt(area / (height * width))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interpolation)


def score_samples(
    checker: SilentLivenessChecker,
    samples: Sequence[PadSample],
    *,
    finder: FaceFinder,
    crop_mode: CropMode,
    rescale_crops: bool = False,
    progress: Callable[[], None] | None = None,
) -> list[ScoredSample]:
    """Run the checker on every sample.

    Frames always go through the detector. Crops use the whole image as the
    face box (`whole`) or the detector run inside the crop (`detect`; a crop
    where it finds nothing falls back to the whole image and is counted).

    Args:
        checker: The silent checker.
        samples: Labelled presentations.
        finder: The face detector.
        crop_mode: How crops get their face box.
        rescale_crops: Resample every crop to COMMON_CROP_AREA pixels first.
        progress: Called once per sample.

    Returns:
        One scored sample per input; unreadable ones carry an error and NaN.
    """
    scored = []
    for sample in samples:
        try:
            image = read_rgb(sample.path)
            area = int(image.shape[0] * image.shape[1])
            if sample.kind == "crop" and rescale_crops:
                image = _rescaled(image, COMMON_CROP_AREA)
            face, note = _face_for(image, sample, finder, crop_mode)
            result = checker.check(image, face)
            scored.append(
                ScoredSample(sample, result.score, dict(result.cues), area, note)
            )
        except (ImageError, FaceError) as error:
            scored.append(ScoredSample(sample, math.nan, {}, 0, str(error)))
        if progress is not None:
            progress()
    return scored


def _face_for(
    image: ImageArray, sample: PadSample, finder: FaceFinder, crop_mode: CropMode
) -> tuple[Face, str]:
    if sample.kind == "frame":
        return largest_face(finder, image), ""
    if crop_mode == "whole":
        return whole_image_face(image), ""
    faces = finder.detect(image)
    if not faces:
        return whole_image_face(image), "no face detected inside the crop"
    return max(faces, key=lambda face: face.width * face.height), ""


def summarise(scored: Sequence[ScoredSample], threshold: float) -> dict[str, Any]:
    """Error rates, EER per cue and the size-bias check of one scored set."""
    live, attacks = split_scores(scored)
    rates = error_rates(live, attacks, threshold)
    eer, eer_threshold = equal_error_rate(live, attacks)
    per_cue = {}
    for cue in CUES:
        cue_live, cue_attacks = split_scores(scored, cue)
        if cue_live and cue_attacks:
            per_cue[cue] = round(equal_error_rate(cue_live, cue_attacks)[0], 4)
    size_bias = {}
    for label, is_live in (("live", True), ("spoof", False)):
        items = [s for s in scored if s.sample.live is is_live and s.area]
        size_bias[label] = pearson([s.score for s in items], [s.area for s in items])
    # How well image size alone would separate the classes (the shared set's
    # bias): the EER of the pixel count used as a score.
    area_live = [float(s.area) for s in scored if s.sample.live and s.area]
    area_attacks: dict[str, list[float]] = {}
    for s in scored:
        if not s.sample.live and s.area:
            area_attacks.setdefault(s.sample.attack_type, []).append(float(s.area))
    area_eer = (
        equal_error_rate(area_live, area_attacks)[0]
        if area_live and area_attacks
        else math.nan
    )
    return {
        # BPCER20 and BPCER10 of ISO/IEC 30107-3: the lowest BPCER at a
        # threshold where the worst species' APCER is at most 5 % / 10 %.
        "bpcer20": calibrate_threshold(live, attacks, max_apcer=0.05).bpcer,
        "bpcer10": calibrate_threshold(live, attacks, max_apcer=0.10).bpcer,
        "eer_of_image_area_alone": area_eer,
        "rates": asdict(rates),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "eer_by_cue": per_cue,
        "score_area_correlation": size_bias,
        "unscored": [str(s.sample.path) for s in scored if math.isnan(s.score)],
        "notes": sorted({s.error for s in scored if s.error}),
    }


def calibration(scored: Sequence[ScoredSample], *, max_apcer: float) -> float:
    """The threshold `calibrate_threshold` picks on a scored set."""
    live, attacks = split_scores(scored)
    return calibrate_threshold(live, attacks, max_apcer=max_apcer).threshold


def write_outputs(
    runs: dict[str, list[ScoredSample]],
    summaries: dict[str, dict[str, Any]],
    out_dir: Path,
    *,
    threshold: float,
    root: Path | None = None,
) -> dict[str, Path]:
    """Write the JSON report, the per-sample CSV and the DET curve PNG."""
    from facefed.core.errors import ConfigurationError

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"Cannot create the folder {out_dir}: {error.strerror or error}."
        ) from None
    curves = {}
    for name, scored in runs.items():
        live, attacks = split_scores(scored)
        if live and attacks:
            _, apcer, bpcer = det_points(live, attacks)
            curves[name] = (apcer, bpcer)
    paths = {
        "json": out_dir / "liveness_eval.json",
        "det": out_dir / "liveness_det.png",
        "scores": out_dir / "liveness_scores.csv",
    }
    plot_det(curves, paths["det"], title="facefed silent liveness (shared set)")
    report = {"threshold": threshold, "caveat": CAVEAT, "runs": summaries}
    paths["json"].write_text(json.dumps(report, indent=2, default=_jsonable))
    with open(paths["scores"], "w") as handle:
        handle.write("run,path,label,attack_type,kind,area,score,network,texture\n")
        for name, scored in runs.items():
            for s in scored:
                handle.write(
                    f"{name},{_relative(s.sample.path, root)},"
                    f"{'live' if s.sample.live else 'spoof'},"
                    f"{s.sample.attack_type},{s.sample.kind},{s.area},{s.score:.4f},"
                    f"{s.cues.get('network', math.nan):.4f},"
                    f"{s.cues.get('texture', math.nan):.4f}\n"
                )
    return paths


def _relative(path: Path, root: Path | None) -> str:
    if root is not None and path.is_relative_to(root):
        return str(path.relative_to(root))
    return str(path)


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse, before the minute of scoring, an output folder that cannot be one.

    Raises:
        ConfigurationError: The path or a parent of it is a file.
    """
    from facefed.core.errors import ConfigurationError

    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigurationError(
            f"--out {out_dir} cannot be a folder: {existing} is a file."
        )


def run_evaluation(
    data: Path,
    labels: Path,
    out_dir: Path,
    *,
    calibrate: bool,
    max_apcer: float,
    bona_fide: Path | None = None,
) -> dict[str, Any]:
    """Score the labelled set four ways, print the error rates, write the files.

    Runs: `frames` (full frames through the detector), `crops_whole` (tight
    crops, whole image as face box), `crops_detect` (detector inside the
    crops), `crops_rescaled` (crops resampled to COMMON_CROP_AREA first), and
    `all` (frames plus crops_whole), the set the threshold is calibrated on.
    With `bona_fide`, every image under that folder is also scored as a live
    presentation (through the detector) and its BPCER reported: a check of
    the threshold on many more people than the labelled set holds.

    Returns:
        The JSON report as a dictionary.
    """
    from rich.console import Console
    from rich.progress import Progress

    from facefed.core.errors import ConfigurationError
    from facefed.core.liveness import default_checker
    from facefed.core.liveness.evaluation import load_pad_samples
    from facefed.core.liveness.faces import default_face_finder

    if not labels.is_file():
        raise ConfigurationError(f"There is no label file at {labels}.")
    samples = load_pad_samples(data, labels)
    _check_out_dir(out_dir)
    frames = [s for s in samples if s.kind == "frame"]
    crops = [s for s in samples if s.kind == "crop"]
    checker = default_checker()
    finder = default_face_finder()
    plan: list[tuple[str, list[PadSample], CropMode, bool]] = [
        ("frames", frames, "whole", False),
        ("crops_whole", crops, "whole", False),
        ("crops_detect", crops, "detect", False),
        ("crops_rescaled", crops, "whole", True),
    ]
    if bona_fide is not None:
        plan.append(("bona_fide_extra", _bona_fide_samples(bona_fide), "whole", False))
    runs: dict[str, list[ScoredSample]] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("scoring", total=sum(len(p[1]) for p in plan))
        for name, subset, mode, rescale in plan:
            runs[name] = score_samples(
                checker,
                subset,
                finder=finder,
                crop_mode=mode,
                rescale_crops=rescale,
                progress=lambda: progress.advance(task),
            )
    extra = runs.pop("bona_fide_extra", None)
    runs["all"] = runs["frames"] + runs["crops_whole"]
    threshold = checker.threshold
    summaries = {
        name: summarise(scored, threshold)
        for name, scored in runs.items()
        if any(not math.isnan(s.score) for s in scored)
    }
    if extra is not None:
        summaries["bona_fide_extra"] = _bona_fide_summary(extra, threshold)
    if calibrate and "all" in summaries:
        summaries["all"]["calibrated_threshold"] = calibration(
            runs["all"], max_apcer=max_apcer
        )
    paths = write_outputs(runs, summaries, out_dir, threshold=threshold, root=data)
    _print(Console(width=160), summaries, threshold, paths)
    return json.loads(paths["json"].read_text())


def _bona_fide_samples(folder: Path) -> list[PadSample]:
    from facefed.core.errors import ConfigurationError
    from facefed.core.liveness.faces import IMAGE_SUFFIXES

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigurationError(f"The bona fide folder {folder} holds no images.")
    return [PadSample(path, True, "", "frame") for path in paths]


def _bona_fide_summary(scored: Sequence[ScoredSample], threshold: float) -> dict:
    scores = np.array([s.score for s in scored if not math.isnan(s.score)])
    return {
        "n": int(scores.size),
        "unscored": sum(math.isnan(s.score) for s in scored),
        "bpcer": float(np.mean(scores < threshold)) if scores.size else math.nan,
        "score_quantiles_10_50_90": [
            float(q) for q in np.percentile(scores, [10, 50, 90])
        ]
        if scores.size
        else [],
    }


def _print(
    console: Any, summaries: dict[str, dict[str, Any]], threshold: float, paths: dict
) -> None:
    from rich.table import Table

    species = sorted(
        {k for s in summaries.values() if "rates" in s for k in s["rates"]["apcer"]}
    )
    rates_table = Table(
        "run",
        "live",
        *[f"APCER {name} (n)" for name in species],
        "APCER max",
        "BPCER",
        "EER",
        "BPCER20",
        "corr(score, area) live / spoof",
        "EER of area alone",
        title=f"Silent liveness at threshold {threshold:.3f} (ISO/IEC 30107-3)",
    )
    cue_table = Table("run", *CUES, title="EER of each cue alone")
    for name, summary in summaries.items():
        if name == "bona_fide_extra":
            continue
        rates = summary["rates"]
        bias = summary["score_area_correlation"]
        apcer_cells = [
            f"{rates['apcer'][k]:.1%} ({rates['n_attack'][k]})"
            if k in rates["apcer"]
            else "-"
            for k in species
        ]
        rates_table.add_row(
            name,
            str(rates["n_live"]),
            *apcer_cells,
            f"{rates['apcer_max']:.1%}",
            f"{rates['bpcer']:.1%}",
            f"{summary['eer']:.1%}",
            f"{summary['bpcer20']:.1%}",
            f"{bias['live']:+.2f} / {bias['spoof']:+.2f}",
            f"{summary['eer_of_image_area_alone']:.1%}",
        )
        cue_table.add_row(
            name, *[f"{summary['eer_by_cue'].get(c, math.nan):.1%}" for c in CUES]
        )
    console.print(rates_table)
    console.print(cue_table)
    extra = summaries.get("bona_fide_extra")
    if extra:
        console.print(
            f"extra bona fide images: {extra['n']} scored ({extra['unscored']} "
            f"without a face), BPCER {extra['bpcer']:.1%} at {threshold:.3f}"
        )
    for name, summary in summaries.items():
        for note in summary.get("notes", []):
            console.print(f"{name}: {note}")
        if "calibrated_threshold" in summary:
            console.print(
                f"calibrated threshold on '{name}': "
                f"{summary['calibrated_threshold']:.3f}"
            )
    console.print(f"[yellow]caveat:[/yellow] {CAVEAT}")
    console.print(
        f"wrote {paths['json']}, {paths['scores']} and the DET curve {paths['det']}"
    )
