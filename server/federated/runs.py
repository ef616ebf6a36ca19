"""Run management on disk: run folders, listing, cancelling, model versions, promotion.

Every training run has a folder ``$FACEFED_HOME/training/runs/<run_id>``
holding its progress log, the audit of received messages, the child's pid
and, once finished, the published model version (``model/``). Promotion
registers a version's ONNX with the model registry (engineer C's
`ModelRegistry`) and makes it serve a collection of the gallery database,
refusing a model whose probes do not match the collection's templates (see
`publish.compatibility` and `server.service.accept_promotion`).
"""

import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from facefed.core.errors import ConflictError, NotFoundError
from facefed.core.settings import get_core_settings
from facefed.server.db import session_scope
from facefed.server.federated.publish import SUMMARY_FILE
from facefed.server.federated.runner import RunProgress, read_progress
from facefed.server.service import Promotion, accept_promotion

logger = logging.getLogger(__name__)


def training_home() -> Path:
    """`$FACEFED_HOME/training`, where runs and promotions are kept."""
    return get_core_settings().home / "training"


def runs_dir() -> Path:
    """The folder of all run folders."""
    return training_home() / "runs"


def new_run_id() -> str:
    """A sortable, unguessable run id: UTC time then 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def run_dir_of(run_id: str) -> Path:
    """The folder of an existing run.

    Raises:
        NotFoundError: No run has that id.
    """
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise NotFoundError(f"No training run {run_id!r}.")
    path = runs_dir() / run_id
    if not path.is_dir():
        raise NotFoundError(f"No training run {run_id!r}.")
    return path


@dataclass(frozen=True)
class RunInfo:
    """A run as listed.

    Attributes:
        run_id: Its id.
        progress: What its progress log says.
    """

    run_id: str
    progress: RunProgress


def list_runs() -> list[RunInfo]:
    """Every run, newest first."""
    if not runs_dir().is_dir():
        return []
    folders = sorted((p for p in runs_dir().iterdir() if p.is_dir()), reverse=True)
    return [RunInfo(p.name, _status(p)) for p in folders]


def run_info(run_id: str) -> RunInfo:
    """One run's progress."""
    return RunInfo(run_id, _status(run_dir_of(run_id)))


def _status(folder: Path) -> RunProgress:
    progress = read_progress(folder)
    if progress.status == "running" and not _alive(folder):
        # Runs cancelled before cancels were logged left only this marker.
        cancelled = (folder / "cancelled").exists()
        status = "cancelled" if cancelled else "failed"
        return RunProgress(
            status,
            progress.round,
            progress.epsilon,
            progress.metrics,
            progress.model_dir,
            progress.error or "the run's process is gone",
        )
    return progress


def _alive(folder: Path) -> bool:
    pid_file = folder / "pid"
    if not pid_file.exists():
        return False
    try:
        return process_alive(int(pid_file.read_text()))
    except ValueError:
        return False


def process_alive(pid: int) -> bool:
    """Whether a process runs: it exists and is not a zombie (dead, unreaped)."""
    # A child that exited but was not yet reaped by its parent (the API
    # server, a foreground `facefed train`) still answers signal 0: it is a
    # zombie, and a zombie runs nothing.
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except ProcessLookupError:
        return False
    except OSError:
        # Not ours to signal, or no /proc: it exists, and may well run.
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def cancel_run(run_id: str, *, reason: str = "cancelled on request") -> None:
    """Stop a running run and every process it started, and record why.

    The run is marked cancelled (a ``run-cancelled`` event in its progress
    log) before its processes are stopped, so every view says "cancelled"
    at once and whatever the dying processes write afterwards is ignored.
    The simulation child, Ray's processes and ``flwr run`` get SIGTERM, and
    SIGKILL when they are still there after a few seconds.

    FIXME: a deployment run's process is the local ``flwr run``; stopping it
    does not stop the run at the SuperLink, which goes on (and spends the
    sites' budget) until ``flwr stop`` is given its Flower run id.

    Args:
        run_id: The run.
        reason: Why, recorded as the run's error.

    Raises:
        NotFoundError: No such run.
        ConflictError: The run is not running.
    """
    folder = run_dir_of(run_id)
    if _status(folder).status != "running":
        raise ConflictError(f"Training run {run_id} is not running.")
    (folder / "cancelled").write_text(str(time.time()))
    with open(folder / "progress.jsonl", "a") as handle:
        entry = {"time": time.time(), "event": "run-cancelled", "error": reason}
        handle.write(json.dumps(entry) + "\n")
    _stop_tree(int((folder / "pid").read_text()))
    logger.info("Cancelled training run %s", run_id)


@dataclass(frozen=True)
class ModelVersion:
    """A published model version.

    Attributes:
        model_id: Its id (from its weights' hash).
        run_id: The run that made it.
        folder: Its folder.
        summary: Its training summary (parent, rounds, sites, epsilon, metrics).
    """

    model_id: str
    run_id: str
    folder: Path
    summary: dict[str, object]


def list_model_versions() -> list[ModelVersion]:
    """Every published model version, newest run first."""
    versions = []
    for info in list_runs():
        folder = runs_dir() / info.run_id / "model"
        summary_path = folder / SUMMARY_FILE
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            versions.append(
                ModelVersion(str(summary["model_id"]), info.run_id, folder, summary)
            )
    return versions


def model_version(model_id: str) -> ModelVersion:
    """One published version by id.

    Raises:
        NotFoundError: No published version has that id.
    """
    for version in list_model_versions():
        if version.model_id == model_id:
            return version
    raise NotFoundError(f"No published model version {model_id!r}.")


