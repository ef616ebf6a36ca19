"""FedAvg for facefed: sample-weighted, dropout-tolerant, per-site and audited.

`FacefedFedAvg` is Flower's message-based `FedAvg` (McMahan et al., 2017,
weighted by each site's ``num-examples``) with what a face recognition
federation needs on top:

- a round is aggregated when at least ``min_fit_fraction`` of the sampled
  sites replied; a site that drops out (or refuses, e.g. out of privacy
  budget) does not fail the round, and too few replies leave the model
  unchanged instead of averaging one site's update;
- every site's metrics (epsilon, loss, held-out accuracy) are kept per site,
  not only averaged, and written to the run's progress log;
- evaluation messages also carry the parent model's shared layers, so sites
  can measure cross-model accuracy (templates of the parent, probes of the
  new model);
- every reply is recorded in an audit log of its content's keys, shapes and
  value types, which is how tests prove no image or label left a site.
"""

import json
import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

logger = logging.getLogger(__name__)

ERROR_LIMIT = 500
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Flower wraps what a ClientApp raised as "...occurred. Message: <str(error)>",
# at the end of a Ray traceback on the simulation engine.
_CLIENT_APP_MESSAGE = "occurred. Message: "
_QUALIFIED_ERROR = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception)\w*: ")


def error_summary(reason: str) -> str:
    """The readable part of a site's error reply: the exception's own message.

    Flower's error reason is ``<class '...'>:<'...'>`` around a traceback
    (a Ray traceback on the simulation engine) whose *last* line holds what
    the site raised; the head of the traceback says nothing useful.

    Args:
        reason: The error reason of a reply, as Flower sent it.

    Returns:
        The message, without colour codes, at most `ERROR_LIMIT` characters
        (the end kept when cut).
    """
    text = _ANSI_ESCAPE.sub("", reason).strip()
    if text.startswith("<class '") and text.endswith("'>"):
        text = text[: -len("'>")]
    if _CLIENT_APP_MESSAGE in text:
        text = text.rsplit(_CLIENT_APP_MESSAGE, 1)[1]
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
        text = text.split(">:<'", 1)[-1]
    text = _QUALIFIED_ERROR.sub("", text.strip())
    if len(text) > ERROR_LIMIT:
        text = "..." + text[-(ERROR_LIMIT - 3) :]
    return text or "no reason given"


class RunLog:
    """Append-only JSON-lines logs of a run: progress events and received messages.

    It also remembers each site's latest error, so that a failed run can say
    why each site did not take part (`site_errors`).

    Args:
        run_dir: The run's folder; `progress.jsonl` and `messages.jsonl` go there.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.progress_path = run_dir / "progress.jsonl"
        self.messages_path = run_dir / "messages.jsonl"
        self._site_names: dict[int, str] = {}
        self._errors: dict[int, str] = {}

    def event(self, kind: str, **fields: object) -> None:
        """Append a progress event."""
        _append(self.progress_path, {"time": time.time(), "event": kind, **fields})

    def received(self, server_round: int, phase: str, message: Message) -> None:
        """Append the shape of what the server received in a reply."""
        entry: dict[str, object] = {
            "round": server_round,
            "phase": phase,
            "node": int(message.metadata.src_node_id),
        }
        node = int(message.metadata.src_node_id)
        if message.has_error():
            entry["error"] = error_summary(str(message.error.reason))
            self._errors[node] = str(entry["error"])
        else:
            entry["records"] = describe_content(message.content)
            if "site" in message.content:
                site = message.content["site"]
                if isinstance(site, ConfigRecord) and "site" in site:
                    self._site_names[node] = str(site["site"])
        _append(self.messages_path, entry)

    def site_errors(self) -> list[str]:
        """Each failing site's latest error, named by the site when it is known.

        A site that never replied without an error is named by its node id.
        """
        lines = []
        for node, error in self._errors.items():
            name = self._site_names.get(node, f"node {node}")
            lines.append(error if error.startswith(f"{name}:") else f"{name}: {error}")
        return lines


def describe_content(content: RecordDict) -> dict[str, dict[str, object]]:
    """Keys, shapes and value types of a message's records (no values of arrays)."""
    described: dict[str, dict[str, object]] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            described[name] = {
                "kind": "arrays",
                "items": {k: [list(a.shape), a.dtype] for k, a in record.items()},
            }
        elif isinstance(record, MetricRecord):
            described[name] = {
                "kind": "metrics",
                "items": {k: type(v).__name__ for k, v in record.items()},
            }
        elif isinstance(record, ConfigRecord):
            described[name] = {
                "kind": "config",
                "items": {k: type(v).__name__ for k, v in record.items()},
                "values": {k: v for k, v in record.items() if isinstance(v, str)},
            }
        else:
            described[name] = {"kind": type(record).__name__, "items": {}}
    return described


