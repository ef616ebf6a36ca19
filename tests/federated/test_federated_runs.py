"""Run management: publishing, promotion rules, and the train command's checks."""

import json

import pytest

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import load_network
from facefed.core.errors import ConflictError
from facefed.server.federated.publish import publish_run
from facefed.server.federated.runs import (
    list_model_versions,
    promote,
    promotions,
    runs_dir,
)


def _publish(run_id: str, *, cross: float, parent: float, bump: float) -> str:
    network = load_network()
    with __import__("torch").no_grad():
        network.embedding.fc.weight.mul_(1.0 + bump)
    config = TrainingConfig(num_rounds=1, run_dir=str(runs_dir() / run_id))
    evaluate = {
        1: {
            "site-a": {
                "num-examples": 100.0,
                "accuracy": 0.9,
                "cross-accuracy": cross,
                "parent-accuracy": parent,
            }
        }
    }
    train = {1: {"site-a": {"epsilon": 1.5, "num-examples": 50.0}}}
    model_dir = publish_run(
        network,
        config=config,
        site_train=train,
        site_evaluate=evaluate,
        shared_names=["embedding.fc.weight"],
    )
    return json.loads((model_dir / "training.json").read_text())["model_id"]


@pytest.mark.slow
def test_published_version_and_promotion_rules():
    first = _publish("20260101T000000Z-aaaaaa", cross=0.95, parent=0.9, bump=0.01)
    second = _publish("20260101T000001Z-bbbbbb", cross=0.80, parent=0.9, bump=0.02)
    assert {v.model_id for v in list_model_versions()} == {first, second}
    summary = next(v for v in list_model_versions() if v.model_id == second).summary
    assert summary["compatibility"]["compatible"] is False
    assert summary["epsilon"] == {"site-a": 1.5}

    assert promote(first, "lab") == first
    # `second` is not a child of `first` (both come from dlib) and its probes
    # match old templates worse than the parent's own: the gallery keeps `first`.
    with pytest.raises(ConflictError, match="holds templates of model"):
        promote(second, "lab")
    assert promote(second, "lab", force_new_gallery=True) == second
    assert promote(second, "other") == second


def _gallery_with_collection(model_id: str):
    """The configured gallery database (`$FACEFED_HOME/server.db`) with `lab`."""
    from facefed.privacy.envelope import encode_master_key
    from facefed.server.security import Principal
    from facefed.server.service import GalleryService
    from facefed.server.settings import get_server_settings

    settings = get_server_settings().model_copy(
        update={"master_key": encode_master_key(bytes(range(32))), "use_gpu": False}
    )
    service = GalleryService(settings)
    service.start()
    admin = Principal(role="admin", key_id="test")
    service.create_protection_key(admin, scheme="orthonormal-v1")
    service.create_collection(
        admin, collection_id="lab", model_id=model_id, scheme="orthonormal-v1", dim=128
    )
    return service


@pytest.mark.slow
def test_promote_from_the_cli_writes_the_gallery_database():
    from facefed.server.federated.publish import parent_model_id

    dlib_id = parent_model_id("")
    service = _gallery_with_collection(dlib_id)
    try:
        child = _publish("20260101T000000Z-aaaaaa", cross=0.95, parent=0.9, bump=0.01)
        worse = _publish("20260101T000001Z-bbbbbb", cross=0.80, parent=0.9, bump=0.02)

        with pytest.raises(ConflictError, match="not backward-compatible"):
            promote(worse, "lab")
        assert service.collection("lab")[0].accepted_model_ids == [dlib_id]
        assert promotions() == {}

        assert promote(child, "lab") == child
        row, _ = service.collection("lab")
        assert row.serving_model_id == child
        assert row.promoted[0].cross_accuracy == pytest.approx(0.95)
        assert row.promoted[0].parent_accuracy == pytest.approx(0.9)
        assert promotions() == {"lab": child}
        # `worse` comes from dlib too, which no longer serves the collection.
        with pytest.raises(ConflictError, match=f"served by model {child}"):
            promote(worse, "lab")
        # The collection holds no template yet: it may restart on `worse`.
        assert promote(worse, "lab", force_new_gallery=True) == worse
        assert service.collection("lab")[0].accepted_model_ids == [worse]
    finally:
        service.close()


def test_train_refuses_missing_site_folders(tmp_path, facefed_cli):
    done = facefed_cli("train", "--site", str(tmp_path / "nowhere"), "--rounds", "1")
    assert done.returncode == 2
    assert "does not exist" in " ".join(done.stderr.split())
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


def test_train_checks_the_site_count(tmp_path, facefed_cli):
    (tmp_path / "a").mkdir()
    done = facefed_cli("train", "--site", str(tmp_path / "a"), "--sites", "3")
    assert done.returncode == 2
    assert "--sites 3 but 1 site folders" in " ".join(done.stderr.split())


@pytest.mark.parametrize(
    "counts",
    [
        {"photos_per_site": -1},
        {"photos_per_identity": 1},
        {"pairs_per_site": 0},
    ],
)
def test_scenario_refuses_bad_counts_and_leaves_the_folder_alone(tmp_path, counts):
    import numpy as np

    from facefed.core.errors import ConfigurationError
    from facefed.server.federated.scenario import build_scenario

    out = tmp_path / "scenario"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="must be"):
        build_scenario(tmp_path, out, rng=np.random.default_rng(0), **counts)
    assert (out / "keep.txt").read_text() == "mine"
