"""Hostile input to the core pipeline: every failure is a clear facefed error.

A failing command must raise a `FacefedError` subclass (which `cli.main`
prints as one line and turns into its exit code) and must leave nothing
behind: no output folder, no half-written file.
"""

import functools
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facefed.core import cli
from facefed.core.detection.scrfd import ScrfdDetector, decode_stride
from facefed.core.errors import (
    ConfigurationError,
    FacefedError,
    ImageError,
    ImageTooLargeError,
    ModelError,
)
from facefed.core.image import decode_image

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE = 640
STRIDES = (8, 16, 32)


@pytest.fixture(scope="module")
def app():
    cli._register_commands()
    return cli.app


@pytest.fixture
def portrait(test_data: Path) -> Path:
    return test_data / "lfw" / "Ann_Veneman" / "Ann_Veneman_0001.jpg"


def _clean_failure(result, error_type: type[FacefedError]) -> FacefedError:
    """The command failed with a facefed error of this type, not a crash."""
    assert result.exit_code != 0
    assert isinstance(result.exception, error_type), repr(result.exception)
    return result.exception


# --- decode_image on forged headers -------------------------------------------


def _bmp(width: int, height: int) -> bytes:
    """A BMP header claiming width x height at 24 bits, with 64 bytes of data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def _jpeg_claiming(photo: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header is edited to claim another size."""
    data = bytearray(photo)
    at = 2
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_canvas(width: int, height: int) -> bytes:
    """An extended WebP header (VP8X) claiming a canvas and holding no image."""
    chunk = (
        b"VP8X"
        + struct.pack("<I", 10)
        + b"\0" * 4
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@pytest.mark.parametrize(
    "make",
    [
        lambda photo: _bmp(60000, 60000),
        lambda photo: _bmp(60000, -60000),  # top-down rows
        lambda photo: _jpeg_claiming(photo, 60000, 60000),
        lambda photo: _webp_canvas(16384, 16384),
        lambda photo: _jpeg_claiming(photo, 7000, 7000),  # 49 MP: over 40 MP
    ],
    ids=["bmp", "bmp-top-down", "jpeg", "webp", "jpeg-49mp"],
)
def test_decompression_bombs_are_refused_from_the_header(portrait: Path, make) -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(make(portrait.read_bytes()))


def test_png_text_chunk_bomb_is_refused(portrait: Path) -> None:
    png = io.BytesIO()
    Image.open(portrait).save(png, "PNG")
    data = png.getvalue()
    bomb = _png_chunk(b"zTXt", b"c\0\0" + zlib.compress(b"A" * 50_000_000, 9))
    with pytest.raises(ImageError, match="too large"):
        decode_image(data[:33] + bomb + data[33:])


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_images_give_their_first_frame(portrait: Path, fmt: str) -> None:
    first = Image.open(portrait).convert("RGB")
    mirrored = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    animated = io.BytesIO()
    first.save(animated, fmt, save_all=True, append_images=[mirrored], lossless=True)
    decoded = decode_image(animated.getvalue())
    assert np.array_equal(decoded, np.asarray(first))


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_out_of_range_exif_orientation_is_ignored(
    portrait: Path, orientation: int
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = io.BytesIO()
    Image.open(portrait).save(jpeg, "JPEG", exif=exif, quality=95)
    assert decode_image(jpeg.getvalue()).shape == (250, 250, 3)


def test_paths_that_are_not_files(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "b.jpg", tmp_path / "a.jpg")
    os.symlink(tmp_path / "a.jpg", tmp_path / "b.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would block forever
    for name in ("folder.jpg", "a.jpg", "pipe.jpg", "absent.jpg"):
        with pytest.raises(ImageError, match="No image file"):
            decode_image(tmp_path / name)


# --- facefed align --out / detect --draw ---------------------------------------


def test_align_onto_a_file_fails_cleanly_and_keeps_the_file(
    app, portrait: Path, tmp_path: Path
) -> None:
    target = tmp_path / "chips"
    target.write_text("mine")
    for out in (target, target / "sub"):
        result = CliRunner().invoke(app, ["align", str(portrait), "--out", str(out)])
        error = _clean_failure(result, ConfigurationError)
        assert "is a file" in str(error) and error.exit_code == 2
    assert target.read_text() == "mine"


def test_align_of_an_unreadable_image_creates_no_folder(app, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    out = tmp_path / "new" / "chips"
    result = CliRunner().invoke(app, ["align", str(empty), "--out", str(out)])
    _clean_failure(result, ImageError)
    assert not (tmp_path / "new").exists()


def test_align_keeps_chips_of_same_named_images_apart(
    app, portrait: Path, tmp_path: Path
) -> None:
    mirrored = np.ascontiguousarray(np.asarray(Image.open(portrait))[:, ::-1])
    for folder, pixels in (("a", np.asarray(Image.open(portrait))), ("b", mirrored)):
        (tmp_path / folder).mkdir()
        Image.fromarray(pixels).save(tmp_path / folder / "photo.png")
    out = tmp_path / "chips"
    result = CliRunner().invoke(
        app,
        ["align", *(str(tmp_path / f"{d}/photo.png") for d in "ab"), "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["photo-2_1.png", "photo_1.png"]
    first = np.asarray(Image.open(out / "photo_1.png"), np.int16)
    second = np.asarray(Image.open(out / "photo-2_1.png"), np.int16)
    # The second chip is the mirrored face, not a copy of the first.
    assert np.abs(first - second).mean() > 5


@pytest.mark.parametrize("name", ["boxes.xyz", "boxes", "sub/"])
def test_draw_with_an_unknown_format_is_refused_before_any_work(
    app, portrait: Path, tmp_path: Path, name: str
) -> None:
    target = tmp_path / name
    result = CliRunner().invoke(app, ["detect", str(portrait), "--draw", str(target)])
    _clean_failure(result, ConfigurationError)
    assert list(tmp_path.iterdir()) == []


def test_draw_under_a_file_is_refused(app, portrait: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(
        app, ["detect", str(portrait), "--draw", str(blocker / "boxes.png")]
    )
    _clean_failure(result, ConfigurationError)
    assert blocker.read_text() == "x"


def test_draw_as_jpeg(app, portrait: Path, tmp_path: Path) -> None:
    target = tmp_path / "boxes.jpg"
    result = CliRunner().invoke(app, ["detect", str(portrait), "--draw", str(target)])
    assert result.exit_code == 0, result.output
    assert Image.open(target).format == "JPEG"


# --- SCRFD with files that are not SCRFD models --------------------------------


def _outputs(*, box_width: int = 4, kps_width: int = 10, fill: float = 1.0):
    arrays = {}
    for stride in STRIDES:
        n = (SIZE // stride) ** 2 * 2
        score = np.full((n, 1), 0.01, np.float32)
        score[7] = 0.9
        arrays[f"score_{stride}"] = score
        arrays[f"bbox_{stride}"] = np.full((n, box_width), fill, np.float32)
        arrays[f"kps_{stride}"] = np.zeros((n, kps_width), np.float32)
    # InsightFace's output order: scores, boxes, then landmarks, by stride.
    return {
        name: arrays[name]
        for kind in ("score", "bbox", "kps")
        for name in (f"{kind}_{stride}" for stride in STRIDES)
    }


def _save(path: Path, nodes, inputs, outputs) -> Path:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _constant_model(path: Path, arrays, *, input_type=TensorProto.FLOAT, rank=4):
    names = list(arrays)
    nodes = [
        helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(arrays[name], name)
        )
        for name in names
    ]
    shape = [1, 3, SIZE, SIZE][-rank:] if rank else None
    inputs = (
        [helper.make_tensor_value_info("input.1", input_type, shape)] if rank else []
    )
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(arrays[n].shape))
        for n in names
    ]
    return _save(path, nodes, inputs, outputs)


def _symbolic_model(path: Path, arrays) -> Path:
    """Outputs tiled by the input's symbolic batch size: onnxruntime cannot
    know their shapes before running, so facefed maps them by position."""
    nodes = [
        helper.make_node("Shape", ["input.1"], ["shape"]),
        helper.make_node(
            "Constant", [], ["lo"], value=numpy_helper.from_array(np.array([0]))
        ),
        helper.make_node(
            "Constant", [], ["hi"], value=numpy_helper.from_array(np.array([1]))
        ),
        helper.make_node("Slice", ["shape", "lo", "hi"], ["batch"]),
        helper.make_node(
            "Constant", [], ["ones"], value=numpy_helper.from_array(np.array([1, 1]))
        ),
        helper.make_node("Concat", ["batch", "ones"], ["repeats"], axis=0),
    ]
    for name, value in arrays.items():
        nodes.append(
            helper.make_node(
                "Constant",
                [],
                [f"{name}_c"],
                value=numpy_helper.from_array(value[None], f"{name}_c"),
            )
        )
        nodes.append(helper.make_node("Tile", [f"{name}_c", "repeats"], [name]))
    inputs = [
        helper.make_tensor_value_info(
            "input.1", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE]
        )
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in arrays
    ]
    return _save(path, nodes, inputs, outputs)


def test_scrfd_without_an_input_is_refused(tmp_path: Path) -> None:
    model = _constant_model(tmp_path / "m.onnx", _outputs(), rank=0)
    with pytest.raises(ModelError, match="0 inputs"):
        ScrfdDetector(model)


@pytest.mark.parametrize(
    ("input_type", "rank"), [(TensorProto.INT64, 4), (TensorProto.FLOAT, 2)]
)
def test_scrfd_with_the_wrong_input_is_refused_on_loading(
    tmp_path: Path, input_type: int, rank: int
) -> None:
    model = _constant_model(
        tmp_path / "m.onnx", _outputs(), input_type=input_type, rank=rank
    )
    with pytest.raises(ModelError, match="takes tensor"):
        ScrfdDetector(model)


def test_scrfd_symbolic_outputs_are_decoded(tmp_path: Path, portrait: Path) -> None:
    detector = ScrfdDetector(_symbolic_model(tmp_path / "m.onnx", _outputs()))
    faces = detector.detect(decode_image(portrait))
    # One strong anchor per stride; anchor 7 = location (3, 0), second anchor.
    assert len(faces) == 3
    assert all(face.landmarks is not None for face in faces)


@pytest.mark.parametrize(
    ("arrays", "what"),
    [
        (_outputs(kps_width=7), "landmarks"),
        (_outputs(box_width=3), "boxes"),
    ],
    ids=["landmarks", "boxes"],
)
def test_scrfd_symbolic_outputs_of_the_wrong_size_are_refused(
    tmp_path: Path, portrait: Path, arrays, what: str
) -> None:
    detector = ScrfdDetector(_symbolic_model(tmp_path / "m.onnx", arrays))
    with pytest.raises(ModelError, match=f"x \\d+ {what}"):
        detector.detect(decode_image(portrait))


def test_scrfd_non_finite_boxes_are_dropped(tmp_path: Path, portrait: Path) -> None:
    model = _constant_model(tmp_path / "m.onnx", _outputs(fill=np.inf))
    assert ScrfdDetector(model).detect(decode_image(portrait)) == []


def test_decode_stride_refuses_text_outputs() -> None:
    n = (SIZE // 32) ** 2 * 2
    with pytest.raises(ModelError, match="scores"):
        decode_stride(
            np.array(["x"] * n),
            np.zeros((n, 4)),
            None,
            size=SIZE,
            stride=32,
            score_threshold=0.5,
        )


# --- degenerate images through the detectors -----------------------------------


@pytest.mark.parametrize("spec", ["yunet", "hog", "cnn"])
@pytest.mark.parametrize("shape", [(1, 1), (9, 9), (1, 30000), (30000, 2)])
def test_detectors_take_one_pixel_and_strip_images(
    spec: str, shape: tuple[int, int]
) -> None:
    image = np.full((*shape, 3), 128, np.uint8)
    assert _detector(spec).detect(image) == []


@functools.cache
def _detector(spec: str):
    """One detector per spec for the whole module (dlib's models load slowly)."""
    from facefed.core.detection.registry import create_detector

    return create_detector(spec)


def test_file_names_are_shown_as_text_not_markup(
    app, portrait: Path, tmp_path: Path
) -> None:
    styled = tmp_path / "[red]photo.jpg"
    styled.write_bytes(portrait.read_bytes())
    (tmp_path / "d[").mkdir()
    missing = tmp_path / "d[" / "x].jpg"  # the path holds "[/x]", a closing tag
    result = CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["detect", str(styled), str(missing)]
    )
    assert result.exit_code == 3, result.output
    assert "[red]photo.jpg" in result.stdout
    assert "d[/x].jpg" in result.stdout


# --- logic: the quality gate's yaw against solvePnP on real turned faces --------


@pytest.mark.parametrize("spec", ["yunet", "hog"])
def test_five_point_yaw_follows_solvepnp_on_turned_faces(
    test_data: Path, spec: str
) -> None:
    from facefed.core.liveness.landmarks import measure_face
    from facefed.core.quality import estimate_pose

    detector = _detector(spec)
    folder = test_data / "liveness"
    # 0003: the subject turned to her left (face towards the image's right),
    # 0018: to her right; 0007 is near-frontal.
    expected_sign = {"0003": 1, "0018": -1, "0007": 0}
    for number, sign in expected_sign.items():
        image = decode_image(folder / f"Amelie_Mauresmo_{number}.jpg")
        face = max(detector.detect(image), key=lambda f: f.width * f.height)
        five_point = estimate_pose(face.landmarks).yaw
        reference = measure_face(image, face).yaw  # 68 points + solvePnP
        assert abs(five_point - reference) < 12, (number, five_point, reference)
        if sign:
            assert np.sign(five_point) == sign and abs(five_point) > 12
