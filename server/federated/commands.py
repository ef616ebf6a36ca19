"""Commands this part adds to `facefed`: train, runs, and `eval federated`."""

import json
import subprocess
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from facefed.core.errors import ConfigurationError

if TYPE_CHECKING:
    from facefed.client.federated.config import TrainingConfig
    from facefed.server.federated.runner import RunProgress

runs_app = typer.Typer(help="Follow, cancel and promote federated training runs.")

# `facefed train` exits with 1 when its run failed and with this code when
# the run was cancelled (`facefed runs cancel`, the admin API, or Ctrl-C).
CANCELLED_EXIT_CODE = 13
DEPLOYMENT_SETTLE_S = 120.0


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add this part's commands to the root app and the `eval` group."""
    app.command("train")(train)
    app.add_typer(runs_app, name="runs")
    eval_app.command("federated")(eval_federated)
    eval_app.command("federated-scenario")(eval_federated_scenario)


def _config_file(path: Path | None) -> dict[str, Any]:
    from facefed.client.federated.config import training_table

    if path is None:
        return {}
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigurationError(
            f"Cannot read the config file {path}: {error}"
        ) from error
    return training_table(document, str(path))


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
    detach: Annotated[
        bool,
        typer.Option(
            help="Start the run in the background and return at once "
            "(follow it with `facefed runs show RUN`)."
        ),
    ] = False,
) -> None:
    """Fine-tune the embedding model across sites with DP-SGD (Flower).

    Exit codes: 0 finished, 1 failed, 2 refused before starting (bad options
    or site folders), 13 cancelled.
    """
    from facefed.client.federated.config import TrainingConfig
    from facefed.server.federated.runner import check_site_folders
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
        values["site-dirs"] = ",".join(str(Path(p).resolve()) for p in site_dirs)
        values.setdefault("min-sites", len(site_dirs))
    training = TrainingConfig.from_flower(values, kebab_case_errors=True)
    if federation is None:
        # After the settings, so that a bad option is named whatever the folders.
        check_site_folders(site_dirs)

    typer.echo(f"run {run_id}")
    process = _start(training, federation=federation, num_sites=len(site_dirs))
    if detach:
        typer.echo(
            f"started in the background; follow it with: facefed runs show {run_id} "
            f"(stop it with: facefed runs cancel {run_id})"
        )
        return
    _follow(run_id, process, federation=federation)


def _start(
    training: "TrainingConfig", *, federation: str | None, num_sites: int
) -> subprocess.Popen[bytes]:
    from facefed.server.federated.runner import launch_simulation, start_deployment

    if federation is None:
        return launch_simulation(training, num_sites=num_sites)
    process = start_deployment(training, superlink=federation, app_dir=_project_root())
    (Path(training.run_dir) / "pid").write_text(str(process.pid))
    return process


def _project_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise ConfigurationError(
            "Deployment runs need the facefed source tree (its pyproject.toml is the "
            "Flower app); run from a source checkout."
        )
    return root


def _follow(
    run_id: str, process: subprocess.Popen[bytes], *, federation: str | None
) -> None:
    from facefed.server.federated.runner import TRAINING_LOG
    from facefed.server.federated.runs import cancel_run, run_dir_of, run_info

    console = Console(stderr=True)
    console.print(f"Flower's and Ray's output: {run_dir_of(run_id) / TRAINING_LOG}")
    # `flwr run` may return while the deployed ServerApp still publishes.
    settle_s = 0.0 if federation is None else DEPLOYMENT_SETTLE_S
    try:
        progress = _watch(run_id, process, console, settle_s=settle_s)
    except KeyboardInterrupt:
        # The run has its own session, so Ctrl-C reaches only this command.
        cancel_run(run_id, reason="interrupted (Ctrl-C) in facefed train")
        progress = run_info(run_id).progress
    _print_run(run_id)
    if progress.status == "cancelled":
        console.print(f"run {run_id} was cancelled: {progress.error}")
        raise typer.Exit(CANCELLED_EXIT_CODE)
    if progress.status != "finished":
        console.print(f"run {run_id} failed: {progress.error}")
        raise typer.Exit(1)


def _watch(
    run_id: str, process: subprocess.Popen[bytes], console: Console, *, settle_s: float
) -> "RunProgress":
    from facefed.server.federated.runner import read_progress
    from facefed.server.federated.runs import run_dir_of, run_info

    last = -1
    exited_at: float | None = None
    with console.status("training...") as status:
        while True:
            # Reaping the child lets the run's state see that it has gone.
            if exited_at is None and process.poll() is not None:
                exited_at = time.monotonic()
            progress = run_info(run_id).progress
            if progress.round != last:
                last = progress.round
                epsilon = ", ".join(f"{s} {e:.2f}" for s, e in progress.epsilon.items())
                status.update(f"round {last} done; epsilon {epsilon or '-'}")
            if progress.status != "running":
                logged = read_progress(run_dir_of(run_id)).status != "running"
                settled = exited_at is None or time.monotonic() - exited_at >= settle_s
                if logged or settled:
                    return progress
            time.sleep(1.0)


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
