"""Training rounds through Flower's SecAgg+ protocol, inside the Message-API run.

With ``secure-aggregation = "secaggplus"`` the server never sees one site's
update. Each site masks its quantised update with pairwise masks (agreed
with the other sites by Diffie-Hellman) and a private mask, and
secret-shares the seeds of both among the sites (Shamir); the server sums
the masked vectors, asks the surviving sites for the shares that remove the
masks (or rebuild a dropped site's pairwise masks), and obtains only the
sum (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020; Bonawitz et al., CCS 2017).

In Flower 1.42 the protocol exists only as the older workflow API:
`SecAggPlusWorkflow` drives one round's four stages on a `Grid` and hands
the unmasked sum to a legacy `flwr.server.strategy.Strategy`. This module
runs it as the training step of each round and keeps everything else on
the Message API: `FacefedFedAvg` still samples the sites, checks the
dropout rule, records per-site metrics and drives federated evaluation.

What a site sends in a SecAgg+ round, and so all the server receives:
public keys (stage setup), share ciphertexts for other sites (share keys),
the masked integer vector, its sample count and its scalar metrics in the
clear (collect masked vectors), and the mask shares of the other sites
(unmask). The update itself is the change a round made to the shared
layers, so that a small clipping range quantises it finely.
"""

import logging
from collections.abc import Iterable
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.grid.grid import Run

from facefed.client.federated.config import TrainingConfig
from facefed.server.federated.strategy import FacefedFedAvg, RunLog

logger = logging.getLogger(__name__)

SHARED_NAMES_KEY = "shared-names"
"""Fit config key naming the shared arrays, in the order legacy Parameters hold."""


