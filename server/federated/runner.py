"""Starting training runs: the simulation engine in a child process, or `flwr run`.

A run always executes outside the caller's process, so a crash or a cancel
never takes the CLI or the API server down: `start_simulation` forks a
child that runs Flower's simulation engine with facefed's ServerApp and
ClientApp, and `launch_simulation` starts the same in a process of its own
session that outlives its caller (``facefed train``); `start_deployment`
runs ``flwr run`` against a SuperLink named in ``$FLWR_HOME/config.toml``.
All write progress into the run folder (`strategy.RunLog`), which
`read_progress` parses. `check_site_folders` refuses unusable site folders
before any of them starts.
"""

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.store import site_folder_problems
from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
TERMINAL_EVENTS = {
    "run-finished": "finished",
    "run-failed": "failed",
    "run-cancelled": "cancelled",
}
RUN_CONFIG_FILE = "run-config.json"
TRAINING_LOG = "training.log"


def check_site_folders(site_dirs: Sequence[str | Path]) -> None:
    """Refuse site folders a run could not train or evaluate on, before it starts.

    Only for runs where the server is given the folders (the simulation
    engine): a deployed SuperNode owns its folder and its own checks.

    Raises:
        ConfigurationError: One or more folders are unusable; the message has
            one line per problem.
    """
    problems = [line for folder in site_dirs for line in site_folder_problems(folder)]
    if len(problems) == 1:
        raise ConfigurationError(problems[0])
    if problems:
        raise ConfigurationError(
            "Some site folders cannot take part in the run; nothing was started:\n"
            + "\n".join(f"- {line}" for line in problems)
        )


def quiet_flower_env() -> None:
    """Turn off Flower's telemetry and update check and Ray's usage stats."""
    os.environ.update(QUIET_FLOWER_ENV)


def simulate(
    config: TrainingConfig, *, num_sites: int, cpus_per_site: float = 1.0
) -> None:
    """Run a whole training run on Flower's simulation engine, in this process.

    Args:
        config: The run's configuration; `site_dirs` names one folder per site.
        num_sites: Simulated SuperNodes (must equal the number of site folders).
        cpus_per_site: CPU share Ray reserves for each simulated site.

    Raises:
        ConfigurationError: The site folders and `num_sites` disagree.
    """
    if len(config.site_dirs) != num_sites:
        raise ConfigurationError(
            f"{num_sites} sites asked for, but {len(config.site_dirs)} site folders "
            "given."
        )
    quiet_flower_env()
    # FIXME: Flower 1.42 deprecates run_simulation in favour of `flwr run`
    # with a local simulation SuperLink; it still works and lets the apps take
    # the config object directly, but will have to move when Flower drops it.
    from flwr.simulation import run_simulation

    from facefed.client.federated.app import app as client_app
    from facefed.server.federated.app import make_server_app

    run_simulation(
        server_app=make_server_app(config),
        client_app=client_app,
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": max(1, os.cpu_count() or 1),
                "log_to_driver": True,
            },
        },
    )


def _simulate_child(config_json: str, num_sites: int) -> None:
    config = TrainingConfig.from_flower(json.loads(config_json))
    try:
        simulate(config, num_sites=num_sites)
    except BaseException as error:
        _write_failure(Path(config.run_dir), error)
        raise


def _write_failure(run_dir: Path, error: BaseException) -> None:
    # A cancel, or the ServerApp itself, may have said why the run ended; the
    # exception seen here (often SystemExit from a signal) would say less.
    if read_progress(run_dir).status != "running":
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    message = str(error) or type(error).__name__
    with open(run_dir / "progress.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "run-failed", "error": message[:500]}) + "\n")


def start_simulation(config: TrainingConfig, *, num_sites: int) -> BaseProcess:
    """Start `simulate` in a child process and return it (already running)."""
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=_simulate_child,
        args=(json.dumps(config.to_flower()), num_sites),
        name=f"facefed-train-{Path(config.run_dir).name}",
    )
    process.start()
    (Path(config.run_dir) / "pid").write_text(str(process.pid))
    return process


