"""The Flower ClientApp of a site (Message API): local DP training and evaluation.

Each message carries the run's configuration in its ConfigRecord ``config``
and the shared layers in its ArrayRecord ``arrays`` (evaluation messages also
carry the parent model's shared layers in ``parent-arrays``). A reply holds
only the updated shared arrays (training), scalar metrics, and the site's
name: no chip, embedding, identity or head ever goes back.

The site folder comes from the SuperNode's node config: ``site-dir`` on a
deployed SuperNode, or ``partition-id`` indexing the run's ``site-dirs`` in
simulation.
"""

import json
import logging
import threading

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.site import SiteRuntime
from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

app = ClientApp()

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


def _runtime(message: Message, context: Context) -> SiteRuntime:
    config = TrainingConfig.from_flower(dict(message.content["config"]))
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
    runtime = _runtime(message, context)
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
    runtime = _runtime(message, context)
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
