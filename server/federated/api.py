"""Admin HTTP API of federated training: `/v1/training/runs` and `/v1/models`.

Admin role only. A run executes in a child process (`runner.start_simulation`)
that writes its progress into the run folder; each read of a run copies that
progress into the ``training_runs`` row (and, once finished, the published
version into ``model_versions``), so the database always shows what the
child last wrote.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from facefed.client.federated.config import (
    Accountant,
    CentralDP,
    CompatMode,
    SecureAggregation,
    TrainingConfig,
)
from facefed.core.errors import NotFoundError
from facefed.server.api.deps import Admin, Service
from facefed.server.db import ModelVersion as ModelVersionRow
from facefed.server.db import TrainingRun, session_scope, utcnow

router = APIRouter(tags=["training"])


class TrainingRunCreate(BaseModel):
    """A training run to start on the simulation engine.

    Every setting of `facefed train` and its ``--config`` file except the
    engine's own (run folder, site count): `TrainingConfig` documents each
    one, and checks the combination exactly as the CLI does. A field this
    model does not know is refused (422), so a misspelt request for secure
    aggregation never starts a plain run.
    """

    model_config = ConfigDict(extra="forbid")

    sites: Annotated[list[str], Field(min_length=1, max_length=64)]
    rounds: Annotated[int, Field(ge=1, le=1000)] = 5
    target_epsilon: Annotated[float, Field(gt=0, le=100)] = 8.0
    target_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    trainable_blocks: Annotated[int, Field(ge=1, le=6)] = 1
    compat: CompatMode = "none"
    # Defaults (and the checks of values and combinations) are TrainingConfig's.
    local_epochs: Annotated[int, Field(le=1000)] = TrainingConfig.local_epochs
    batch_size: int = TrainingConfig.batch_size
    learning_rate: float = TrainingConfig.learning_rate
    head_lr_scale: float = TrainingConfig.head_lr_scale
    max_grad_norm: float = TrainingConfig.max_grad_norm
    accountant: Accountant = TrainingConfig.accountant
    arcface_scale: float = TrainingConfig.arcface_scale
    arcface_margin: float = TrainingConfig.arcface_margin
    compat_weight: float = TrainingConfig.compat_weight
    min_fit_fraction: float = TrainingConfig.min_fit_fraction
    central_dp: CentralDP = TrainingConfig.central_dp
    central_noise_multiplier: float = TrainingConfig.central_noise_multiplier
    central_clipping_norm: float = TrainingConfig.central_clipping_norm
    secure_aggregation: SecureAggregation = TrainingConfig.secure_aggregation
    secagg_num_shares: StrictInt = TrainingConfig.secagg_num_shares
    secagg_threshold: StrictInt = TrainingConfig.secagg_threshold
    secagg_clipping_range: float = TrainingConfig.secagg_clipping_range
    secagg_max_weight: float = TrainingConfig.secagg_max_weight
    round_timeout: float = TrainingConfig.round_timeout
    parent_model: str = ""

    def training_config(self, run_dir: Path) -> TrainingConfig:
        """The run's `TrainingConfig` (the CLI's checks and messages).

        Raises:
            ConfigurationError: An impossible combination (SecAgg+ with central
                DP, fewer sites than the SecAgg+ threshold, ...).
        """
        settings = self.model_dump(exclude={"sites", "rounds"})
        return TrainingConfig(
            num_rounds=self.rounds,
            site_dirs=tuple(str(Path(p).resolve()) for p in self.sites),
            min_sites=len(self.sites),
            run_dir=str(run_dir),
            **settings,
        )


class TrainingRunPublic(BaseModel):
    """A training run and its latest progress."""

    id: str
    status: str
    config: dict[str, Any]
    rounds: int
    current_round: int
    epsilon: dict[str, Any]
    metrics: dict[str, Any]
    model_version_id: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class ModelVersionPublic(BaseModel):
    """A published model version."""

    id: str
    name: str
    parent_id: str | None
    status: str
    created_at: datetime
    metadata: dict[str, Any]


class PromotionCreate(BaseModel):
    """Promote a version to serve a collection."""

    model_config = ConfigDict(extra="forbid")

    collection: Annotated[str, Field(min_length=1, max_length=64)]
    # Strict: "yes" or 1 restarting a gallery by accident is not a typo to forgive.
    force_new_gallery: StrictBool = False


def _public(row: TrainingRun) -> TrainingRunPublic:
    return TrainingRunPublic(
        id=row.id,
        status=row.status,
        config=row.config,
        rounds=row.rounds,
        current_round=row.current_round,
        epsilon=row.epsilon,
        metrics=row.metrics,
        model_version_id=row.model_version_id,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
    )


def _sync(service: Service, run_id: str) -> TrainingRunPublic:
    from facefed.server.federated.runs import run_info

    progress = run_info(run_id).progress
    with session_scope(service.sessions) as session:
        row = session.get(TrainingRun, run_id)
        if row is None:
            # Started from the CLI (`facefed train`): its folder is the record.
            row = _adopted_run(run_id)
            session.add(row)
        if row.status == "running":
            row.status = progress.status
            row.current_round = progress.round
            row.epsilon = dict(progress.epsilon)
            row.metrics = dict(progress.metrics)
            row.error = progress.error
            row.updated_at = utcnow()
            if progress.status != "running":
                row.finished_at = utcnow()
            if progress.model_dir:
                row.model_version_id = _record_version(
                    session, Path(progress.model_dir)
                )
        return _public(row)


def _adopted_run(run_id: str) -> TrainingRun:
    """A `training_runs` row for a run folder the API did not create."""
    import json

    from facefed.server.federated.runner import RUN_CONFIG_FILE
    from facefed.server.federated.runs import run_dir_of

    folder = run_dir_of(run_id)
    config_file = folder / RUN_CONFIG_FILE
    # Runs launched before the config file existed name it only on start.
    config = (
        json.loads(config_file.read_text())
        if config_file.exists()
        else _started_config(folder)
    )
    created = datetime.fromtimestamp(folder.stat().st_mtime, UTC)
    return TrainingRun(
        id=run_id,
        status="running",
        config=config,
        rounds=int(config.get("num-rounds", 0)),
        current_round=0,
        metrics={},
        epsilon={},
        created_at=created,
        updated_at=utcnow(),
    )


def _started_config(folder: Path) -> dict[str, Any]:
    import json

    progress = folder / "progress.jsonl"
    lines = progress.read_text().splitlines() if progress.exists() else []
    for line in lines:
        event = json.loads(line)
        if event.get("event") == "run-started":
            return dict(event.get("config", {}))
    return {}


def _record_version(session: Any, model_dir: Path) -> str:
    """Add a published version's `model_versions` row unless it has one."""
    import json

    from facefed.core.embedding import load_metadata

    summary = json.loads((model_dir / "training.json").read_text())
    model_id = str(summary["model_id"])
    if session.get(ModelVersionRow, model_id) is None:
        # The metadata's parent id is the registry's (the gallery's) id.
        parent_id = load_metadata(model_dir / f"{model_id}.json").parent_id
        onnx = next(model_dir.glob(f"{model_id}.onnx"), None)
        session.add(
            ModelVersionRow(
                id=model_id,
                name=f"federated fine-tune of {parent_id}",
                parent_id=parent_id,
                created_at=utcnow(),
                status="published",
                metadata_={
                    k: summary[k]
                    for k in ("rounds", "sites", "epsilon", "delta", "compatibility")
                },
                onnx_path=str(onnx) if onnx else None,
                weights_path=str(model_dir / "weights.pt"),
            )
        )
    return model_id


