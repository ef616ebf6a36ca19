"""dlib file parser and the PyTorch ResNet, checked against dlib itself."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facefed.core.errors import ModelError
from facefed.models.dlib_format import (
    DlibFormatError,
    DlibReader,
    parse_dlib_net,
    read_dlib_net,
)
from facefed.models.dlib_resnet import (
    STAGE_NAMES,
    DlibResNet,
    dlib_weights_path,
    load_dlib_resnet,
)

CHIP_PEOPLE = ["Ann_Veneman", "Boris_Becker", "Nelson_Mandela", "Victoria_Beckham"]


def dlib_chips_and_descriptors(test_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Make 150x150 chips with dlib (HOG, 5 points, get_face_chip) and descriptors."""
    import dlib
    import face_recognition_models as frm

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    descriptor = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    chips, references = [], []
    for person in CHIP_PEOPLE:
        for number in (1, 2):
            path = test_data / "lfw" / person / f"{person}_{number:04d}.jpg"
            image = np.asarray(Image.open(path).convert("RGB"))
            boxes = detector(image, 1)
            assert boxes, f"dlib finds no face in {path}"
            shape = predictor(image, boxes[0])
            chip = dlib.get_face_chip(image, shape, 150, 0.25)
            chips.append(chip)
            references.append(np.array(descriptor.compute_face_descriptor(chip)))
    return np.stack(chips), np.stack(references).astype(np.float32)


@pytest.fixture(scope="module")
def dlib_reference(test_data: Path) -> tuple[np.ndarray, np.ndarray]:
    return dlib_chips_and_descriptors(test_data)


@pytest.fixture(scope="module")
def network() -> DlibResNet:
    return load_dlib_resnet()


def test_integer_encoding_follows_dlib_control_byte():
    # 0x01 0x05 = 5; 0x82 0x2c 0x01 = -300; 0x00 = 0; 0x03 ... = 0xa3d70a.
    reader = DlibReader(b"\x01\x05\x82\x2c\x01\x00\x03\x0a\xd7\xa3")
    assert [reader.read_int() for _ in range(4)] == [5, -300, 0, 0xA3D70A]
    assert reader.at_end


def test_float_is_mantissa_and_exponent():
    # dlib's margin of 0.04 as written in the model file.
    reader = DlibReader(b"\x03\x0a\xd7\xa3\x81\x1c")
    assert reader.read_float() == pytest.approx(0.04, rel=1e-7)


def test_tensor_reads_shape_and_little_endian_floats():
    values = np.array([1.5, -2.0, 3.25, 0.0, 7.0, -1e-3], dtype="<f4")
    blob = b"\x01\x02" + b"\x01\x01\x01\x02\x01\x03\x01\x01" + values.tobytes()
    tensor = DlibReader(blob).read_tensor()
    assert tensor.shape == (1, 2, 3, 1)
    np.testing.assert_array_equal(tensor.reshape(-1), values)


def test_structure_of_the_resnet_file():
    net = read_dlib_net(dlib_weights_path())
    kinds = net.layer_names()
    assert net.loss == "loss_metric_2"
    assert net.loss_params["dist_thresh"] == pytest.approx(0.6)
    assert net.input.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert (net.input.rows, net.input.cols) == (150, 150)
    assert kinds.count("con") == 29
    assert kinds.count("affine") == 29
    assert kinds.count("max_pool") == 1
    assert kinds.count("add_prev") == 14
    assert kinds[:4] == ["con", "affine", "relu", "max_pool"]
    assert kinds[-2:] == ["avg_pool", "fc"]
    fc = net.layers[-1]
    assert fc.tensors["weight"].shape == (256, 128)
    assert "bias" not in fc.tensors
    strided = [layer for layer in net.layers if layer.ints.get("stride_y") == 2]
    assert all(layer.ints["pad_y"] == 0 for layer in strided)


def test_truncated_file_is_refused():
    data = dlib_weights_path().read_bytes()
    with pytest.raises(DlibFormatError, match="ends early"):
        parse_dlib_net(data[: len(data) // 2])


def test_trailing_bytes_are_refused():
    data = dlib_weights_path().read_bytes()
    with pytest.raises(DlibFormatError, match="unread bytes"):
        parse_dlib_net(data + b"\x01\x01")


def test_other_file_is_refused(test_data: Path):
    with pytest.raises(DlibFormatError):
        parse_dlib_net((test_data / "antispoof" / "image_T1.jpg").read_bytes())


def test_missing_file_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="Cannot read"):
        load_dlib_resnet(tmp_path / "absent.dat")


def test_matches_dlib_compute_face_descriptor(network, dlib_reference):
    chips, references = dlib_reference
    batch = torch.from_numpy(chips).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ours = network(batch).numpy()
    assert ours.shape == (len(chips), 128)
    cosine = (ours * references).sum(1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(references, axis=1)
    )
    assert cosine.min() >= 0.9999
    assert np.abs(ours - references).max() <= 1e-4
    # dlib's descriptors are not unit length; ours keep that scale.
    assert np.linalg.norm(ours, axis=1) == pytest.approx(
        np.linalg.norm(references, axis=1), rel=1e-4
    )


def test_different_people_are_further_apart_than_same_person(network, dlib_reference):
    chips, _ = dlib_reference
    with torch.no_grad():
        emb = network(torch.from_numpy(chips).permute(0, 3, 1, 2).float()).numpy()
    distances = np.linalg.norm(emb[:, None] - emb[None], axis=2)
    same = [distances[i, i + 1] for i in range(0, len(chips), 2)]
    different = [
        distances[i, j]
        for i in range(len(chips))
        for j in range(len(chips))
        if i // 2 != j // 2
    ]
    # dlib's documented decision distance is 0.6.
    assert max(same) < 0.6 < min(different)


def test_stages_are_named_and_can_be_frozen(network):
    model = load_dlib_resnet()
    assert [name for name, _ in model.trainable_groups()] == list(STAGE_NAMES)
    assert model.freeze_all_but(2) == ["stage5", "embedding"]
    trainable = {
        n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == {"stage5", "embedding"}
    with pytest.raises(ModelError, match="between 0 and 7"):
        model.freeze_all_but(8)
