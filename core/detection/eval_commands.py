"""`facefed eval detect` and `facefed eval landmarks`: detector accuracy tables."""

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from facefed.core.detection.base import FaceDetector
    from facefed.core.detection.evaluation import DetectorReport, EvaluationData

logger = logging.getLogger(__name__)

DEFAULT_DETECTORS = "yunet,retinaface,mtcnn,hog,cnn"
# Score floor for the WIDER precision-recall sweep, as in the WIDER protocol
# where detectors submit low-confidence boxes too.
SWEEP_SCORE_THRESHOLD = 0.02
HOG_SWEEP_ADJUST = -1.0


DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Shared data root (default: FACEFED_SHARED_DATA or ../shared/data).",
    ),
]
DetectorsOption = Annotated[
    str, typer.Option("--detectors", help="Comma-separated detector specs.")
]
JsonOption = Annotated[
    Path | None,
    typer.Option("--json", help="Also write every figure to this JSON file."),
]


def _parse_specs(value: str) -> list[str]:
    """Split a comma-separated detector list, refusing an empty one."""
    from facefed.core.errors import ConfigurationError

    specs = [spec.strip() for spec in value.split(",") if spec.strip()]
    if not specs:
        raise ConfigurationError(
            f"--detectors needs at least one detector name; got {value!r}."
        )
    return specs


def create_operating_detector(spec: str) -> "FaceDetector":
    """The detector as deployed, from the detection registry."""
    from facefed.core.detection.registry import create_detector

    return create_detector(spec)


def create_sweep_detector(spec: str, operating: "FaceDetector") -> "FaceDetector":
    """The same detector with a low score threshold, for the WIDER PR sweep.

    Detectors whose threshold cannot be lowered through a documented setting
    are swept at their operating threshold (their AP is then a lower bound).
    """
    if spec == "retinaface":
        from facefed.models.detectors.retinaface import (
            RetinaFaceConfig,
            RetinaFaceDetector,
        )

        return RetinaFaceDetector(
            RetinaFaceConfig(score_threshold=SWEEP_SCORE_THRESHOLD)
        )
    if spec == "yunet":
        from facefed.core.detection.yunet import YuNetDetector

        return YuNetDetector(score_threshold=SWEEP_SCORE_THRESHOLD)
    if spec == "hog":
        from facefed.core.detection.dlib_detectors import DlibHogDetector

        # dlib's HOG score is an SVM margin; -1 admits its weaker detections.
        return DlibHogDetector(adjust_threshold=HOG_SWEEP_ADJUST)
    return operating


def _resolve_root(data: Path | None) -> Path:
    """The data root from --data, FACEFED_SHARED_DATA or ../shared/data."""
    from facefed.core.detection.evaluation import default_data_root, require_data_root

    return require_data_root(data or default_data_root())


def _fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell, '-' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _detect_table(reports: list["DetectorReport"], data: "EvaluationData") -> "Table":
    """One row per detector with every figure of the run."""
    from rich.table import Table

    counts_note = ", ".join(
        f"{item.path.stem} ({'crowd' if item.expected < 0 else item.expected})"
        for item in data.counts
    )
    table = Table(
        title=f"Face detection on {data.root}",
        caption=(
            "AP: WIDER FACE val, IoU 0.5. R/P: recall (found/faces) and precision "
            "(false positives) on dlib's PASCAL faces, IoU 0.4. Counts: faces found "
            f"in {counts_note or 'no group photos'}. NME: mean five-point error / "
            "inter-ocular distance over the .pts photos."
        ),
    )
    table.add_column("detector", no_wrap=True, min_width=10)
    for column in ("easy AP", "medium AP", "hard AP", "PASCAL R", "PASCAL P"):
        table.add_column(column, justify="right")
    for column in ("counts", "NME", "ms/img"):
        table.add_column(column, justify="right")
    for report in reports:
        pascal = report.pascal
        row = [report.detector]
        row += [_fmt(report.wider_ap.get(s)) for s in ("easy", "medium", "hard")]
        if pascal:
            row.append(
                f"{_fmt(pascal['recall'])} ({pascal['true_positives']:.0f}/"
                f"{pascal['faces']:.0f})"
            )
            row.append(f"{_fmt(pascal['precision'])} ({pascal['false_positives']:.0f})")
        else:
            row += ["-", "-"]
        row.append(" ".join(str(count["found"]) for count in report.counts) or "-")
        found = [value for value in report.nme.values() if value is not None]
        if report.landmarks_missing:
            row.append("none")
        else:
            row.append(_fmt(sum(found) / len(found) if found else None))
        row.append(_fmt(report.seconds_per_image * 1000, 0))
        table.add_row(*row)
    return table


