"""Publishing a finished run as a model version: weights, ONNX, metadata, summary.

A model version is a folder holding ``weights.pt`` (the whole network's
state dict), ``model.onnx`` with its ``ModelMetadata`` JSON (engineer C's
export and metadata format, so the same embedder loads it), and
``training.json``: parent model (its registry id), rounds, sites, epsilon
per site, per-round metrics and whether the model is backward-compatible
with its parent.
"""

import json
import logging
import shutil
from pathlib import Path

import torch

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import WEIGHTS_FILE
from facefed.models.dlib_resnet import DlibResNet

logger = logging.getLogger(__name__)

SUMMARY_FILE = "training.json"


def compatibility(
    site_evaluate: dict[int, dict[str, dict[str, float]]],
) -> dict[str, float | bool]:
    """Cross-model figures of the last evaluated round, weighted by pair counts.

    The new model may serve an existing gallery of the parent's templates only
    when probes it embeds match those templates at least as accurately as the
    parent matches its own (`compatible`).
    """
    if not site_evaluate:
        return {"compatible": False}
    sites = site_evaluate[max(site_evaluate)]
    total = sum(m.get("num-examples", 0.0) for m in sites.values())
    if total <= 0 or not all("cross-accuracy" in m for m in sites.values()):
        return {"compatible": False}

    def mean(key: str) -> float:
        return sum(m[key] * m["num-examples"] for m in sites.values()) / total

    cross, parent = mean("cross-accuracy"), mean("parent-accuracy")
    return {
        "cross-accuracy": cross,
        "parent-accuracy": parent,
        "accuracy": mean("accuracy"),
        "compatible": cross >= parent,
    }


def publish_run(
    network: DlibResNet,
    *,
    config: TrainingConfig,
    site_train: dict[int, dict[str, dict[str, float]]],
    site_evaluate: dict[int, dict[str, dict[str, float]]],
    shared_names: list[str],
) -> Path:
    """Write the run's model version into ``<run_dir>/model`` and return it."""
    model_dir = Path(config.run_dir) / "model"
    tmp_dir = model_dir.with_name("model.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    torch.save(network.state_dict(), tmp_dir / WEIGHTS_FILE)
    parent_id = parent_model_id(config.parent_model)
    model_id = export_onnx(network, tmp_dir, parent_id=parent_id)

    epsilon = {
        site: metrics["epsilon"]
        for round_sites in site_train.values()
        for site, metrics in round_sites.items()
    }
    summary = {
        "model_id": model_id,
        # The registry id (as in the metadata, the gallery and promotions);
        # the parent's folder, when it had one, stays in config.parent-model.
        "parent_model": parent_id,
        "rounds": config.num_rounds,
        "rounds_aggregated": sorted(site_train),
        "sites": sorted({s for r in site_train.values() for s in r}),
        "epsilon": epsilon,
        "delta": config.target_delta,
        "shared_layers": shared_names,
        "train": {str(k): v for k, v in site_train.items()},
        "evaluate": {str(k): v for k, v in site_evaluate.items()},
        "compatibility": compatibility(site_evaluate),
        "config": config.to_flower(),
    }
    (tmp_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp_dir.rename(model_dir)
    logger.info("Published model version %s", model_id)
    return model_dir


FINETUNED_PREFIX = "facefed-ft"


def parent_model_id(parent_model: str) -> str:
    """Model id of a run's parent: a published version's, or dlib's weights'."""
    from facefed.core.embedding import file_sha256, load_metadata
    from facefed.models.dlib_resnet import dlib_weights_path
    from facefed.models.registry import DLIB_RESNET_PREFIX, model_id_for

    if not parent_model:
        return model_id_for(DLIB_RESNET_PREFIX, file_sha256(dlib_weights_path()))
    found = sorted(Path(parent_model).glob(f"{FINETUNED_PREFIX}-*.json"))
    if not found:
        return Path(parent_model).name
    return load_metadata(found[0]).model_id


def export_onnx(network: DlibResNet, folder: Path, *, parent_id: str) -> str:
    """Export the network to ONNX beside its `ModelMetadata`; return the model id.

    The id is derived from the SHA-256 of ``weights.pt`` (C's registry
    scheme), so the same weights always get the same id.
    """
    from facefed.core.embedding import (
        ModelMetadata,
        file_sha256,
        metadata_path_for,
        save_metadata,
    )
    from facefed.models.dlib_resnet import INPUT_SIZE
    from facefed.models.export import export_onnx as export_graph
    from facefed.models.registry import model_id_for

    weights_sha = file_sha256(folder / WEIGHTS_FILE)
    model_id = model_id_for(FINETUNED_PREFIX, weights_sha)
    onnx_path = folder / f"{model_id}.onnx"
    export_graph(network, onnx_path, input_size=INPUT_SIZE)
    metadata = ModelMetadata(
        model_id=model_id,
        name="dlib ResNet-29 fine-tuned with facefed federated DP-SGD",
        input_size=INPUT_SIZE,
        alignment="dlib_chip_150",
        embedding_size=128,
        licence="weights derived from dlib's ResNet model (CC0); see training.json",
        # Thresholds of the parent do not carry over: calibrate the new model
        # with `facefed eval verify --calibrate` before serving decisions.
        parent_id=parent_id,
        onnx_file=onnx_path.name,
        onnx_sha256=file_sha256(onnx_path),
        weights_sha256=weights_sha,
    )
    save_metadata(metadata, metadata_path_for(onnx_path))
    return model_id