def _version_public(row: ModelVersionRow) -> ModelVersionPublic:
    return ModelVersionPublic(
        id=row.id,
        name=row.name,
        parent_id=row.parent_id,
        status=row.status,
        created_at=row.created_at,
        metadata=row.metadata_,
    )


@router.post(
    "/training/runs",
    response_model=TrainingRunPublic,
    status_code=status.HTTP_201_CREATED,
)
def start_run(
    body: TrainingRunCreate, service: Service, caller: Admin
) -> TrainingRunPublic:
    """Start a federated training run on the simulation engine.

    Nothing starts, and no run is recorded, when the settings cannot go
    together or a site folder could not train or evaluate (400 with the CLI's
    message).
    """
    from facefed.server.federated.runner import check_site_folders, start_simulation
    from facefed.server.federated.runs import new_run_id, runs_dir

    run_id = new_run_id()
    config = body.training_config(runs_dir() / run_id)
    # Before the run's row exists: a refused run leaves nothing behind.
    check_site_folders(body.sites)
    now = utcnow()
    with session_scope(service.sessions) as session:
        session.add(
            TrainingRun(
                id=run_id,
                status="running",
                config=config.to_flower(),
                rounds=config.num_rounds,
                current_round=0,
                metrics={},
                epsilon={},
                created_at=now,
                updated_at=now,
            )
        )
    start_simulation(config, num_sites=len(body.sites))
    return _sync(service, run_id)


