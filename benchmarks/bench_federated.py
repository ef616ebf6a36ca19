"""Federated training speed: a DP-SGD step against a plain SGD step, and one round.

Run: `.venv/bin/python -m benchmarks.bench_federated [--repeats N] [--skip-rounds]`.

1. Step cost. The same shared top of the dlib ResNet (the last 1 or 2
   stages) with a site's ArcFace cosine head (400 classes), on the same
   batch (64 or 256) of frozen-trunk features of real LFW chips
   (tests/data/lfw): one plain SGD step; one DP-SGD step as training runs
   it (one-backward clipping for the projection alone, Opacus ghost
   clipping for deeper tops, then Opacus' Gaussian noise); one step of
   Opacus' ghost clipping whatever the top; and one DP-SGD step with
   materialised per-sample gradients; in the same process, warmed up,
   timed in alternating order, median of `--repeats` (200: a step takes
   milliseconds, so a few repeats are at the mercy of the scheduler).
   Target: DP-SGD at most 2.5x slower.
2. Round time. Three sites of 200 training photos each (the degraded-camera
   LFW scenario, `facefed eval federated-scenario`, built in a temporary
   folder from ../shared/data with chips cached first), one round of
   training and federated evaluation (20 held-out pairs per site), on the
   simulation engine and on the deployment engine (SuperLink and three
   SuperNodes on loopback). The time is from the round's start to its
   evaluation in the server's progress log, so process start-up is excluded.

Writes benchmarks/results/federated.{json,md} and the federated section of
BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.report import load_note, replace_section

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("FACEFED_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_RATIO = 2.5
BATCHES = (64, 256)
CLASSES = 400
WARMUP = 5
MODES = ("plain", "dp", "dp_ghost", "dp_per_sample")
NOTE = (
    "The DP step used in training depends on the shared top. For the "
    "projection alone (the default) every per-sample gradient norm and the "
    "clipped sum come out of one backward pass (`client/federated/"
    "fast_clipping.py`, the book-keeping idea of Bu et al., 2023); deeper tops "
    'use Opacus\' ghost clipping (`grad_sample_mode="ghost"`, Li et al., '
    "2022), which runs the backward pass twice with closed-form norms "
    "(`client/federated/grad_samplers.py` for the head, stage5's "
    "convolutions and dlib's affine layers). Both hand the clipped sum to "
    "Opacus' optimiser, which adds the noise. Materialising per-sample "
    "gradients (Opacus' hooks mode, even with closed forms) costs batch x "
    "classes x 128 values for the head alone, and batch x 590k values for "
    "each 3x3 convolution of stage5."
)


def _features(blocks: int) -> tuple[Any, Any]:
    import numpy as np

    from facefed.client.federated.chips import pipeline_chip_fn
    from facefed.client.federated.model import SplitNetwork, load_network

    split = SplitNetwork(load_network(), trainable_blocks=blocks)
    chip_of = pipeline_chip_fn()
    chips = []
    for path in sorted((REPO / "tests" / "data" / "lfw").glob("*/*.jpg")):
        chip = chip_of(path)
        if chip is not None:
            chips.append(chip)
        if len(chips) == BATCHES[0]:
            break
    return split, split.trunk_features(np.stack(chips))


def _step_times(blocks: int, repeats: int, batch: int) -> dict[str, float]:
    import copy

    import torch

    split, all_features = _features(blocks)
    # The same real features repeated up to the batch size: timing does not
    # depend on the values, and both optimisers see the same batch.
    reps = -(-batch // len(all_features))
    features = all_features.repeat(reps, *[1] * (all_features.dim() - 1))[:batch]
    labels = torch.arange(batch) % CLASSES
    head_seed = torch.Generator().manual_seed(0)
    from facefed.client.federated.training import CosineClassifier

    head = CosineClassifier(128, CLASSES, generator=head_seed)
    steps = {
        mode: _stepper(mode, copy.deepcopy(split.top), copy.deepcopy(head), features)
        for mode in MODES
    }
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for step in steps.values():
        for _ in range(WARMUP):
            step(features, labels)
    for index in range(repeats):
        # Alternate which one goes first so drift in load hits both alike.
        order = MODES if index % 2 == 0 else MODES[::-1]
        for mode in order:
            start = time.perf_counter()
            steps[mode](features, labels)
            samples[mode].append(time.perf_counter() - start)
    results: dict[str, float] = {
        mode: statistics.median(values) for mode, values in samples.items()
    }
    results["ratio"] = results["dp"] / results["plain"]
    results["ratio_ghost"] = results["dp_ghost"] / results["plain"]
    results["ratio_per_sample"] = results["dp_per_sample"] / results["plain"]
    results["parameters"] = sum(p.numel() for p in split.top.parameters())
    results["batch"] = batch
    return results


def _stepper(
    mode: str, top: Any, head: Any, features: Any
) -> Callable[[Any, Any], None]:
    """One optimiser step of `mode` (see `MODES`) as a closure.

    All use the training loss (`SiteLoss`: ArcFace, no compat term) on the
    same layers: "plain" is SGD; "dp" is exactly what training runs
    (`dp_train`'s set-up: one-backward clipping for the projection alone,
    Opacus ghost clipping for deeper tops); "dp_ghost" is Opacus' ghost
    clipping whatever the top; "dp_per_sample" materialises per-sample
    gradients (Opacus' hooks mode with the closed forms of `grad_samplers`).
    """
    import warnings

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from facefed.client.federated import training
    from facefed.client.federated.config import TrainingConfig
    from facefed.client.federated.fast_clipping import projection_of

    config = TrainingConfig(max_grad_norm=1.0)
    model: torch.nn.Module = training._TopWithHead(top.train(), head)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9
    )
    labels_placeholder = torch.zeros(len(features), dtype=torch.long)
    loader = DataLoader(
        TensorDataset(features, labels_placeholder, labels_placeholder),
        batch_size=len(features),
    )
    targets = torch.zeros(len(features), 128)
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "dp" and projection_of(top) is not None:
            dp_step, _, _ = training._one_backward_dp(
                top, head, optimizer, loader, config, 1.0, generator
            )
        elif mode in ("dp", "dp_ghost"):
            dp_step, _, _ = training._ghost_dp(
                model, optimizer, loader, config, 1.0, generator
            )
            _check_closed_forms(model, ghost=True)
        elif mode == "dp_per_sample":
            dp_step = _per_sample_step(model, optimizer, loader, config)
        else:
            dp_step = _plain_step(model, optimizer, config)

    def step(batch: Any, labels: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_step(batch, labels, targets)

    return step


def _plain_step(model: Any, optimizer: Any, config: Any) -> Callable[..., float]:
    from facefed.client.federated.training import SiteLoss

    criterion = SiteLoss(config)

    def step(features: Any, labels: Any, targets: Any) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(*model(features), labels, targets)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _per_sample_step(
    model: Any, optimizer: Any, loader: Any, config: Any
) -> Callable[..., float]:
    from opacus import PrivacyEngine

    from facefed.client.federated.training import SiteLoss

    private_model, private_optimizer, _ = PrivacyEngine(secure_mode=False).make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode="hooks",
    )
    _check_closed_forms(private_model, ghost=False)
    criterion = SiteLoss(config)

    def step(features: Any, labels: Any, targets: Any) -> float:
        private_optimizer.zero_grad(set_to_none=True)
        loss = criterion(*private_model(features), labels, targets)
        loss.backward()
        private_optimizer.step()
        return float(loss.detach())

    return step


def _check_closed_forms(model: Any, *, ghost: bool) -> None:
    """Fail if a trained layer would fall back to Opacus' slow functorch path."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from facefed.client.federated import grad_samplers  # noqa: F401

    samplers = dict(GradSampleModule.GRAD_SAMPLERS)
    if ghost:
        samplers.update(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in samplers:
            raise RuntimeError(f"{name} ({type(module).__name__}) has no closed form")


def _scenario_sites(work: Path) -> list[Path]:
    import numpy as np

    from facefed.client.federated.chips import pipeline_chip_fn
    from facefed.client.federated.store import SiteDataStore
    from facefed.server.federated.scenario import build_scenario

    scenario = build_scenario(
        SHARED,
        work / "scenario",
        photos_per_site=200,
        photos_per_identity=6,
        pairs_per_site=20,
        rng=np.random.default_rng(0),
    )
    chip_of = pipeline_chip_fn()
    for site in scenario.sites:
        SiteDataStore(site).prepare(chip_of)
    return list(scenario.sites)


def _fresh_copies(sites: list[Path], target: Path) -> list[Path]:
    copies = []
    for site in sites:
        copy = target / site.name
        shutil.copytree(
            site, copy, ignore=shutil.ignore_patterns("ledger.json", "head.pt")
        )
        copies.append(copy)
    return copies


def _round_seconds(run_dir: Path) -> float:
    events = [json.loads(line) for line in (run_dir / "progress.jsonl").open()]
    start = next(e["time"] for e in events if e["event"] == "round-started")
    end = next(e["time"] for e in events if e["event"] == "round-evaluated")
    return end - start


def _simulation_round(sites: list[Path], work: Path) -> float:
    from facefed.client.federated.config import TrainingConfig
    from facefed.server.federated.runner import start_simulation

    run_dir = work / "sim-run"
    config = TrainingConfig(
        num_rounds=1,
        site_dirs=tuple(map(str, sites)),
        min_sites=3,
        run_dir=str(run_dir),
        round_timeout=900,
    )
    process = start_simulation(config, num_sites=3)
    process.join(timeout=1200)
    if process.is_alive():
        process.kill()
        raise RuntimeError("the simulation round did not finish in 1200 s")
    return _round_seconds(run_dir)


def _deployment_round(sites: list[Path], work: Path) -> float:
    from facefed.client.federated.config import TrainingConfig
    from facefed.server.federated.deployment import CONNECTION, local_federation
    from facefed.server.federated.runner import read_progress, start_deployment

    run_dir = work / "dep-run"
    config = TrainingConfig(
        num_rounds=1, min_sites=3, run_dir=str(run_dir), round_timeout=900
    )
    with local_federation(sites, work / "federation") as federation:
        flwr = start_deployment(
            config, superlink=CONNECTION, app_dir=REPO, flwr_home=federation.flwr_home
        )
        try:
            flwr.wait(timeout=1200)
        finally:
            if flwr.poll() is None:
                flwr.kill()
        deadline = time.monotonic() + 300
        while (
            read_progress(run_dir).status == "running" and time.monotonic() < deadline
        ):
            time.sleep(1)
    return _round_seconds(run_dir)


def _markdown(results: dict, note: str) -> str:
    lines = [
        f"Measured {results['when']} on {results['machine']}; torch with 1 thread; "
        f"{note}",
        "",
        "| shared layers | parameters | batch | plain SGD step | DP-SGD step "
        "(used in training) | DP / plain | Opacus ghost clipping | ghost / plain "
        "| DP-SGD, per-sample gradients | per-sample / plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for step in results["steps"]:
        lines.append(
            f"| last {step['blocks']} stage(s) | {step['parameters']:,} "
            f"| {step['batch']} | {step['plain'] * 1000:.1f} ms "
            f"| {step['dp'] * 1000:.1f} ms | **{step['ratio']:.2f}x** "
            f"| {step['dp_ghost'] * 1000:.1f} ms | {step['ratio_ghost']:.2f}x "
            f"| {step['dp_per_sample'] * 1000:.1f} ms "
            f"| {step['ratio_per_sample']:.1f}x |"
        )
    lines += [
        "",
        f"Frozen-trunk features of real LFW chips (tests/data/lfw), ArcFace "
        f"cosine head of {CLASSES} classes (a scenario site has 300-450), the "
        "training loss (`SiteLoss`); the four steps are built from the same "
        f"weights, warmed up {WARMUP} times, then timed in alternating order, "
        f"median of {results['repeats']}. Target: DP-SGD at most "
        f"{TARGET_RATIO}x slower than plain SGD on the same layers.",
        "",
        NOTE,
    ]
    rounds = results.get("rounds")
    if rounds:
        lines += [
            "",
            "| engine | one round, 3 sites x 200 photos (train + evaluate) |",
            "| --- | ---: |",
        ]
        for engine, seconds in rounds.items():
            lines.append(f"| {engine} | {seconds:.1f} s |")
        lines += [
            "",
            "Round time from the server's round start to the sites' evaluation "
            "replies (chips cached; trunk features computed in the round); "
            f"measured {results.get('rounds_when', results['when'])}.",
        ]
    return "\n".join(lines)


def _keep_previous_rounds(results: dict[str, Any]) -> None:
    """With --skip-rounds, carry the last measured round times (and their date)."""
    previous_file = RESULTS / "federated.json"
    if not previous_file.exists():
        return
    previous = json.loads(previous_file.read_text())
    if previous.get("rounds"):
        results["rounds"] = previous["rounds"]
        results["rounds_when"] = previous.get("rounds_when", previous["when"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--skip-rounds", action="store_true")
    parser.add_argument(
        "--load-note",
        default=load_note(),
        help="How busy the machine was (default: its measured load average).",
    )
    arguments = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    results: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    results["repeats"] = arguments.repeats
    results["steps"] = []
    # Two stages: per-sample convolution gradients, one batch size is enough.
    for blocks, batch in [(1, b) for b in BATCHES] + [(2, BATCHES[0])]:
        step = {"blocks": blocks, **_step_times(blocks, arguments.repeats, batch)}
        results["steps"].append(step)
        print(f"last {blocks} stage(s), batch {batch}: {step}", flush=True)
    if not arguments.skip_rounds and SHARED.is_dir():
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            sites = _scenario_sites(work)
            results["rounds"] = {
                "simulation": _simulation_round(_fresh_copies(sites, work / "a"), work),
                "deployment": _deployment_round(_fresh_copies(sites, work / "b"), work),
            }
            results["rounds_when"] = results["when"]
            print(f"rounds: {results['rounds']}", flush=True)
    else:
        _keep_previous_rounds(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federated.json").write_text(json.dumps(results, indent=1))
    text = _markdown(results, arguments.load_note)
    (RESULTS / "federated.md").write_text(text + "\n")
    replace_section("federated", "## Federated training\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
