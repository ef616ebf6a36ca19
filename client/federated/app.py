"""The Flower ClientApp of a site (Message API): local DP training and evaluation.

Each message carries the run's configuration in its ConfigRecord ``config``
and the shared layers in its ArrayRecord ``arrays`` (evaluation messages also
carry the parent model's shared layers in ``parent-arrays``). A reply holds
only the updated shared arrays (training), scalar metrics, and the site's
name: no chip, embedding, identity or head ever goes back.

The site folder comes from the SuperNode's node config: ``site-dir`` on a
deployed SuperNode, or ``partition-id`` indexing the run's ``site-dirs`` in
simulation.

The same app serves SecAgg+ runs (``secure-aggregation = "secaggplus"``):
Flower's `secaggplus_mod` runs the protocol's stages at the site, and the
training round inside it arrives in Flower's legacy fit format
(``fitins.*`` records, arrays named by ``shared-names``); the site then
replies with its *change* to the shared layers, which the mod quantises and
masks before anything leaves. See `server/federated/secure_aggregation.py`.
"""

import json
import logging
import threading

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.site import SiteRuntime
from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

LEGACY_FIT_CONFIG = "fitins.config"
"""The record a legacy fit instruction (SecAgg+ rounds) carries its config in."""


def secure_aggregation_mod(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Run Flower's SecAgg+ mod on SecAgg+ messages only.

    `secaggplus_mod` passes evaluation messages through, but takes every
    training message for a SecAgg+ stage and fails on one without its
    ``secaggplus_configs`` record; plain training rounds bypass it here.
    """
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


app = ClientApp(mods=[secure_aggregation_mod])

_RUNTIMES: dict[tuple[str, str], SiteRuntime] = {}
_LOCK = threading.Lock()


def site_dir_of(context: Context, config: TrainingConfig) -> str:
    """The site folder this SuperNode trains on.

    Raises:
        ConfigurationError: The node config names no site folder.
    """
    node = context.node_config
    if "site-dir" in node:
        return str(node["site-dir"])
    if "partition-id" in node and config.site_dirs:
        index = int(node["partition-id"])
        if not 0 <= index < len(config.site_dirs):
            raise ConfigurationError(
                f"partition-id {index} has no site folder; the run lists "
                f"{len(config.site_dirs)}."
            )
        return config.site_dirs[index]
    raise ConfigurationError(
        "This SuperNode has no site folder: start it with --node-config "
        "'site-dir=\"/path/to/site\"'."
    )


def _arrays(message: Message, key: str) -> dict[str, torch.Tensor]:
    record = message.content[key]
    if not isinstance(record, ArrayRecord):
        raise ConfigurationError(f"The message's {key!r} record holds no arrays.")
    return record.to_torch_state_dict()


def _runtime(flat_config: ConfigRecord, context: Context) -> SiteRuntime:
    config = TrainingConfig.from_flower(dict(flat_config))
    site_dir = site_dir_of(context, config)
    site_id = str(context.node_config.get("site-id", ""))
    key = (site_dir, json.dumps(config.to_flower(), sort_keys=True) + site_id)
    with _LOCK:
        if key not in _RUNTIMES:
            _RUNTIMES.clear()
            _RUNTIMES[key] = SiteRuntime(site_dir, config, site_id=site_id)
        return _RUNTIMES[key]


@app.train()
def train(message: Message, context: Context) -> Message:
    """Fine-tune the shared layers on this site's faces for one round."""
    if LEGACY_FIT_CONFIG in message.content:
        return _train_for_secure_aggregation(message, context)
    runtime = _runtime(message.content.config_records["config"], context)
    shared = _arrays(message, "arrays")
    server_round = int(str(message.content["config"]["server-round"]))
    updated, metrics = runtime.train_round(
        shared, run_id=str(message.metadata.run_id), server_round=server_round
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(updated),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site": runtime.site_id}),
        }
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the model on this site's held-out pairs; reply with metrics only."""
    runtime = _runtime(message.content.config_records["config"], context)
    shared = _arrays(message, "arrays")
    parent = (
        _arrays(message, "parent-arrays")
        if "parent-arrays" in message.content
        else None
    )
    metrics = runtime.evaluate(shared, parent=parent)
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site": runtime.site_id}),
        }
    )
    return Message(content=content, reply_to=message)


def _train_for_secure_aggregation(message: Message, context: Context) -> Message:
    """A training round inside SecAgg+: reply with the update, in the fit format.

    The reply goes back through `secaggplus_mod`, which quantises and masks
    the update and empties the arrays before the message leaves the site.
    """
    instruction = recorddict_compat.recorddict_to_fitins(
        message.content, keep_input=True
    )
    fit_config = ConfigRecord(dict(instruction.config))
    runtime = _runtime(fit_config, context)
    names = str(instruction.config["shared-names"]).split(",")
    arrays = parameters_to_ndarrays(instruction.parameters)
    shared = {
        name: torch.from_numpy(array.copy())
        for name, array in zip(names, arrays, strict=True)
    }

    updated, metrics = runtime.train_round(
        shared,
        run_id=str(message.metadata.run_id),
        server_round=int(str(instruction.config["server-round"])),
    )

    update = [(updated[name] - shared[name]).numpy() for name in names]
    _check_fits_secure_aggregation(runtime.config, update, metrics["num-examples"])
    result = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(update),
        num_examples=int(metrics["num-examples"]),
        metrics={**metrics, "site": runtime.site_id},
    )
    content = recorddict_compat.fitres_to_recorddict(result, keep_input=False)
    return Message(content=content, reply_to=message)


def _check_fits_secure_aggregation(
    config: TrainingConfig, update: list[np.ndarray], num_examples: float
) -> None:
    # SecAgg+ quantises weight x update within +-clipping range, the weight
    # being num_examples / max_weight: a larger weight would overflow it.
    if num_examples > config.secagg_max_weight:
        raise ConfigurationError(
            f"This site trained on {int(num_examples)} samples, more than "
            f"secagg_max_weight ({config.secagg_max_weight:g}); raise it for the run."
        )
    bound = config.secagg_clipping_range
    clipped = sum(int((np.abs(a) > bound).sum()) for a in update)
    if clipped:
        total = sum(a.size for a in update)
        logger.warning(
            "SecAgg+: %d of %d coordinates of this round's update exceed the "
            "clipping range %g and are clipped; the average will be biased",
            clipped,
            total,
            bound,
        )
