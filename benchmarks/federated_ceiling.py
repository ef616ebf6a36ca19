"""Upper bounds for the degraded-camera scenario: no DP, no federation, all data pooled.

Run: `.venv/bin/python -m benchmarks.federated_ceiling SCENARIO_DIR`, where
SCENARIO_DIR was written by `facefed eval federated-scenario` (chips and
trunk features are computed once and cached in each site folder).

Federated DP-SGD cannot do better than the same training with every site's
photos in one place and no noise. This script measures that ceiling on the
scenario's own data, so a missed target can be told apart from a weak
implementation:

1. ArcFace fine-tuning of the projection (the default shared top) on the
   three sites' photos pooled, Adam, with a head per site whose class
   centres start at each identity's mean parent embedding (the best start
   a head can have; under DP it would cost budget, see the README) and the
   compatibility term, at two learning rates;
2. the same with random class centres (what a DP site does);
3. ArcFace fine-tuning of stage5 and the projection (1.2 M weights);
4. closed-form linear corrections of the parent embedding fitted on the
   pooled training photos: removing the mean degraded embedding, and
   within-class covariance normalisation (WCCN, Hatch et al., 2006);
5. AdaBN (Li et al., 2016) per site: every affine layer of the whole
   network rescaled so that its input statistics on 200 of the site's
   photos match those on clean LFW photos (the 156 of tests/data/lfw), no
   labels needed; scored on that site's pairs only.

Each is scored like `facefed eval federated`: TAR at FAR 1e-2 and k-fold
accuracy on each site's degraded held-out pairs, and on the clean pairs.
Writes benchmarks/results/federated_scenario/ceiling.{json,md}.
"""

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.report import load_note

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "federated_scenario"
SITES = ("site-1-low_light", "site-2-motion_blur_jpeg", "site-3-lowres_gray")
EMBEDDING_SIZE = 128
BATCH = 64


@dataclass
class SetData:
    """One folder's cached trunk features: training (empty for clean) and held-out."""

    train: torch.Tensor
    labels: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    pairs: object


Embedder = Callable[[torch.Tensor], torch.Tensor]


def _load(scenario: Path, blocks: int) -> tuple[dict[str, SetData], torch.nn.Module]:
    from facefed.client.federated.config import TrainingConfig
    from facefed.client.federated.site import SiteRuntime

    config = TrainingConfig(trainable_blocks=blocks)
    sets: dict[str, SetData] = {}
    top: torch.nn.Module | None = None
    for name in (*SITES, "clean"):
        runtime = SiteRuntime(scenario / name, config)
        runtime.ensure_chips()
        pairs = runtime.store.heldout_pairs()
        train, labels = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        if name != "clean":
            samples = runtime.store.training_samples()
            train = runtime._cached_features("train", samples.chips)
            labels = torch.from_numpy(samples.labels)
        sets[name] = SetData(
            train=train,
            labels=labels,
            first=runtime._cached_features("heldout1", pairs.first),
            second=runtime._cached_features("heldout2", pairs.second),
            pairs=pairs,
        )
        top = runtime.split.top
    assert top is not None
    return sets, copy.deepcopy(top).eval()


@torch.no_grad()
def _score(sets: dict[str, SetData], embed: Embedder) -> dict[str, dict[str, float]]:
    from facefed.client.federated.site import score_pairs

    scores = {}
    for name, data in sets.items():
        first = F.normalize(embed(data.first), dim=1).numpy()
        second = F.normalize(embed(data.second), dim=1).numpy()
        result = score_pairs(first, second, data.pairs)
        scores[name] = {"tar": result.tar, "accuracy": result.accuracy}
    return scores


def _batched(top: torch.nn.Module) -> Embedder:
    def embed(features: torch.Tensor) -> torch.Tensor:
        top.eval()
        return torch.cat(
            [top(features[i : i + 256]) for i in range(0, len(features), 256)]
        )

    return embed