@router.get("/training/runs", response_model=list[TrainingRunPublic])
def list_runs(service: Service, caller: Admin) -> list[TrainingRunPublic]:
    """Every training run, newest first, with its latest progress.

    Runs started from the CLI are listed too (recorded on this read).
    """
    from sqlalchemy import select

    from facefed.server.federated.runs import list_runs as run_folders

    with session_scope(service.sessions) as session:
        recorded = set(session.scalars(select(TrainingRun.id)))
    ids = recorded | {info.run_id for info in run_folders()}
    return [_sync(service, run_id) for run_id in sorted(ids, reverse=True)]


@router.get("/training/runs/{run_id}", response_model=TrainingRunPublic)
def get_run(run_id: str, service: Service, caller: Admin) -> TrainingRunPublic:
    """One run: round, epsilon per site, held-out metrics per site."""
    return _sync(service, run_id)


@router.post("/training/runs/{run_id}/cancel", response_model=TrainingRunPublic)
def cancel_run(run_id: str, service: Service, caller: Admin) -> TrainingRunPublic:
    """Cancel a running run."""
    from facefed.server.federated.runs import cancel_run as cancel

    cancel(run_id)
    return _sync(service, run_id)


@router.get("/models", response_model=list[ModelVersionPublic])
def list_models(service: Service, caller: Admin) -> list[ModelVersionPublic]:
    """Every published model version, newest first: `published` or `promoted`.

    Versions published by runs started from the CLI are recorded on this
    read, and those promoted from the CLI (`training/promotions.json`) are
    marked promoted.
    """
    from sqlalchemy import select

    from facefed.server.federated.runs import list_model_versions, promotions

    promoted = set(promotions().values())
    with session_scope(service.sessions) as session:
        for version in list_model_versions():
            _record_version(session, version.folder)
        session.flush()
        rows = list(
            session.scalars(
                select(ModelVersionRow).order_by(
                    ModelVersionRow.created_at.desc(), ModelVersionRow.id
                )
            )
        )
        for row in rows:
            if row.id in promoted:
                row.status = "promoted"
        return [_version_public(row) for row in rows]


@router.post("/models/{model_id}/promote", response_model=ModelVersionPublic)
def promote_model(
    model_id: str, body: PromotionCreate, service: Service, caller: Admin
) -> ModelVersionPublic:
    """Promote a version to serve a collection (409 if incompatible, nothing changed).

    The gallery's collection then accepts templates (enrollments and probes)
    of this model beside those of the models it served before; a site reads
    which one to embed with from `GET /v1/collections/{id}`.
    """
    from facefed.server.federated.runs import model_version, promote

    version = model_version(model_id)
    promote(
        model_id,
        body.collection,
        force_new_gallery=body.force_new_gallery,
        sessions=service.sessions,
        actor=caller.actor,
    )
    with session_scope(service.sessions) as session:
        # A version published by a run started from the CLI has no row yet.
        _record_version(session, version.folder)
        session.flush()
        row = session.get(ModelVersionRow, model_id)
        if row is None:
            raise NotFoundError(f"No published model version {model_id!r}.")
        row.status = "promoted"
        row.metadata_ = {**row.metadata_, "collection": body.collection}
        return _version_public(row)