def _write_json(path: Path, payload: dict[str, object]) -> None:
    """Write the run's figures as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def eval_detect(
    data: DataOption = None,
    detectors: DetectorsOption = DEFAULT_DETECTORS,
    json_out: JsonOption = None,
) -> None:
    """Evaluate detectors: WIDER FACE AP, PASCAL recall/precision, counts, NME."""
    from rich.console import Console
    from rich.progress import Progress

    from facefed.core.detection.evaluation import EvaluationData, evaluate_detector

    root = _resolve_root(data)
    dataset = EvaluationData.load(root)
    # Build every detector first so a bad name fails before any long run.
    built = [
        (spec, create_operating_detector(spec)) for spec in _parse_specs(detectors)
    ]
    reports = []
    with Progress(transient=True) as progress:
        for spec, operating in built:
            task = progress.add_task(f"{spec}", total=dataset.image_count)
            reports.append(
                evaluate_detector(
                    spec,
                    operating,
                    dataset,
                    sweep_detector=create_sweep_detector(spec, operating),
                    advance=lambda task=task: progress.advance(task),
                )
            )
    console = Console()
    console.print(_detect_table(reports, dataset))
    if dataset.wider:
        faces = {
            s: int(sum(img.settings[s].sum() for img in dataset.wider))
            for s in ("easy", "medium", "hard")
        }
        console.print(
            f"WIDER FACE val: {len(dataset.wider)} images, faces per setting "
            f"{faces}; IoU 0.5, official ignore rules and AP computation."
        )
    if json_out is not None:
        _write_json(
            json_out,
            {
                "data_root": str(root),
                "sweep_score_threshold": SWEEP_SCORE_THRESHOLD,
                "reports": [report.to_dict() for report in reports],
            },
        )
        console.print(f"Wrote {json_out}")


def eval_landmarks(
    data: DataOption = None,
    detectors: DetectorsOption = DEFAULT_DETECTORS,
    json_out: JsonOption = None,
) -> None:
    """Five-point landmark NME (inter-ocular) of each detector on iBUG .pts files."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from facefed.core.detection.evaluation import (
        EvaluationDataError,
        evaluate_landmarks,
        load_landmark_images,
    )

    root = _resolve_root(data)
    images = load_landmark_images(root)
    if not images:
        raise EvaluationDataError(
            f"No .pts landmark files with images under {root / 'landmarks'}."
        )
    table = Table(title="Five-point NME (mean error / inter-ocular distance)")
    table.add_column("detector")
    for image in images:
        table.add_column(image.path.name, justify="right")
    table.add_column("mean", justify="right")
    payload: dict[str, object] = {"data_root": str(root)}
    built = [
        (spec, create_operating_detector(spec)) for spec in _parse_specs(detectors)
    ]
    with Progress(transient=True) as progress:
        for spec, detector in built:
            task = progress.add_task(spec, total=len(images))
            errors, missing = evaluate_landmarks(
                detector,
                images,
                [],
                lambda task=task: progress.advance(task),
            )
            found = [e for e in errors.values() if e is not None]
            mean = float(sum(found) / len(found)) if found else None
            cells = ["no landmarks" if missing else _fmt(e, 4) for e in errors.values()]
            table.add_row(spec, *cells, _fmt(mean, 4))
            payload[spec] = {"nme": errors, "mean": mean, "no_landmarks": missing}
    console = Console()
    console.print(table)
    console.print("'-' = the annotated face was not detected.")
    if json_out is not None:
        _write_json(json_out, payload)
        console.print(f"Wrote {json_out}")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add `eval detect` and `eval landmarks` to the `eval` group."""
    eval_app.command("detect")(eval_detect)
    eval_app.command("landmarks")(eval_landmarks)