def _arcface(
    sets: dict[str, SetData],
    parent: torch.nn.Module,
    *,
    learning_rate: float,
    epochs: int,
    imprint: bool,
) -> Embedder:
    """Fine-tune `parent`'s trainable weights on the pooled sites without DP."""
    from facefed.client.federated.training import arcface_loss, compatibility_loss

    top = copy.deepcopy(parent).train()
    parent_embed = _batched(parent)
    sites = [sets[name] for name in SITES]
    with torch.no_grad():
        targets = [parent_embed(site.train) for site in sites]
    heads = [
        _initial_head(site.labels, target, imprint)
        for site, target in zip(sites, targets, strict=True)
    ]
    weights = [p for p in top.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([*weights, *heads], lr=learning_rate)

    for _ in range(epochs):
        top.train()
        for site, target, head in zip(sites, targets, heads, strict=True):
            order = torch.randperm(len(site.labels))
            for start in range(0, len(order), BATCH):
                rows = order[start : start + BATCH]
                embeddings = top(site.train[rows])
                cosine = F.normalize(embeddings, dim=1) @ F.normalize(head, dim=1).T
                loss = arcface_loss(
                    cosine,
                    site.labels[rows],
                    scale=32.0,
                    margin=0.3,
                ) + compatibility_loss(embeddings, target[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return _batched(top)


def _initial_head(
    labels: torch.Tensor, embeddings: torch.Tensor, imprint: bool
) -> torch.Tensor:
    classes = int(labels.max()) + 1
    if not imprint:
        return torch.randn(classes, EMBEDDING_SIZE).requires_grad_(True)
    sums = torch.zeros(classes, EMBEDDING_SIZE).index_add_(
        0, labels, F.normalize(embeddings, dim=1)
    )
    return sums.requires_grad_(True)


def _linear_corrections(
    sets: dict[str, SetData], parent: torch.nn.Module
) -> dict[str, Embedder]:
    """Centering and WCCN of the parent's unit embeddings, fitted on training photos."""
    embed = _batched(parent)
    units, labels = [], []
    offset = 0
    with torch.no_grad():
        for name in SITES:
            site = sets[name]
            units.append(F.normalize(embed(site.train), dim=1))
            labels.append(site.labels + offset)
            offset += int(site.labels.max()) + 1
    pooled, classes = torch.cat(units), torch.cat(labels)
    mean = pooled.mean(dim=0)

    counts = torch.bincount(classes).clamp_min(1)[:, None]
    centres = (
        torch.zeros(offset, EMBEDDING_SIZE).index_add_(0, classes, pooled) / counts
    )
    residuals = pooled - centres[classes]
    within = residuals.T @ residuals / len(pooled)
    values, vectors = torch.linalg.eigh(within)
    # Regularised towards isotropy: the 660 identities' scatter is a noisy
    # estimate in 128 dimensions.
    whiten = vectors @ torch.diag((values + 3.0 * values.mean()).rsqrt()) @ vectors.T

    def unit(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(embed(features), dim=1)

    return {
        "linear: remove half the mean degraded embedding": lambda x: (
            unit(x) - 0.5 * mean
        ),
        "linear: remove the mean degraded embedding": lambda x: unit(x) - mean,
        "linear: WCCN (regularised 3x mean eigenvalue)": lambda x: unit(x) @ whiten,
    }


AFFINE_STATISTICS_PHOTOS = 200


def _chips_tensor(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float()


@torch.no_grad()
def _affine_input_statistics(
    network: torch.nn.Module, chips: np.ndarray
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation of every affine layer's input."""
    from facefed.models.dlib_resnet import Affine

    statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
            values = inputs[0]
            statistics[name] = (values.mean((0, 2, 3)), values.std((0, 2, 3)))

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in network.named_modules()
        if isinstance(module, Affine)
    ]
    network(_chips_tensor(chips))
    for handle in handles:
        handle.remove()
    return statistics


@torch.no_grad()
def _adabn(
    network: torch.nn.Module,
    chips: np.ndarray,
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> torch.nn.Module:
    """A copy whose affine layers see the reference statistics on `chips`.

    One forward pass over all the chips in a single batch: each layer is
    corrected as the pass reaches it, so later layers see corrected inputs.
    """
    from facefed.models.dlib_resnet import Affine

    adapted = copy.deepcopy(network)

    def correct(name: str) -> Callable[..., None]:
        def hook(module: Affine, inputs: tuple[torch.Tensor]) -> None:
            mean = inputs[0].mean((0, 2, 3))
            std = inputs[0].std((0, 2, 3)).clamp_min(1e-5)
            reference_mean, reference_std = reference[name]
            gain = reference_std / std
            module.bias += module.weight * (reference_mean - mean * gain)
            module.weight *= gain

        return hook

    handles = [
        module.register_forward_pre_hook(correct(name))
        for name, module in adapted.named_modules()
        if isinstance(module, Affine)
    ]
    adapted(_chips_tensor(chips))
    for handle in handles:
        handle.remove()
    return adapted.eval()


def _adabn_scores(scenario: Path) -> dict[str, dict[str, float]]:
    from facefed.client.federated.chips import pipeline_chip_fn
    from facefed.client.federated.model import load_network
    from facefed.client.federated.site import score_pairs
    from facefed.client.federated.store import SiteDataStore

    chip_of = pipeline_chip_fn()
    photos = sorted((REPO / "tests" / "data" / "lfw").glob("*/*.jpg"))
    clean = np.stack([c for c in map(chip_of, photos) if c is not None])
    network = load_network().eval()
    reference = _affine_input_statistics(network, clean)

    rng = np.random.default_rng(0)
    scores = {}
    for name in SITES:
        store = SiteDataStore(scenario / name)
        chips = store.training_samples().chips
        sample = rng.choice(len(chips), AFFINE_STATISTICS_PHOTOS, replace=False)
        adapted = _adabn(network, chips[sample], reference)
        pairs = store.heldout_pairs()
        first, second = (
            _network_embed(adapted, c) for c in (pairs.first, pairs.second)
        )
        result = score_pairs(first, second, pairs)
        scores[name] = {"tar": result.tar, "accuracy": result.accuracy}
    return scores


@torch.no_grad()
def _network_embed(network: torch.nn.Module, chips: np.ndarray) -> np.ndarray:
    outputs = [
        network(_chips_tensor(chips[start : start + 64]))
        for start in range(0, len(chips), 64)
    ]
    return F.normalize(torch.cat(outputs), dim=1).numpy()


def _runs(scenario: Path) -> dict[str, dict[str, dict[str, float]]]:
    torch.manual_seed(0)
    sets, projection = _load(scenario, blocks=1)
    results = {"parent": _score(sets, _batched(projection))}
    for learning_rate, epochs in ((1e-4, 10), (1e-3, 30)):
        for imprint in (True, False):
            start = "imprinted" if imprint else "random"
            name = (
                f"ArcFace, projection, lr {learning_rate:g}, {epochs} epochs, "
                f"{start} head"
            )
            embed = _arcface(
                sets,
                projection,
                learning_rate=learning_rate,
                epochs=epochs,
                imprint=imprint,
            )
            results[name] = _score(sets, embed)
    for name, embed in _linear_corrections(sets, projection).items():
        results[name] = _score(sets, embed)

    sets, stage5 = _load(scenario, blocks=2)
    for learning_rate in (1e-5, 1e-4):
        embed = _arcface(
            sets, stage5, learning_rate=learning_rate, epochs=6, imprint=True
        )
        name = (
            f"ArcFace, stage5 + projection, lr {learning_rate:g}, 6 epochs, "
            "imprinted head"
        )
        results[name] = _score(sets, embed)

    name = "AdaBN per site, whole network (each site's own pairs)"
    results[name] = _adabn_scores(scenario)
    return results


def _markdown(report: dict) -> str:
    parent = report["runs"]["parent"]
    lines = [
        f"Measured {report['when']} ({report['load'].rstrip('.')}); "
        f"{report['seconds']:.0f} s. "
        "No DP, no federation: the three sites' training photos pooled. "
        "TAR at FAR 1e-2 / accuracy in points; change in mean degraded TAR "
        "against the parent.",
        "",
        "| training | low light | blur + JPEG | low-res gray | clean "
        "| mean TAR change |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    base = np.mean([parent[name]["tar"] for name in SITES])
    for name, scores in report["runs"].items():
        cells = [
            f"{scores[s]['tar'] * 100:.1f} / {scores[s]['accuracy'] * 100:.2f}"
            if s in scores
            else "-"
            for s in (*SITES, "clean")
        ]
        change = (np.mean([scores[s]["tar"] for s in SITES]) - base) * 100
        lines.append(f"| {name} | {' | '.join(cells)} | {change:+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument(
        "--adabn-only",
        action="store_true",
        help="Measure only AdaBN and merge it into the last results.",
    )
    arguments = parser.parse_args()
    torch.set_num_threads(2)

    started, load = time.monotonic(), load_note()
    if arguments.adabn_only:
        report = json.loads((RESULTS / "ceiling.json").read_text())
        name = "AdaBN per site, whole network (each site's own pairs)"
        report["runs"][name] = _adabn_scores(arguments.scenario)
        (RESULTS / "ceiling.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / "ceiling.md").write_text(_markdown(report))
        print(_markdown(report))
        return
    runs = _runs(arguments.scenario)
    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": load,
        "seconds": time.monotonic() - started,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ceiling.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "ceiling.md").write_text(_markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