def launch_simulation(
    config: TrainingConfig, *, num_sites: int
) -> subprocess.Popen[bytes]:
    """Start `simulate` in a process of its own session and return it.

    Unlike `start_simulation`, the run outlives the caller (the caller's exit
    neither waits for it nor stops it: ``facefed train --detach``), a
    terminal's Ctrl-C does not reach it, and Flower's and Ray's output goes
    to ``<run>/training.log``. `runs.cancel_run` stops it.
    """
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(config.to_flower()))
    log = open(run_dir / TRAINING_LOG, "ab")  # noqa: SIM115 - the child's output
    command = [sys.executable, "-m", __name__, str(run_dir), str(num_sites)]
    try:
        # This interpreter and module, with arguments built here.
        process = subprocess.Popen(  # noqa: S603
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    (run_dir / "pid").write_text(str(process.pid))
    return process


def start_deployment(
    config: TrainingConfig,
    *,
    superlink: str,
    app_dir: Path,
    flwr_home: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Submit the run with ``flwr run`` to a SuperLink named in FLWR_HOME's config.

    Args:
        config: The run's configuration (passed as ``--run-config`` overrides).
        superlink: The connection's name in ``$FLWR_HOME/config.toml``.
        app_dir: The Flower app folder (the facefed project root).
        flwr_home: FLWR_HOME for the ``flwr`` CLI; the environment's otherwise.
    """
    run_config = " ".join(
        f"{key}={json.dumps(value)}"
        for key, value in config.to_flower().items()
        if key != "site-dirs"
    )
    env = {**os.environ, **QUIET_FLOWER_ENV}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    command = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        str(app_dir),
        superlink,
        "--run-config",
        run_config,
        "--stream",
    ]
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(config.run_dir) / "flwr-run.log", "wb")  # noqa: SIM115
    # The command is built here from a fixed executable and validated config.
    # Its own session: a detached run survives the terminal it came from.
    return subprocess.Popen(  # noqa: S603
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@dataclass(frozen=True)
class RunProgress:
    """What a run folder says about its run.

    Attributes:
        status: ``running``, ``finished``, ``failed`` or ``cancelled``.
        round: Last round trained (0 before the first).
        epsilon: Latest epsilon per site.
        metrics: Latest evaluation metrics per site.
        model_dir: The published model folder once finished.
        error: Why it failed or was cancelled, when it was.
    """

    status: str
    round: int
    epsilon: dict[str, float]
    metrics: dict[str, dict[str, float]]
    model_dir: str | None
    error: str | None


def read_progress(run_dir: Path) -> RunProgress:
    """Parse a run folder's progress log.

    The first event that ends the run decides its status: a cancelled run
    stays cancelled whatever its dying processes write afterwards.
    """
    status, last_round, model_dir, error = "running", 0, None, None
    epsilon: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    path = run_dir / "progress.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        event = json.loads(line)
        kind = event.get("event")
        if kind == "round-trained":
            last_round = int(event["round"])
            for site, values in event["sites"].items():
                epsilon[site] = float(values["epsilon"])
        elif kind == "round-evaluated":
            metrics = event["sites"]
        elif kind in TERMINAL_EVENTS and status == "running":
            status, error = TERMINAL_EVENTS[kind], event.get("error")
            model_dir = event.get("model_dir")
    return RunProgress(status, last_round, epsilon, metrics, model_dir, error)


def _main(arguments: list[str]) -> None:
    # The entry point of `launch_simulation`'s process.
    run_dir, num_sites = Path(arguments[0]), int(arguments[1])
    config_json = (run_dir / RUN_CONFIG_FILE).read_text()
    _simulate_child(config_json, num_sites)


if __name__ == "__main__":
    _main(sys.argv[1:])
