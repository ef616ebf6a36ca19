"""Commands this part adds to `facefed`: `facefed eval privacy`."""

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

PAIRS_FILE = Path("protocols") / "lfw_pairs_folds01-07.csv"


def _default_pairs() -> Path:
    shared = os.environ.get("FACEFED_SHARED_DATA", "../shared/data")
    return Path(shared) / PAIRS_FILE


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add this part's commands to the root app and the `eval` group."""
    eval_app.command("privacy")(eval_privacy)


def eval_privacy(
    pairs: Annotated[
        Path | None,
        typer.Option(
            help="Pairs CSV: fold,path1,path2,same (paths under --data); default: "
            "$FACEFED_SHARED_DATA (../shared/data)/protocols/lfw_pairs_folds01-07.csv."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Folder the pair paths are relative to; default: pairs/../."),
    ] = None,
    pairs_per_fold: Annotated[
        int, typer.Option(min=0, help="Use only N pairs of each fold (0: all).")
    ] = 0,
    output: Annotated[
        Path, typer.Option(help="Folder for the JSON report and the plots.")
    ] = Path("privacy-eval"),
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed the evaluation keys (repeatable reports); default: random."
        ),
    ] = None,
    he_gallery: Annotated[
        int, typer.Option(min=10, help="Gallery size of the encrypted-matching check.")
    ] = 1000,
) -> None:
    """Accuracy, unlinkability and inversion of protected templates on LFW pairs.

    Embeds every image of the pairs with the default pipeline (cached per
    image and model), then reports verification accuracy of raw,
    orthonormal-v1 and biohash-v1 templates side by side, D<->sys between
    two keys with histograms, an inversion attack on biohash-v1, and an
    encrypted 1:N check against plaintext search.
    """
    from rich.console import Console

    from facefed.privacy.evaluation import evaluate_schemes, inversion_attack, make_keys

    console = Console()
    pairs = pairs if pairs is not None else _default_pairs()
    rows = _read_pairs(pairs, pairs_per_fold)
    root = data if data is not None else pairs.resolve().parent.parent
    pair_set, failed = _embed_pairs(rows, root, console)
    output.mkdir(parents=True, exist_ok=True)
    keys = make_keys(seed=seed)
    reports = evaluate_schemes(pair_set, keys=keys, plot_dir=output)
    raw_threshold = reports[0].threshold
    attack = inversion_attack(pair_set, keys["biohash-v1"][0], threshold=raw_threshold)
    encrypted = _encrypted_check(pair_set, keys["orthonormal-v1"][0], he_gallery)
    report: dict[str, Any] = {
        "pairs": len(pair_set.same),
        "pairs_skipped_no_face": failed,
        "folds": sorted(int(f) for f in np.unique(pair_set.folds)),
        "schemes": [vars(r) for r in reports],
        "inversion_biohash_v1": attack,
        "encrypted_matching": encrypted,
    }
    (output / "privacy.json").write_text(json.dumps(report, indent=2))
    _print_report(console, report)
    console.print(f"report and plots in {output}/")


