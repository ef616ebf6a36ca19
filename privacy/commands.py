"""Commands this part adds to `facefed`: `facefed eval privacy`."""

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

EMBED_BATCH = 500

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
    he_probes: Annotated[
        int, typer.Option(min=1, help="Probes of the encrypted-matching check.")
    ] = 20,
) -> None:
    """Accuracy, unlinkability and inversion of protected templates on LFW pairs.

    Embeds every image of the pairs with the default detector and embedder
    (the per-image cache of `facefed eval verify`), then reports
    verification accuracy of raw, orthonormal-v1 and biohash-v1 templates
    side by side, D<->sys between two keys with histograms, an inversion
    attack on biohash-v1, and an encrypted 1:N check against plaintext search.
    """
    from rich.console import Console

    from facefed.privacy.evaluation import evaluate_schemes, inversion_attack, make_keys

    console = Console()
    pairs = pairs if pairs is not None else _default_pairs()
    rows = _read_pairs(pairs, pairs_per_fold)
    root = data if data is not None else pairs.resolve().parent.parent
    pair_set, undetected = _embed_pairs(rows, root, console)
    output.mkdir(parents=True, exist_ok=True)
    keys = make_keys(seed=seed)
    reports = evaluate_schemes(pair_set, keys=keys, plot_dir=output)
    raw_threshold = reports[0].threshold
    attack = inversion_attack(pair_set, keys["biohash-v1"][0], threshold=raw_threshold)
    encrypted = _encrypted_check(
        pair_set, keys["orthonormal-v1"][0], gallery_size=he_gallery, probes=he_probes
    )
    report: dict[str, Any] = {
        "pairs": len(pair_set.same),
        "images_without_detected_face": undetected,
        "folds": sorted(int(f) for f in np.unique(pair_set.folds)),
        "schemes": [vars(r) for r in reports],
        "inversion_biohash_v1": attack,
        "encrypted_matching": encrypted,
    }
    (output / "privacy.json").write_text(json.dumps(report, indent=2))
    _print_report(console, report)
    console.print(f"report and plots in {output}/")


def _read_pairs(path: Path, per_fold: int) -> list[Any]:
    """The protocol's pairs (models.verification_eval), optionally a balanced subset."""
    from facefed.models.verification_eval import read_pairs

    if not path.is_file():
        raise ConfigurationError(f"The pairs file {path} does not exist.")
    pairs = read_pairs(path)
    if not per_fold:
        return pairs
    kept: list[Any] = []
    counts: dict[tuple[int, bool], int] = {}
    for pair in pairs:
        # Keep each fold balanced: N / 2 genuine and N / 2 impostor pairs.
        group = (pair.fold, pair.same)
        if counts.get(group, 0) < max(per_fold // 2, 1):
            counts[group] = counts.get(group, 0) + 1
            kept.append(pair)
    return kept


def _embed_pairs(pairs: list[Any], root: Path, console: Any) -> Any:
    """Embed both images of each pair with the embedding evaluation's machinery.

    Reuses `models.verification_eval.ImageEmbedder` and the same per-image
    cache file as `facefed eval verify`, so either command fills it for the
    other. Images without a detected face get the protocol's fallback chip,
    as in `eval verify`, so no pair is dropped.
    """
    from rich.progress import Progress

    from facefed.core.detection.registry import create_detector
    from facefed.core.settings import get_core_settings
    from facefed.models.verification_eval import EmbeddingCache, ImageEmbedder
    from facefed.models.zoo import load_default_embedder
    from facefed.privacy.evaluation import PairSet

    settings = get_core_settings()
    spec = settings.detector
    embedder = load_default_embedder()
    model_id = embedder.metadata.model_id
    cache_path = (
        settings.home / "cache" / f"verify-{model_id}-{spec.replace(':', '_')}.npz"
    )
    runner = ImageEmbedder(
        create_detector(spec),
        embedder,
        detector_name=spec,
        cache=EmbeddingCache(cache_path),
    )
    paths = sorted({root / p for pair in pairs for p in (pair.path1, pair.path2)})
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigurationError(
            f"{len(missing)} images of the protocol are missing, e.g. {missing[0]}."
        )
    embeddings: dict[Path, Any] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("embedding images", total=len(paths))
        # Batches bound the decoded images held at once; the cache saves each.
        for start in range(0, len(paths), EMBED_BATCH):
            batch = paths[start : start + EMBED_BATCH]
            embeddings.update(
                runner.embed_all(batch, lambda n: progress.advance(task, n))
            )

    def unit(path: str) -> np.ndarray:
        vector = np.asarray(embeddings[root / path].embedding, dtype=np.float64)
        return vector / np.linalg.norm(vector)

    undetected = sum(not item.detected for item in embeddings.values())
    pair_set = PairSet(
        np.stack([unit(p.path1) for p in pairs]),
        np.stack([unit(p.path2) for p in pairs]),
        np.array([int(p.same) for p in pairs]),
        np.array([p.fold for p in pairs]),
    )
    return pair_set, undetected


def _encrypted_check(
    pairs: Any, key: Any, *, gallery_size: int, probes: int
) -> dict[str, Any]:
    """Encrypted 1:N on the pairs' images against plaintext search."""
    from facefed.privacy.he import ServerHEScorer, SiteHEContext
    from facefed.privacy.protection import protect

    mated = np.flatnonzero(pairs.same == 1)
    probes_index = mated[:probes]
    gallery = np.concatenate([pairs.first[mated], pairs.first[pairs.same == 0]])
    # LFW reuses images across pairs: identical rows would tie for rank 1.
    _, first_rows = np.unique(gallery, axis=0, return_index=True)
    gallery = protect(gallery[np.sort(first_rows)][:gallery_size], key)
    probe_templates = protect(pairs.second[probes_index], key)
    site = SiteHEContext.create(galois_keys=False)
    scorer = ServerHEScorer(site.public_bytes())
    worst, same_rank1, seconds = 0.0, 0, []
    for probe in probe_templates:
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
        "probes": len(probe_templates),
        "max_abs_score_error": worst,
        "rank1_identical": f"{same_rank1}/{len(probe_templates)}",
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
