"""Commands this part adds to `facefed`: embed, verify and eval verify."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)

DEFAULT_FMR = 1e-3


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", help="Embedding model id in the model folder (default dlib)."
    ),
]


def embed_command(
    images: Annotated[list[Path], typer.Argument(help="Image files.", exists=True)],
    model: ModelOption = None,
) -> None:
    """Print the embedding of the largest face of each image, as JSON."""
    from facefed.core.errors import FaceError
    from facefed.core.image import decode_image
    from facefed.models.zoo import default_pipeline, load_embedder

    embedder = load_embedder(model)
    pipeline = default_pipeline(liveness=False, embedder=embedder)
    model_id = embedder.metadata.model_id
    results: list[dict[str, Any]] = []
    failed = False
    for path in images:
        entry: dict[str, Any] = {"path": str(path), "model_id": model_id}
        try:
            analysis = pipeline.embed_one(decode_image(path), check_liveness=False)
        except FaceError as error:
            entry["error"] = str(error)
            failed = True
        else:
            entry["box"] = [round(float(v), 1) for v in analysis.face.box]
            entry["embedding"] = [round(float(v), 6) for v in analysis.embedding]
        results.append(entry)
    typer.echo(json.dumps(results, indent=1))
    if failed:
        raise typer.Exit(4)


def verify_command(
    image_a: Annotated[Path, typer.Argument(exists=True, help="First image.")],
    image_b: Annotated[Path, typer.Argument(exists=True, help="Second image.")],
    fmr: Annotated[
        float, typer.Option("--fmr", help="Target false match rate for the threshold.")
    ] = DEFAULT_FMR,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Cosine threshold; overrides --fmr."),
    ] = None,
    model: ModelOption = None,
) -> None:
    """Decide whether two photos show the same person (largest face of each)."""
    from facefed.core.image import decode_image
    from facefed.models.zoo import default_pipeline, load_embedder

    embedder = load_embedder(model)
    metadata = embedder.metadata
    pipeline = default_pipeline(liveness=False, embedder=embedder)
    used = threshold if threshold is not None else metadata.threshold_for(fmr)
    first = pipeline.embed_one(decode_image(image_a), check_liveness=False)
    second = pipeline.embed_one(decode_image(image_b), check_liveness=False)
    similarity = float(first.embedding @ second.embedding)
    result = {
        "model_id": metadata.model_id,
        "similarity": round(similarity, 4),
        "threshold": round(used, 4),
        "threshold_source": "--threshold" if threshold is not None else f"FMR {fmr:g}",
        "decision": "same person" if similarity >= used else "different people",
    }
    typer.echo(json.dumps(result, indent=1))


def eval_verify_command(
    pairs: Annotated[
        Path, typer.Option("--pairs", exists=True, help="fold,path1,path2,same CSV.")
    ],
    root: Annotated[
        Path,
        typer.Option("--root", exists=True, file_okay=False, help="Base of the paths."),
    ],
    output: Annotated[
        Path, typer.Option("--output", help="Folder for report.json, roc.png, det.png.")
    ] = Path("verify-eval"),
    model: ModelOption = None,
    detector: Annotated[
        str | None,
        typer.Option("--detector", help="Detector spec (default: settings)."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache", help="Embedding cache .npz (default FACEFED_HOME/cache)."
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option("--calibrate", help="Store thresholds at FMR 1e-2 and 1e-3."),
    ] = False,
) -> None:
    """Evaluate 1:1 verification on a pairs protocol: k-fold accuracy, TAR@FAR, EER."""
    from rich.progress import Progress

    from facefed.core.detection.registry import create_detector
    from facefed.core.settings import get_core_settings
    from facefed.models.registry import ModelRegistry
    from facefed.models.verification_eval import (
        EmbeddingCache,
        ImageEmbedder,
        build_report,
        calibrated_thresholds,
        read_pairs,
        save_plots,
    )
    from facefed.models.zoo import ensure_dlib_resnet_onnx, load_embedder

    settings = get_core_settings()
    spec = detector or settings.detector
    embedder = load_embedder(model)
    model_id = embedder.metadata.model_id
    protocol = read_pairs(pairs)
    paths = sorted({root / p for pair in protocol for p in (pair.path1, pair.path2)})
    missing = [p for p in paths if not p.is_file()]
    if missing:
        from facefed.core.errors import ConfigurationError

        raise ConfigurationError(
            f"{len(missing)} images of the protocol are missing, e.g. {missing[0]}."
        )
    cache_path = (
        cache
        or settings.home / "cache" / f"verify-{model_id}-{spec.replace(':', '_')}.npz"
    )
    runner = ImageEmbedder(
        create_detector(spec),
        embedder,
        detector_name=spec,
        cache=EmbeddingCache(cache_path),
    )
    with Progress(transient=True) as progress:
        task = progress.add_task("Embedding images", total=len(paths))
        embeddings = runner.embed_all(paths, lambda n: progress.advance(task, n))
    report = build_report(protocol, root, embeddings, model_id=model_id, detector=spec)
    summary = report.summary()
    if calibrate:
        thresholds = calibrated_thresholds(report)
        source = (
            f"{pairs.name}: {report.pairs} pairs, {int((~report.same).sum())} impostor"
        )
        if model is None:
            ensure_dlib_resnet_onnx()
        ModelRegistry().update_thresholds(model_id, thresholds, source=source)
        summary["calibrated_thresholds"] = thresholds
    output.mkdir(parents=True, exist_ok=True)
    summary["plots"] = [str(p) for p in save_plots(report, output)]
    (output / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    detected = summary["kfold_accuracy_detected_pairs_only"]
    lines = [
        f"model {summary['model_id']}, detector {summary['detector']}",
        f"pairs {summary['pairs']}, images {summary['images']}, "
        f"no face detected in {summary['no_face_images']} images "
        f"({summary['pairs_with_fallback']} pairs scored on a fallback chip)",
        f"{len(summary['fold_accuracies'])}-fold accuracy "
        f"{100 * summary['kfold_accuracy']:.2f}% "
        f"+- {100 * summary['kfold_accuracy_std']:.2f}",
    ]
    if detected is not None:
        lines.append(f"  on pairs with both faces detected: {100 * detected:.2f}%")
    for far, tar in summary["tar_at_far"].items():
        lines.append(f"TAR @ FAR {far}: {100 * tar:.2f}%")
    lines.append(
        f"EER {100 * summary['eer']:.2f}% (threshold {summary['eer_threshold']:.3f})"
    )
    if "calibrated_thresholds" in summary:
        lines.append(f"stored thresholds {summary['calibrated_thresholds']}")
    lines.append(f"plots: {', '.join(summary['plots'])}")
    typer.echo("\n".join(lines))


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add this part's commands to the root app and the `eval` group."""
    app.command("embed")(embed_command)
    app.command("verify")(verify_command)
    eval_app.command("verify")(eval_verify_command)