def register_version(model_id: str) -> Path:
    """Register a published version with the model registry (C's model folder).

    Afterwards `facefed eval verify --model <id>` evaluates it on a public
    benchmark and `default_pipeline(model_id=<id>)` embeds with it.

    Returns:
        The registered ONNX file.
    """
    from facefed.core.embedding import load_metadata
    from facefed.models.registry import ModelRegistry

    version = model_version(model_id)
    metadata = load_metadata(version.folder / f"{model_id}.json")
    registered = ModelRegistry().register_onnx(
        version.folder / metadata.onnx_file, metadata
    )
    return registered.onnx_path


def _stop_tree(pid: int, *, grace_s: float = 5.0) -> None:
    # The simulation child starts Ray's processes, which may start more while
    # it dies: look for descendants again on every pass, and remember them,
    # since a process whose parent died is no longer found under the run.
    family: set[int] = {pid}
    own_group = _leads_own_group(pid)
    for stop, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        family = _living_family(pid, family)
        if own_group:
            # Also reaches what Ray started and left without a parent.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, stop)
        for member in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, stop)
        deadline = time.monotonic() + wait_s
        while family and time.monotonic() < deadline:
            time.sleep(0.1)
            family = _living_family(pid, family)
        if not family:
            return
        logger.warning(
            "%d processes of a cancelled run outlived %s", len(family), stop.name
        )


def _living_family(pid: int, known: set[int]) -> set[int]:
    from facefed.server.federated.deployment import _descendants

    if process_alive(pid):
        known = known | set(_descendants(pid))
    return {member for member in known if process_alive(member)}


def _leads_own_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def _promotions_path() -> Path:
    return training_home() / "promotions.json"


def promotions() -> dict[str, str]:
    """The model id of each collection a version was promoted to."""
    path = _promotions_path()
    return json.loads(path.read_text()) if path.exists() else {}


def promote(
    model_id: str,
    collection: str,
    *,
    force_new_gallery: bool = False,
    sessions: sessionmaker[Session] | None = None,
    actor: str = "admin:cli",
) -> str:
    """Make a published version serve a collection.

    When the gallery database holds the collection, the promotion is written
    there (`server.service.accept_promotion`): the collection then accepts
    the new model's templates beside its old ones, provided the new model is
    a direct child of its serving model measured compatible (cross-model
    accuracy at least the parent's own on the sites' held-out pairs). With
    `force_new_gallery` an empty collection restarts on the new model; one
    holding templates is refused. A collection the gallery does not hold
    (yet) is checked against `promotions.json` alone.

    Args:
        model_id: The published version.
        collection: The collection to serve.
        force_new_gallery: Restart the collection on this model (empty
            collections only) instead of requiring compatibility.
        sessions: The gallery database (the API's); None opens the configured
            one if it exists (the CLI).
        actor: Who promotes, for the audit log.

    Returns:
        The model id now serving the collection.

    Raises:
        NotFoundError: No such version.
        ConflictError: The version cannot serve the collection's templates;
            nothing was changed.
    """
    version = model_version(model_id)
    promotion = _promotion_of(version)
    with contextlib.ExitStack() as stack:
        if sessions is None:
            sessions = stack.enter_context(_configured_gallery())
        serving = None
        if sessions is not None:
            # One transaction: if registering the ONNX fails, the gallery
            # keeps its models.
            session = stack.enter_context(session_scope(sessions))
            serving = accept_promotion(
                session,
                promotion,
                collection_id=collection,
                force_new_gallery=force_new_gallery,
                actor=actor,
            )
        if serving is None:
            _check_recorded_promotion(promotion, collection, force_new_gallery)
            serving = model_id
        register_version(model_id)
    table = promotions() | {collection: serving}
    _promotions_path().parent.mkdir(parents=True, exist_ok=True)
    _promotions_path().write_text(json.dumps(table, indent=1))
    logger.info("Model %s promoted to collection %s", model_id, collection)
    return serving


def _promotion_of(version: ModelVersion) -> Promotion:
    from facefed.core.embedding import load_metadata

    metadata = load_metadata(version.folder / f"{version.model_id}.json")
    compat = version.summary.get("compatibility")
    compat = compat if isinstance(compat, dict) else {}
    return Promotion(
        model_id=version.model_id,
        parent_model_id=metadata.parent_id,
        compatible=bool(compat.get("compatible")),
        cross_accuracy=_number(compat.get("cross-accuracy")),
        parent_accuracy=_number(compat.get("parent-accuracy")),
    )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _check_recorded_promotion(
    promotion: Promotion, collection: str, force_new_gallery: bool
) -> None:
    # No gallery collection yet: promotions.json is all there is to check.
    current = promotions().get(collection)
    if not current or current == promotion.model_id or force_new_gallery:
        return
    if promotion.parent_model_id != current or not promotion.compatible:
        raise ConflictError(
            f"Collection {collection!r} holds templates of model {current}; "
            f"{promotion.model_id} is not a backward-compatible child of it "
            "(cross-model accuracy below the parent's own, or another parent). "
            "Train with --compat l2 from that model, or re-enroll the gallery."
        )


@contextlib.contextmanager
def _configured_gallery() -> Iterator[sessionmaker[Session] | None]:
    """The configured gallery database, or None where none exists yet.

    A promotion never creates a gallery database: a missing SQLite file or a
    database without facefed's tables means there is no collection to change.
    """
    from sqlalchemy import inspect

    from facefed.server.db import make_engine, make_session_factory, run_migrations
    from facefed.server.settings import get_server_settings

    try:
        engine = make_engine(get_server_settings().resolved_database_url, create=False)
    except NotFoundError:
        yield None
        return
    try:
        if not inspect(engine).has_table("collections"):
            yield None
            return
        run_migrations(engine)
        yield make_session_factory(engine)
    finally:
        engine.dispose()
