"""ONNX export, the onnxruntime embedder, metadata, the registry and the zoo."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from facefed.core.embedding import (
    Embedder,
    InputNormalisation,
    ModelMetadata,
    OnnxEmbedder,
    load_metadata,
)
from facefed.core.errors import ModelError, NotFoundError
from facefed.core.settings import get_core_settings
from facefed.models.dlib_resnet import dlib_weights_path, weights_sha256
from facefed.models.registry import ModelRegistry, model_id_for
from facefed.models.zoo import (
    ensure_dlib_resnet_onnx,
    load_default_embedder,
    load_embedder,
)
from tests.models.test_models_dlib_resnet import dlib_chips_and_descriptors


@pytest.fixture(scope="module")
def dlib_reference(test_data: Path):
    return dlib_chips_and_descriptors(test_data)


def test_default_embedder_matches_dlib(dlib_reference):
    chips, references = dlib_reference
    embedder = load_default_embedder()
    assert isinstance(embedder, Embedder)
    raw = embedder.embed_raw(chips)
    cosine = (raw * references).sum(1) / (
        np.linalg.norm(raw, axis=1) * np.linalg.norm(references, axis=1)
    )
    assert cosine.min() >= 0.9999
    assert np.abs(raw - references).max() <= 1e-4
    unit = embedder.embed(chips)
    assert unit.dtype == np.float32 and unit.shape == (len(chips), 128)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_batch_size_is_dynamic(dlib_reference):
    chips, _ = dlib_reference
    embedder = load_default_embedder()
    one_by_one = np.concatenate([embedder.embed(chips[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(embedder.embed(chips)[:3], one_by_one, atol=1e-5)
    assert embedder.embed(chips[:0]).shape == (0, 128)


def test_model_id_comes_from_weights_hash_and_export_is_cached():
    sha = weights_sha256(dlib_weights_path())
    embedder = load_default_embedder()
    assert embedder.metadata.model_id == f"dlib-resnet-v1-{sha[:12]}"
    assert embedder.metadata.weights_sha256 == sha
    assert embedder.metadata.alignment == "dlib_chip_150"
    assert embedder.metadata.input_size == 150
    json_path = ensure_dlib_resnet_onnx()
    onnx_path = json_path.with_suffix(".onnx")
    before = onnx_path.stat().st_mtime_ns
    assert ensure_dlib_resnet_onnx() == json_path
    assert onnx_path.stat().st_mtime_ns == before
    saved = json.loads(json_path.read_text())
    assert saved["model_id"] == embedder.metadata.model_id


def test_wrong_chips_are_refused():
    embedder = load_default_embedder()
    with pytest.raises(ModelError, match=r"\(N, 150, 150, 3\)"):
        embedder.embed(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ModelError, match="uint8"):
        embedder.embed(np.zeros((1, 150, 150, 3), np.float32))  # type: ignore[arg-type]


def test_altered_onnx_is_refused(tmp_path: Path):
    json_path = ensure_dlib_resnet_onnx()
    copy = tmp_path / "copy.onnx"
    data = bytearray(json_path.with_suffix(".onnx").read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="refusing"):
        OnnxEmbedder(copy, load_metadata(json_path))


def test_metadata_round_trip_and_validation():
    metadata = load_default_embedder().metadata
    assert ModelMetadata.from_json(metadata.to_json()) == metadata
    with pytest.raises(ModelError, match="Unknown alignment"):
        replace(metadata, alignment="mtcnn_160")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"no threshold for FMR 0\.5"):
        metadata.threshold_for(0.5)
    with pytest.raises(ModelError, match="Invalid model metadata"):
        ModelMetadata.from_json('{"model_id": "x"}')


def test_model_id_needs_a_sha256():
    with pytest.raises(ModelError, match="SHA-256"):
        model_id_for("x", "1234")


def _insightface_like_onnx(path: Path, rng: np.random.Generator) -> np.ndarray:
    """A small graph with InsightFace's interface: 1x3x112x112 in, 512 out."""
    weight = rng.standard_normal((3 * 7 * 7, 512)).astype(np.float32)
    nodes = [
        helper.make_node(
            "AveragePool",
            ["input.1"],
            ["pooled"],
            kernel_shape=[16, 16],
            strides=[16, 16],
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_like",
        [
            helper.make_tensor_value_info(
                "input.1", TensorProto.FLOAT, ["N", 3, 112, 112]
            )
        ],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weight


def _arcface_metadata(model_id: str, embedding_size: int = 512) -> ModelMetadata:
    return ModelMetadata(
        model_id=model_id,
        name="user ArcFace (InsightFace format)",
        input_size=112,
        alignment="arcface_112",
        embedding_size=embedding_size,
        normalisation=InputNormalisation(
            mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), channel_order="RGB"
        ),
        licence="InsightFace model zoo: non-commercial research only",
    )


def test_user_arcface_onnx_is_selected_by_its_metadata(
    tmp_path: Path, test_data: Path, monkeypatch
):
    monkeypatch.setenv("FACEFED_MODEL_CACHE", str(tmp_path / "models"))
    get_core_settings.cache_clear()
    rng = np.random.default_rng(3)
    source = tmp_path / "w600k_r50.onnx"
    weight = _insightface_like_onnx(source, rng)
    registry = ModelRegistry()
    assert registry.model_dir == get_core_settings().model_dir
    registered = registry.register_onnx(source, _arcface_metadata("arcface-user-test"))
    assert registered.metadata_path.parent == get_core_settings().model_dir
    assert [m.metadata.model_id for m in registry.find(alignment="arcface_112")] == [
        "arcface-user-test"
    ]

    embedder = load_embedder("arcface-user-test")
    assert embedder.metadata.embedding_size == 512
    from PIL import Image

    image = Image.open(test_data / "lfw" / "Tim_Henman" / "Tim_Henman_0001.jpg")
    chips = np.stack(
        [
            np.asarray(image.convert("RGB").resize((112, 112))),
            rng.integers(0, 256, (112, 112, 3), dtype=np.uint8),
        ]
    )
    normalised = (chips.astype(np.float32) - 127.5) / 127.5
    pooled = normalised.reshape(2, 7, 16, 7, 16, 3).mean(axis=(2, 4))
    expected = pooled.transpose(0, 3, 1, 2).reshape(2, -1) @ weight
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(chips), expected, atol=1e-5)