def _read_pairs(path: Path, per_fold: int) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigurationError(f"The pairs file {path} does not exist.")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"fold", "path1", "path2", "same"}
    if not rows or not needed <= set(rows[0]):
        raise ConfigurationError(
            f"The pairs file {path} needs the columns {sorted(needed)}."
        )
    if per_fold:
        kept: list[dict[str, str]] = []
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            # Keep the fold balanced: N / 2 genuine and N / 2 impostor pairs.
            group = (row["fold"], row["same"])
            if counts.get(group, 0) < max(per_fold // 2, 1):
                counts[group] = counts.get(group, 0) + 1
                kept.append(row)
        rows = kept
    return rows


def _embed_pairs(
    rows: list[dict[str, str]], root: Path, console: Any
) -> tuple[Any, int]:
    """Embed both images of each pair; pairs where a face is missing are skipped."""
    from facefed.privacy.evaluation import PairSet

    paths = sorted({row["path1"] for row in rows} | {row["path2"] for row in rows})
    vectors = _embed_images(paths, root, console)
    first, second, same, folds = [], [], [], []
    failed = 0
    for row in rows:
        a, b = vectors.get(row["path1"]), vectors.get(row["path2"])
        if a is None or b is None:
            failed += 1
            continue
        first.append(a)
        second.append(b)
        same.append(int(row["same"]))
        folds.append(int(row["fold"]))
    if failed:
        logger.warning("%d pairs skipped: no usable face in an image", failed)
    pair_set = PairSet(
        np.array(first), np.array(second), np.array(same), np.array(folds)
    )
    return pair_set, failed


def _embed_images(
    paths: list[str], root: Path, console: Any
) -> dict[str, np.ndarray | None]:
    """Unit embeddings of images with the default pipeline, cached per model."""
    from rich.progress import Progress

    from facefed.core.errors import FaceError, ImageError
    from facefed.core.image import decode_image
    from facefed.core.settings import get_core_settings
    from facefed.models.zoo import default_pipeline

    pipeline = default_pipeline(liveness=False)
    model_id = pipeline.embedder.metadata.model_id
    cache_path = get_core_settings().home / "cache" / f"privacy-eval-{model_id}.npz"
    cache = _load_cache(cache_path)
    missing = [p for p in paths if p not in cache]
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("embedding images", total=len(missing))
        for path in missing:
            try:
                analysis = pipeline.embed_one(
                    decode_image(root / path), check_liveness=False
                )
                cache[path] = np.asarray(analysis.embedding, dtype=np.float32)
            except (FaceError, ImageError) as error:
                logger.debug("no embedding for %s: %s", path, error)
                cache[path] = None
            progress.advance(task)
    if missing:
        logger.info(
            "embedded %d images in %.0f s", len(missing), time.perf_counter() - started
        )
        _save_cache(cache_path, cache)
    return {p: cache[p] for p in paths}


def _load_cache(path: Path) -> dict[str, np.ndarray | None]:
    if not path.is_file():
        return {}
    archive = np.load(path)
    cache: dict[str, np.ndarray | None] = {}
    for path_name, vector, ok in zip(
        archive["paths"], archive["embeddings"], archive["ok"], strict=True
    ):
        cache[str(path_name)] = vector if ok else None
    return cache


def _save_cache(path: Path, cache: dict[str, np.ndarray | None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = next(v.shape[0] for v in cache.values() if v is not None)
    names = sorted(cache)
    empty = np.zeros(dim, np.float32)
    vectors = np.stack([_or_empty(cache[n], empty) for n in names])
    ok = np.array([cache[n] is not None for n in names])
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, paths=np.array(names), embeddings=vectors, ok=ok)
    temporary.replace(path)


def _or_empty(vector: np.ndarray | None, empty: np.ndarray) -> np.ndarray:
    return empty if vector is None else vector


def _encrypted_check(pairs: Any, key: Any, gallery_size: int) -> dict[str, Any]:
    """Encrypted 1:N on the pairs' images against plaintext search."""
    from facefed.privacy.he import ServerHEScorer, SiteHEContext
    from facefed.privacy.protection import protect

    mated = np.flatnonzero(pairs.same == 1)
    probes_index = mated[:20]
    gallery = np.concatenate([pairs.first[mated], pairs.first[pairs.same == 0]])
    gallery = protect(gallery[:gallery_size], key)
    probes = protect(pairs.second[probes_index], key)
    site = SiteHEContext.create(galois_keys=False)
    scorer = ServerHEScorer(site.public_bytes())
    worst, same_rank1, seconds = 0.0, 0, []
    for probe in probes:
        encrypted = site.encrypt_probe(probe)
        started = time.perf_counter()
        result = scorer.score_many(encrypted, gallery)
        seconds.append(time.perf_counter() - started)
        scores = site.decrypt_scores(result, len(gallery))
        plain = gallery @ probe
        worst = max(worst, float(np.abs(scores - plain).max()))
        same_rank1 += int(np.argmax(scores) == np.argmax(plain))
    return {
        "gallery": len(gallery),
        "probes": len(probes),
        "max_abs_score_error": worst,
        "rank1_identical": f"{same_rank1}/{len(probes)}",
        "median_score_many_s": float(np.median(seconds)),
    }


def _print_report(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"LFW pairs: {report['pairs']} (folds {report['folds']})")
    for column in (
        "templates",
        "accuracy",
        "threshold",
        "D<->sys",
        "max |score change|",
    ):
        table.add_column(column)
    for row in report["schemes"]:
        table.add_row(
            row["name"],
            f"{row['accuracy']:.4f} ± {row['accuracy_std']:.4f}",
            f"{row['threshold']:.4f}",
            "-" if row["d_sys"] is None else f"{row['d_sys']:.4f}",
            f"{row['extra'].get('max_abs_score_change', 0.0):.2e}",
        )
    console.print(table)
    attack = report["inversion_biohash_v1"]
    console.print(
        "biohash-v1 inversion with the key: mean cosine "
        f"{attack['least_squares_mean_cosine']:.3f} (least squares), "
        f"{attack['map_mean_cosine']:.3f} (MAP); accepted by the raw system "
        f"{attack['least_squares_accepted_rate']:.1%} / "
        f"{attack['map_accepted_rate']:.1%}"
        f" (genuine {attack['genuine_accepted_rate']:.1%})"
    )
    he = report["encrypted_matching"]
    console.print(
        f"encrypted 1:N over {he['gallery']}: max |error| "
        f"{he['max_abs_score_error']:.1e}, rank-1 identical {he['rank1_identical']}, "
        f"median {he['median_score_many_s']:.2f} s"
    )
