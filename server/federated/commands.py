"""Commands this part adds to `facefed`: train, runs, and `eval federated`."""

import json
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from facefed.core.errors import ConfigurationError

runs_app = typer.Typer(help="Follow, cancel and promote federated training runs.")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add this part's commands to the root app and the `eval` group."""
    app.command("train")(train)
    app.add_typer(runs_app, name="runs")
    eval_app.command("federated")(eval_federated)
    eval_app.command("federated-scenario")(eval_federated_scenario)


def _config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigurationError(
            f"Cannot read the config file {path}: {error}"
        ) from error
    section = document.get("training", document)
    if not isinstance(section, dict):
        raise ConfigurationError(f"{path} has no [training] table.")
    return section


def train(
    site: Annotated[
        list[Path] | None,
        typer.Option("--site", help="A site folder (<site>/<identity>/<photo>.jpg)."),
    ] = None,
    sites: Annotated[
        int | None, typer.Option(help="Number of sites (checked against the folders).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    target_epsilon: Annotated[
        float | None, typer.Option(help="Per-site epsilon budget of the run.")
    ] = None,
    delta: Annotated[
        float | None, typer.Option(help="Delta of (epsilon, delta).")
    ] = None,
    trainable_blocks: Annotated[
        int | None, typer.Option(help="Top stages fine-tuned and shared.")
    ] = None,
    compat: Annotated[
        str | None, typer.Option(help="Backward-compatibility term: none or l2.")
    ] = None,
    central_dp: Annotated[
        str | None, typer.Option(help="Server-side DP wrapper: none or server-fixed.")
    ] = None,
    secure_aggregation: Annotated[
        str | None,
        typer.Option(
            help="none, or secaggplus: the server learns only the sites' average "
            "update (SecAgg+ settings: secagg-* keys in --config)."
        ),
    ] = None,
    parent_model: Annotated[
        Path | None, typer.Option(help="A published model folder to start from.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file with a \\[training] table (keys as in pyproject)."
        ),
    ] = None,
    federation: Annotated[
        str | None,
        typer.Option(
            help="Run on a deployed SuperLink named in $FLWR_HOME/config.toml."
        ),
    ] = None,
    detach: Annotated[bool, typer.Option(help="Start the run and return.")] = False,
) -> None:
    """Fine-tune the embedding model across sites with DP-SGD (Flower)."""
    from facefed.client.federated.config import TrainingConfig
    from facefed.server.federated.runs import new_run_id, runs_dir

    values = _config_file(config)
    site_dirs = [str(p) for p in site] if site else list(values.pop("sites", []))
    overrides = {
        "num-rounds": rounds,
        "target-epsilon": target_epsilon,
        "target-delta": delta,
        "trainable-blocks": trainable_blocks,
        "compat": compat,
        "central-dp": central_dp,
        "secure-aggregation": secure_aggregation,
        "parent-model": str(parent_model) if parent_model else None,
    }
    values |= {k: v for k, v in overrides.items() if v is not None}
    run_id = new_run_id()
    values["run-dir"] = str(runs_dir() / run_id)
    if federation is None:
        if not site_dirs:
            raise ConfigurationError("Give the site folders with --site or --config.")
        if sites is not None and sites != len(site_dirs):
            raise ConfigurationError(
                f"--sites {sites} but {len(site_dirs)} site folders were given."
            )
        for folder in site_dirs:
            if not Path(folder).is_dir():
                raise ConfigurationError(f"The site folder {folder} does not exist.")
        values["site-dirs"] = ",".join(str(Path(p).resolve()) for p in site_dirs)
        values.setdefault("min-sites", len(site_dirs))
    training = TrainingConfig.from_flower(values)

    typer.echo(f"run {run_id}")
    if federation is None:
        from facefed.server.federated.runner import start_simulation

        start_simulation(training, num_sites=len(site_dirs))
    else:
        from facefed.server.federated.runner import start_deployment

        process = start_deployment(
            training, superlink=federation, app_dir=_project_root()
        )
        (Path(training.run_dir) / "pid").write_text(str(process.pid))
    if not detach:
        _follow(run_id)


def _project_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise ConfigurationError(
            "Deployment runs need the facefed source tree (its pyproject.toml is the "
            "Flower app); run from a source checkout."
        )
    return root


def _follow(run_id: str) -> None:
    from rich.console import Console

    from facefed.server.federated.runs import run_info

    console = Console(stderr=True)
    last = -1
    with console.status("training...") as status:
        while True:
            info = run_info(run_id)
            progress = info.progress
            if progress.round != last:
                last = progress.round
                epsilon = ", ".join(f"{s} {e:.2f}" for s, e in progress.epsilon.items())
                status.update(f"round {last} done; epsilon {epsilon or '-'}")
            if progress.status != "running":
                break
            time.sleep(1.0)
    _print_run(info.run_id)
    if progress.status != "finished":
        raise typer.Exit(1)


def _print_run(run_id: str) -> None:
    from dataclasses import asdict

    from facefed.server.federated.runs import run_info

    typer.echo(json.dumps(asdict(run_info(run_id).progress), indent=1))


@runs_app.command("list")
def runs_list() -> None:
    """List training runs, newest first."""
    from facefed.server.federated.runs import list_runs

    for info in list_runs():
        progress = info.progress
        typer.echo(f"{info.run_id}  {progress.status:9}  round {progress.round}")


@runs_app.command("show")
def runs_show(run_id: str) -> None:
    """Show a run's progress: round, epsilon and held-out metrics per site."""
    _print_run(run_id)


@runs_app.command("cancel")
def runs_cancel(run_id: str) -> None:
    """Cancel a running training run."""
    from facefed.server.federated.runs import cancel_run

    cancel_run(run_id)
    typer.echo(f"cancelled {run_id}")


@runs_app.command("models")
def runs_models() -> None:
    """List published model versions."""
    from facefed.server.federated.runs import list_model_versions

    for version in list_model_versions():
        epsilon = version.summary.get("epsilon", {})
        typer.echo(f"{version.model_id}  run {version.run_id}  epsilon {epsilon}")


@runs_app.command("register")
def runs_register(model_id: str) -> None:
    """Register a published version with the model folder (for eval verify)."""
    from facefed.server.federated.runs import register_version

    path = register_version(model_id)
    typer.echo(f"registered {model_id}: {path}")
    typer.echo(
        f"evaluate: facefed eval verify --model {model_id} --pairs ... --root ..."
    )


@runs_app.command("promote")
def runs_promote(
    model_id: str,
    collection: Annotated[str, typer.Option(help="Collection to serve.")],
    force_new_gallery: Annotated[
        bool,
        typer.Option(
            help="Restart an empty collection on this model (refused with templates)."
        ),
    ] = False,
) -> None:
    """Make a published model version the model of a collection."""
    from facefed.server.federated.runs import promote

    serving = promote(model_id, collection, force_new_gallery=force_new_gallery)
    typer.echo(
        f"promoted {model_id} to collection {collection}; it now serves {serving} "
        "and still accepts templates of the models it served before "
        f"(GET /v1/collections/{collection} lists them)"
    )


def eval_federated(
    model: Annotated[Path, typer.Argument(help="A published model folder.")],
    site: Annotated[
        list[Path], typer.Option("--site", help="Folders with _heldout/pairs.csv.")
    ],
    out: Annotated[Path, typer.Option(help="Where the report goes.")] = Path(
        "federated-eval"
    ),
) -> None:
    """Compare a trained model with its parent on each site's held-out pairs."""
    from facefed.server.federated.evaluation import (
        compare_models,
        results_table,
        write_report,
    )

    results = compare_models(model, list(site))
    write_report(results, out)
    typer.echo(results_table(results))
    typer.echo(f"report: {out}/federated_eval.md, plot: {out}/federated_eval.png")


def eval_federated_scenario(
    out: Annotated[Path, typer.Argument(help="Folder to write the scenario into.")],
    shared_data: Annotated[Path, typer.Option(help="The shared data folder.")] = Path(
        "../shared/data"
    ),
    photos_per_site: Annotated[
        int, typer.Option(help="Training photos per site at most (0: all).")
    ] = 0,
    photos_per_identity: Annotated[
        int, typer.Option(help="Training photos per identity at most.")
    ] = 20,
    pairs_per_site: Annotated[
        int, typer.Option(help="Held-out pairs per site (600: the whole fold).")
    ] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the degradations.")] = 0,
) -> None:
    """Build the 3-site degraded-camera LFW scenario (see README)."""
    import numpy as np

    from facefed.server.federated.scenario import build_scenario

    scenario = build_scenario(
        shared_data,
        out,
        photos_per_site=photos_per_site,
        photos_per_identity=photos_per_identity,
        pairs_per_site=pairs_per_site,
        rng=np.random.default_rng(seed),
    )
    for folder in scenario.sites:
        typer.echo(f"site {folder}")
    typer.echo(f"clean {scenario.clean}")