class FacefedFedAvg(FedAvg):
    """Sample-weighted FedAvg that tolerates dropouts and reports per site.

    Args:
        run_log: Where progress and the received-message audit go.
        parent_arrays: The parent model's shared layers (sent with evaluation).
        min_fit_fraction: Fraction of the sampled sites that must reply for a
            round to be aggregated.
        min_sites: Sites that must be connected before sampling.
    """

    def __init__(
        self,
        *,
        run_log: RunLog,
        parent_arrays: ArrayRecord,
        min_fit_fraction: float,
        min_sites: int,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
            weighted_by_key="num-examples",
        )
        self.run_log = run_log
        self.parent_arrays = parent_arrays
        self.min_fit_fraction = min_fit_fraction
        self.site_train: dict[int, dict[str, dict[str, float]]] = {}
        self.site_evaluate: dict[int, dict[str, dict[str, float]]] = {}
        self._sampled: dict[tuple[int, str], int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample every connected site for training (and remember how many)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled[(server_round, "train")] = len(messages)
        self.run_log.event("round-started", round=server_round, sites=len(messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every site to evaluate the new model against the parent."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        for message in messages:
            message.content["parent-arrays"] = self.parent_arrays
        self._sampled[(server_round, "evaluate")] = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sites' shared layers, weighted by their sample counts."""
        replies = list(replies)
        valid = self._audit_and_count(server_round, "train", replies)
        if valid is None:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, valid)
        self.record_train_sites(
            server_round, _per_site(valid), dropped=len(replies) - len(valid)
        )
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the sites' held-out metrics, weighted by their pair counts."""
        replies = list(replies)
        valid = self._audit_and_count(server_round, "evaluate", replies)
        if valid is None:
            return None
        self.site_evaluate[server_round] = _per_site(valid)
        metrics = super().aggregate_evaluate(server_round, valid)
        self.run_log.event(
            "round-evaluated",
            round=server_round,
            sites=self.site_evaluate[server_round],
            aggregate=dict(metrics) if metrics is not None else {},
        )
        return metrics

    def enough_replies(self, server_round: int, phase: str, *, replied: int) -> bool:
        """Whether `replied` sites meet ``min_fit_fraction`` of those sampled.

        Too few replies are logged and recorded as a skipped round.
        """
        sampled = self._sampled.get((server_round, phase), replied)
        needed = max(1, math.ceil(self.min_fit_fraction * sampled))
        if replied < needed:
            self.skip_round(server_round, phase, replied=replied)
            return False
        if replied < sampled:
            logger.warning(
                "Round %d %s: %d of %d sites dropped out; aggregating the rest",
                server_round,
                phase,
                sampled - replied,
                sampled,
            )
        return True

    def skip_round(self, server_round: int, phase: str, *, replied: int) -> None:
        """Record that a round's phase is not aggregated: the model stays as it is."""
        sampled = self._sampled.get((server_round, phase), replied)
        needed = max(1, math.ceil(self.min_fit_fraction * sampled))
        logger.warning(
            "Round %d %s: %d of %d sites replied, %d needed; the model is "
            "left unchanged this round",
            server_round,
            phase,
            replied,
            sampled,
            needed,
        )
        self.run_log.event(
            "round-skipped",
            round=server_round,
            phase=phase,
            replied=replied,
            sampled=sampled,
            needed=needed,
        )

    def record_train_sites(
        self, server_round: int, sites: dict[str, dict[str, float]], *, dropped: int
    ) -> None:
        """Keep a trained round's per-site metrics and log the round."""
        self.site_train[server_round] = sites
        self.run_log.event(
            "round-trained", round=server_round, sites=sites, dropped=dropped
        )

    def _audit_and_count(
        self, server_round: int, phase: str, replies: list[Message]
    ) -> list[Message] | None:
        for message in replies:
            self.run_log.received(server_round, phase, message)
        valid = [m for m in replies if not m.has_error()]
        if not self.enough_replies(server_round, phase, replied=len(valid)):
            return None
        return valid


def _per_site(replies: list[Message]) -> dict[str, dict[str, float]]:
    sites: dict[str, dict[str, float]] = {}
    for message in replies:
        name = f"node-{message.metadata.src_node_id}"
        if "site" in message.content:
            name = str(message.content["site"].get("site", name))
        metrics = next(iter(message.content.metric_records.values()))
        sites[name] = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
    return sites


def _append(path: Path, entry: dict[str, object]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