def test_metadata_that_contradicts_the_graph_is_refused(tmp_path: Path):
    source = tmp_path / "model.onnx"
    _insightface_like_onnx(source, np.random.default_rng(0))
    with pytest.raises(ModelError, match="512-d output"):
        ModelRegistry(tmp_path / "models").register_onnx(
            source, _arcface_metadata("wrong", embedding_size=128)
        )


def test_unknown_model_id_names_the_known_ones():
    ensure_dlib_resnet_onnx()
    with pytest.raises(NotFoundError, match=r"known: .*dlib-resnet-v1-"):
        load_embedder("no-such-model")


def test_flip_augmentation_sums_the_mirrored_chip(dlib_reference):
    chips, _ = dlib_reference
    embedder = load_default_embedder()
    assert embedder.metadata.test_time_flip
    mirrored = np.ascontiguousarray(chips[:, :, ::-1])
    expected = embedder.embed_raw(chips[:3]) + embedder.embed_raw(mirrored[:3])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(chips[:3]), expected, atol=1e-5)
    # The mirrored photo gets the same embedding: the sum is symmetric.
    np.testing.assert_allclose(embedder.embed(mirrored[:3]), expected, atol=1e-5)


def test_hand_written_metadata_beside_the_onnx_is_enough(tmp_path: Path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("FACEFED_MODEL_CACHE", str(folder))
    get_core_settings.cache_clear()
    _insightface_like_onnx(folder / "glint_r100.onnx", np.random.default_rng(5))
    (folder / "glint_r100.json").write_text(
        json.dumps(
            {
                "model_id": "glint-r100-user",
                "name": "user model",
                "input_size": 112,
                "alignment": "arcface_112",
                "embedding_size": 512,
                "normalisation": {"mean": [127.5] * 3, "std": [127.5] * 3},
                "licence": "non-commercial",
                "thresholds": {"0.001": 0.3},
            }
        )
    )
    embedder = load_embedder("glint-r100-user")
    assert embedder.metadata.threshold_for(1e-3) == 0.3
    chips = np.random.default_rng(1).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    assert embedder.embed(chips).shape == (2, 512)


def test_gpu_providers_come_first_when_installed():
    from facefed.core.embedding import _choose_providers

    assert _choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert _choose_providers(
        ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    ) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert load_default_embedder().providers[-1] == "CPUExecutionProvider"
