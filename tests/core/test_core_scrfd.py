"""SCRFD decoding, on an ONNX graph built here whose outputs are known constants."""

from pathlib import Path

import numpy as np
import pytest

from facefed.core.detection.registry import create_detector
from facefed.core.detection.scrfd import (
    ScrfdDetector,
    anchor_centres,
    choose_providers,
    letterbox,
)
from facefed.core.errors import ModelError
from facefed.core.image import decode_image

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE = 640
STRIDES = (8, 16, 32)


def _anchor_index(stride: int, x: int, y: int, anchor: int) -> int:
    return 2 * (y * (SIZE // stride) + x) + anchor


def _outputs(batch_dim: bool) -> dict[str, np.ndarray]:
    """Raw SCRFD outputs with three strong anchors and faint noise elsewhere."""
    arrays: dict[str, np.ndarray] = {}
    for stride in STRIDES:
        n = (SIZE // stride) ** 2 * 2
        arrays[f"score_{stride}"] = np.full((n, 1), 0.01, np.float32)
        arrays[f"bbox_{stride}"] = np.ones((n, 4), np.float32)
        arrays[f"kps_{stride}"] = np.zeros((n, 10), np.float32)
    kps = np.array([-1, -1, 1, -1, 0, 0.5, -0.8, 1.5, 0.8, 1.5], np.float32)
    # Stride 8, location (20, 30), second anchor: centre (160, 240).
    a = _anchor_index(8, 20, 30, 1)
    arrays["score_8"][a] = 0.9
    arrays["bbox_8"][a] = [2, 3, 4, 5]
    arrays["kps_8"][a] = kps
    # Its neighbour (centre 168, 240): the same face, weaker; NMS drops it.
    b = _anchor_index(8, 21, 30, 0)
    arrays["score_8"][b] = 0.8
    arrays["bbox_8"][b] = [2, 3, 4, 5]
    arrays["kps_8"][b] = kps
    # Stride 32, location (5, 5), first anchor: centre (160, 160).
    c = _anchor_index(32, 5, 5, 0)
    arrays["score_32"][c] = 0.7
    arrays["bbox_32"][c] = [1, 1, 1, 1]
    arrays["kps_32"][c] = kps
    if batch_dim:
        arrays = {name: value[None] for name, value in arrays.items()}
    return arrays


def _build(
    path: Path, *, batch_dim: bool, with_kps: bool = True, symbolic: bool = False
) -> Path:
    arrays = _outputs(batch_dim)
    # InsightFace's output order: scores, then boxes, then landmarks.
    names = [f"score_{s}" for s in STRIDES] + [f"bbox_{s}" for s in STRIDES]
    if with_kps:
        names += [f"kps_{s}" for s in STRIDES]
    nodes = [
        helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(arrays[name], name)
        )
        for name in names
    ]
    graph = helper.make_graph(
        nodes,
        "scrfd_constant",
        [
            helper.make_tensor_value_info(
                "input.1", TensorProto.FLOAT, [1, 3, SIZE, SIZE]
            )
        ],
        [
            helper.make_tensor_value_info(
                name, TensorProto.FLOAT, list(arrays[name].shape)
            )
            for name in names
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def group_photo(test_data: Path) -> np.ndarray:
    return decode_image(test_data / "detection" / "facenet_pytorch_multiface.jpg")


@pytest.mark.parametrize(
    ("batch_dim", "symbolic"), [(False, False), (True, False), (False, True)]
)
def test_decoding_gives_the_known_boxes_and_landmarks(
    tmp_path: Path, group_photo: np.ndarray, batch_dim: bool, symbolic: bool
) -> None:
    model = _build(tmp_path / "scrfd.onnx", batch_dim=batch_dim, symbolic=symbolic)
    detector = ScrfdDetector(model)
    faces = detector.detect(group_photo)

    # The photo is 1200x630: letterboxed at 640/1200, 336 rows high.
    scale = 336 / 630
    assert len(faces) == 2
    first, second = faces
    assert first.score == pytest.approx(0.9) and second.score == pytest.approx(0.7)
    np.testing.assert_allclose(
        first.box, np.array([160 - 16, 240 - 24, 160 + 32, 240 + 40]) / scale, rtol=1e-5
    )
    expected_kps = np.array(
        [[152, 232], [168, 232], [160, 244], [153.6, 252], [166.4, 252]]
    )
    np.testing.assert_allclose(first.landmarks, expected_kps / scale, rtol=1e-5)
    np.testing.assert_allclose(
        second.box, np.array([128, 128, 192, 192]) / scale, rtol=1e-5
    )
    np.testing.assert_allclose(
        second.landmarks,
        (np.array([[-32, -32], [32, -32], [0, 16], [-25.6, 48], [25.6, 48]]) + 160)
        / scale,
        rtol=1e-5,
    )


def test_nms_and_score_threshold_are_applied(
    tmp_path: Path, group_photo: np.ndarray
) -> None:
    model = _build(tmp_path / "scrfd.onnx", batch_dim=False)
    loose = ScrfdDetector(model, nms_threshold=0.9, score_threshold=0.05)
    assert [round(f.score, 2) for f in loose.detect(group_photo)] == [0.9, 0.8, 0.7]
    strict = ScrfdDetector(model, score_threshold=0.75)
    assert [round(f.score, 2) for f in strict.detect(group_photo)] == [0.9]


def test_model_without_landmark_head(tmp_path: Path, group_photo: np.ndarray) -> None:
    model = _build(tmp_path / "scrfd.onnx", batch_dim=False, with_kps=False)
    faces = ScrfdDetector(model).detect(group_photo)
    assert len(faces) == 2 and all(face.landmarks is None for face in faces)


def test_registry_spec_and_model_folder(
    tmp_path: Path, group_photo: np.ndarray, monkeypatch
) -> None:
    from facefed.core.settings import get_core_settings

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    _build(model_dir / "scrfd_test.onnx", batch_dim=False)
    monkeypatch.setenv("FACEFED_MODEL_CACHE", str(model_dir))
    get_core_settings.cache_clear()
    detector = create_detector("scrfd:scrfd_test.onnx")
    assert detector.name == "scrfd"
    assert len(detector.detect(group_photo)) == 2


def test_checksum_and_layout_are_checked(tmp_path: Path) -> None:
    model = _build(tmp_path / "scrfd.onnx", batch_dim=False)
    with pytest.raises(ModelError, match="SHA-256"):
        ScrfdDetector(model, expected_sha256="0" * 64)
    # The graph's fixed 640 input does not fit a 320 detector.
    with pytest.raises(ModelError, match="with a 320 input takes"):
        ScrfdDetector(model, input_size=320)
    with pytest.raises(ModelError, match="No SCRFD model"):
        ScrfdDetector(tmp_path / "absent.onnx")


def test_letterbox_normalises_and_pads_black(group_photo: np.ndarray) -> None:
    tensor, fit = letterbox(group_photo, SIZE)
    assert tensor.shape == (1, 3, SIZE, SIZE) and tensor.dtype == np.float32
    assert fit.scale == pytest.approx(336 / 630)
    # Below the picture: black pixels, normalised.
    assert np.allclose(tensor[0, :, 336:, :], -127.5 / 128)
    # Picture pixels: RGB, (x - 127.5) / 128.
    top_left = (group_photo[0, 0].astype(np.float32) - 127.5) / 128
    assert np.allclose(tensor[0, :, 0, 0], top_left, atol=0.1)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_anchor_centres_layout() -> None:
    centres = anchor_centres(SIZE, 32)
    assert centres.shape == (800, 2)
    assert centres[:4].tolist() == [[0, 0], [0, 0], [32, 0], [32, 0]]
    assert centres[2 * 20].tolist() == [0, 32]


def test_cuda_is_preferred_when_available(caplog) -> None:
    assert choose_providers(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    ) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level("INFO", logger="facefed.core.detection.scrfd"):
        assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "runs on the CPU" in caplog.text


def test_session_uses_what_this_machine_offers(tmp_path: Path) -> None:
    import onnxruntime as ort

    detector = ScrfdDetector(_build(tmp_path / "scrfd.onnx", batch_dim=False))
    expected = choose_providers(ort.get_available_providers())
    assert detector.providers[0] == expected[0]
