"""The Flower ServerApp of a facefed training run (Message API).

It reads the run's `TrainingConfig` from Flower's run config
(``[tool.flwr.app.config]`` in pyproject.toml, or ``flwr run --run-config``),
sends the shared top of the embedding network to the sites, aggregates
their DP-trained updates with `FacefedFedAvg`, and publishes the result as a
model version (`publish.publish_run`). With ``secure-aggregation =
"secaggplus"`` the training step of every round runs through Flower's
SecAgg+ protocol instead (`secure_aggregation.run_secure_rounds`), so the
server only learns the sites' average update.
"""

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import SplitNetwork, load_network
from facefed.core.errors import ConfigurationError, FacefedError
from facefed.server.federated.publish import publish_run
from facefed.server.federated.secure_aggregation import run_secure_rounds
from facefed.server.federated.strategy import FacefedFedAvg, RunLog

logger = logging.getLogger(__name__)


def run_training(grid: Grid, config: TrainingConfig) -> Path:
    """Drive a whole training run on a Flower grid and publish its model.

    Args:
        grid: The grid to the sites' SuperNodes (simulated or deployed).
        config: The run's configuration; `run_dir` must be set.

    Returns:
        The folder of the published model version.

    Raises:
        ConfigurationError: The configuration has no run folder.
    """
    if not config.run_dir:
        raise ConfigurationError("The training config needs a run_dir.")
    run_log = RunLog(Path(config.run_dir))
    run_log.event("run-started", config=config.to_flower())
    started = time.monotonic()

    network = load_network(config.parent_model)
    split = SplitNetwork(network, trainable_blocks=config.trainable_blocks)
    parent_arrays = ArrayRecord(split.shared_state())
    strategy = FacefedFedAvg(
        run_log=run_log,
        parent_arrays=parent_arrays,
        min_fit_fraction=config.min_fit_fraction,
        min_sites=config.min_sites,
    )
    final_arrays = _run_rounds(
        grid, strategy, config, ArrayRecord(split.shared_state())
    )

    if not strategy.site_train:
        error = _no_round_error(run_log)
        run_log.event("run-failed", error=error)
        raise FacefedError(error)
    split.load_shared_state(final_arrays.to_torch_state_dict())
    model_dir = publish_run(
        network,
        config=config,
        site_train=strategy.site_train,
        site_evaluate=strategy.site_evaluate,
        shared_names=sorted(split.shared_state()),
    )
    run_log.event(
        "run-finished", model_dir=str(model_dir), seconds=time.monotonic() - started
    )
    logger.info("Training run finished; model published in %s", model_dir)
    return model_dir


def _no_round_error(run_log: RunLog) -> str:
    reasons = sorted(run_log.site_errors())
    why = (
        "".join(f"\n- {reason}" for reason in reasons)
        if reasons
        else " No site reported an error (too few sites connected?)."
    )
    return (
        "No training round could be aggregated: too few sites replied in every "
        f"round.{why}\nAll replies: {run_log.messages_path}"
    )


def _run_rounds(
    grid: Grid,
    strategy: FacefedFedAvg,
    config: TrainingConfig,
    initial_arrays: ArrayRecord,
) -> ArrayRecord:
    flat = config.to_flower()
    if config.secure_aggregation == "secaggplus":
        logger.info(
            "SecAgg+ on: the server only learns the sites' average update "
            "(threshold %d, clipping range %g)",
            config.secagg_threshold,
            config.secagg_clipping_range,
        )
        return run_secure_rounds(
            grid,
            strategy,
            config=config,
            initial_arrays=initial_arrays,
            run_config=ConfigRecord(dict(flat)),
        )
    result = _with_central_dp(strategy, config).start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=config.num_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord(dict(flat)),
        evaluate_config=ConfigRecord(dict(flat)),
    )
    return result.arrays


def _with_central_dp(strategy: FacefedFedAvg, config: TrainingConfig) -> FlowerStrategy:
    if config.central_dp == "none":
        return strategy
    logger.info(
        "Central DP on: server-side fixed clipping at %g, noise multiplier %g",
        config.central_clipping_norm,
        config.central_noise_multiplier,
    )
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=config.central_noise_multiplier,
        clipping_norm=config.central_clipping_norm,
        num_sampled_clients=config.min_sites,
    )


def make_server_app(config: TrainingConfig | None = None) -> ServerApp:
    """A ServerApp running `run_training`; `config` overrides Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or TrainingConfig.from_flower(dict(context.run_config))
        if not run_config.run_dir:
            run_config = run_config.replace(
                run_dir=str(Path.cwd() / "facefed-runs" / str(context.run_id))
            )
        run_training(grid, run_config)

    return server_app


app = make_server_app()