def make_workflow(config: TrainingConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the run's shares, threshold and ranges.

    Flower's default quantisation (2**22 levels, masks modulo 2**32) is kept:
    sums of up to 1,024 sites cannot overflow.
    """
    num_shares: int | float = config.secagg_num_shares or 1.0
    return SecAggPlusWorkflow(
        num_shares=num_shares,
        reconstruction_threshold=config.secagg_threshold,
        max_weight=config.secagg_max_weight,
        clipping_range=config.secagg_clipping_range,
        timeout=config.round_timeout,
    )


def run_secure_rounds(
    grid: Grid,
    strategy: FacefedFedAvg,
    *,
    config: TrainingConfig,
    initial_arrays: ArrayRecord,
    run_config: ConfigRecord,
) -> ArrayRecord:
    """Run every round: SecAgg+ training, then federated evaluation.

    Args:
        grid: The grid to the sites.
        strategy: Samples sites, applies the dropout rule, records metrics.
        config: The run's configuration (SecAgg+ on).
        initial_arrays: The parent model's shared layers.
        run_config: The flat run config sent to the sites.

    Returns:
        The shared layers after the last round.
    """
    workflow = make_workflow(config)
    audited = AuditedGrid(grid, strategy.run_log)
    arrays = initial_arrays
    for server_round in range(1, config.num_rounds + 1):
        logger.info("Round %d/%d (SecAgg+)", server_round, config.num_rounds)
        trained = _train_round(
            audited,
            strategy,
            workflow,
            server_round=server_round,
            arrays=arrays,
            run_config=run_config,
        )
        if trained is not None:
            arrays = trained

        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, run_config, grid),
            timeout=config.round_timeout,
        )
        strategy.aggregate_evaluate(server_round, replies)
    return arrays


def _train_round(
    grid: Grid,
    strategy: FacefedFedAvg,
    workflow: SecAggPlusWorkflow,
    *,
    server_round: int,
    arrays: ArrayRecord,
    run_config: ConfigRecord,
) -> ArrayRecord | None:
    names = list(arrays.keys())
    messages = list(strategy.configure_train(server_round, arrays, run_config, grid))
    bridge = _RoundBridge(_fit_instructions(grid, messages, arrays, names))

    workflow(grid, _legacy_context(grid, bridge, server_round))

    if bridge.results is None:
        strategy.skip_round(server_round, "train", replied=0)
        return None
    sites = {_site_name(proxy, res): _metrics(res) for proxy, res in bridge.results}
    if not strategy.enough_replies(server_round, "train", replied=len(sites)):
        return None
    strategy.record_train_sites(server_round, sites, dropped=len(messages) - len(sites))
    return _apply_average_update(arrays, names, bridge.average_update)


def _fit_instructions(
    grid: Grid, messages: list[Message], arrays: ArrayRecord, names: list[str]
) -> list[tuple[ClientProxy, FitIns]]:
    state = arrays.to_torch_state_dict()
    parameters = ndarrays_to_parameters([state[name].numpy() for name in names])
    instructions: list[tuple[ClientProxy, FitIns]] = []
    for message in messages:
        fit_config = cast(dict[str, Scalar], dict(message.content["config"]))
        fit_config[SHARED_NAMES_KEY] = ",".join(names)
        proxy = GridClientProxy(message.metadata.dst_node_id, grid, grid.run.run_id)
        instructions.append((proxy, FitIns(parameters, fit_config)))
    return instructions


def _legacy_context(
    grid: Grid, bridge: "_RoundBridge", server_round: int
) -> LegacyContext:
    # The workflow reads the round number and the current parameters from the
    # context's state; the parameters it reads are the bridge's own.
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord(
                {WorkflowKey.CURRENT_ROUND: server_round}
            ),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = Context(
        run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}
    )
    return LegacyContext(context, strategy=bridge)


def _site_name(proxy: ClientProxy, result: FitRes) -> str:
    return str(result.metrics.get("site", f"node-{proxy.cid}"))


def _metrics(result: FitRes) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in result.metrics.items()
        if isinstance(value, int | float)
    }


def _apply_average_update(
    arrays: ArrayRecord, names: list[str], average_update: Parameters | None
) -> ArrayRecord:
    if average_update is None:
        return arrays
    state = arrays.to_torch_state_dict()
    updates = parameters_to_ndarrays(average_update)
    new_state = {}
    for name, update in zip(names, updates, strict=True):
        current = state[name]
        change = torch.from_numpy(np.asarray(update)).to(current.dtype)
        new_state[name] = current + change.reshape(current.shape)
    return ArrayRecord(new_state)


class _RoundBridge(LegacyStrategy):
    """The legacy strategy one SecAgg+ round talks to.

    It hands the workflow the fit instructions `FacefedFedAvg` prepared, and
    takes back what the workflow unmasked: the sample-weighted average
    update (identical in every result, since no individual update exists on
    the server) with each site's clear-text metrics.
    """

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.average_update: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: the Message-API run holds the model."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The instructions prepared for this round."""
        return self.instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the unmasked average and the sites' metrics."""
        self.results = results
        self.average_update = results[0][1].parameters if results else None
        return self.average_update, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Unused: evaluation stays on the Message API."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Unused: evaluation stays on the Message API."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Unused: there is no server-side evaluation."""
        return None


class AuditedGrid(Grid):
    """A grid that records every SecAgg+ reply in the run's message log.

    The workflow receives its replies inside its own stages; wrapping the
    grid is how the audit log still shows all the server received.

    Args:
        grid: The run's grid.
        run_log: Where the replies' keys, shapes and types are written.
    """

    def __init__(self, grid: Grid, run_log: RunLog) -> None:
        self.grid = grid
        self.run_log = run_log

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send one stage's messages and record the replies."""
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if messages:
            phase = f"train:{_stage_of(messages[0])}"
            server_round = int(messages[0].metadata.group_id or 0)
            for reply in replies:
                self.run_log.received(server_round, phase, reply)
        return replies

    def set_run(self, run: Run) -> None:
        """Delegated to the run's grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The run's information."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated to the run's grid."""
        return self.grid.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """Delegated to the run's grid."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated to the run's grid (the workflow only sends and receives)."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated to the run's grid (the workflow only sends and receives)."""
        return self.grid.pull_messages(message_ids)


def _stage_of(message: Message) -> str:
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "unknown")) if configs else "unknown"
