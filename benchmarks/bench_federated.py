"""Federated training speed: a DP-SGD step against a plain SGD step, and one round.

Run: `.venv/bin/python -m benchmarks.bench_federated [--repeats N] [--skip-rounds]`.

1. Step cost. The same shared top of the dlib ResNet (the last 1 or 2
   stages) with a site's ArcFace cosine head, on the same batch of 64
   frozen-trunk features of real LFW chips (tests/data/lfw): one Opacus
   DP-SGD step (per-sample gradients, clipping, Gaussian noise) against one
   plain SGD step, in the same process, median of `--repeats`.
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
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
SECTIONS = ("detection", "embedding", "liveness", "gallery", "privacy", "federated")
SHARED = Path(os.environ.get("FACEFED_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_RATIO = 2.5
BATCH = 64
NOTE = (
    "Opacus adds a fixed cost per step (hooks, per-sample norms, clipping, noise "
    "for every parameter) that dominates when the plain step takes about a "
    "millisecond (the default shared layer); with two stages the per-sample "
    "gradients of the 256x256 3x3 convolutions (64 x 590k values each) dominate."
)


def _features(blocks: int):
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
        if len(chips) == BATCH:
            break
    return split, split.trunk_features(np.stack(chips))


def _step_times(blocks: int, repeats: int) -> dict[str, float]:
    import copy
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from facefed.client.federated import grad_samplers  # noqa: F401
    from facefed.client.federated.training import CosineClassifier

    split, features = _features(blocks)
    labels = torch.arange(BATCH) % 16
    generator = torch.Generator().manual_seed(0)
    results = {}
    for mode in ("plain", "dp"):
        top = copy.deepcopy(split.top).train()
        head = CosineClassifier(128, 16, generator=generator)
        model = torch.nn.ModuleDict({"top": top, "head": head})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def forward(module, batch):
            return module["head"](module["top"](batch))

        if mode == "dp":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine = PrivacyEngine(secure_mode=False)
                loader = DataLoader(TensorDataset(features, labels), batch_size=BATCH)
                model, optimizer, _ = engine.make_private(
                    module=model,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                    poisson_sampling=False,
                )

            def forward(module, batch):
                inner = module._module
                return inner["head"](inner["top"](batch))

        results[mode] = _median_step(
            model, optimizer, forward, features, labels, repeats
        )
    results["ratio"] = results["dp"] / results["plain"]
    results["parameters"] = sum(p.numel() for p in split.top.parameters())
    return results


def _median_step(model, optimizer, forward, features, labels, repeats: int) -> float:
    import warnings

    from facefed.client.federated.training import arcface_loss

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = arcface_loss(forward(model, features), labels, scale=32.0, margin=0.3)
        loss.backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _scenario_sites(work: Path) -> list[Path]:
    import numpy as np

    from facefed.client.federated.chips import pipeline_chip_fn
    from facefed.client.federated.store import SiteDataStore
    from facefed.server.federated.scenario import build_scenario

    scenario = build_scenario(
        SHARED,
        work / "scenario",
        photos_per_site=200,
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
        "| shared layers | parameters | plain SGD step | DP-SGD step | DP / plain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for blocks, step in results["steps"].items():
        lines.append(
            f"| last {blocks} stage(s) | {step['parameters']:,} "
            f"| {step['plain'] * 1000:.1f} ms | {step['dp'] * 1000:.1f} ms "
            f"| {step['ratio']:.2f}x |"
        )
    lines += [
        "",
        f"Batch {BATCH} of frozen-trunk features of real LFW chips, ArcFace cosine "
        f"head of 16 classes. Target: DP-SGD at most {TARGET_RATIO}x slower than "
        "plain SGD on the same layers.",
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
            "replies (chips cached; trunk features computed in the round).",
        ]
    return "\n".join(lines)


def update_benchmarks_md(section_text: str) -> None:
    if BENCHMARKS_MD.exists():
        text = BENCHMARKS_MD.read_text()
    else:
        text = "# Benchmarks\n\n" + "".join(
            f"<!-- section: {name} -->\n\n" for name in SECTIONS
        )
    marker = "<!-- section: federated -->"
    if marker not in text:
        text += f"\n{marker}\n\n"
    start = text.index(marker) + len(marker)
    following = re.search(r"<!-- section: ", text[start:])
    end = start + following.start() if following else len(text)
    body = "\n\n## Federated training\n\n" + section_text + "\n\n"
    BENCHMARKS_MD.write_text(text[:start] + body + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-rounds", action="store_true")
    parser.add_argument(
        "--load-note",
        default="8 engineers shared the machine's 2 cores while this ran.",
    )
    arguments = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    results: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "steps": {},
    }
    for blocks in (1, 2):
        results["steps"][blocks] = _step_times(blocks, arguments.repeats)
        print(f"last {blocks} stage(s): {results['steps'][blocks]}", flush=True)
    if not arguments.skip_rounds and SHARED.is_dir():
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            sites = _scenario_sites(work)
            results["rounds"] = {
                "simulation": _simulation_round(_fresh_copies(sites, work / "a"), work),
                "deployment": _deployment_round(_fresh_copies(sites, work / "b"), work),
            }
            print(f"rounds: {results['rounds']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federated.json").write_text(json.dumps(results, indent=1))
    text = _markdown(results, arguments.load_note)
    (RESULTS / "federated.md").write_text(text + "\n")
    update_benchmarks_md(text)
    print(text)


if __name__ == "__main__":
    main()
