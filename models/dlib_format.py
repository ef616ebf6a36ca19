"""Reader of dlib's binary serialisation of DNN files, written without dlib.

dlib (``dlib/serialize.h``, ``dlib/dnn/core.h``) writes a network as nested
records. What this reader relies on was measured on
``dlib_face_recognition_resnet_model_v1.dat``:

* An integer is a control byte whose low nibble is the number of magnitude
  bytes that follow and whose bit 0x80 marks a negative value; the magnitude
  is little-endian. A float is two integers, mantissa and base-2 exponent.
  A string is its length then its bytes; a bool is the ASCII byte ``0``/``1``.
* A tensor is a version (2), four integers ``n, k, nr, nc`` and ``n*k*nr*nc``
  raw little-endian float32 values. An alias tensor (a view into a layer's
  parameters) is a version (1) and four integers.
* A network is its loss layer (version, name, loss parameters) followed by a
  run of versions, one per layer from the output down to the input: 2 for a
  computational layer, 1 for a tag or skip layer (which carries nothing else),
  3 for the layer sitting on the input layer. Then comes the input layer, and
  then each computational layer's record from the input upwards: its name
  (e.g. ``con_4``), its parameters, three bools and three (empty) tensors of
  training state; the bottom layer adds its sample expansion factor.

The tag and skip layers' ids are part of dlib's C++ type, not of the file, so
this reader returns them as anonymous ``tag`` records in their place; the
module that builds a network checks the record sequence against the
architecture it expects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from facefed.core.errors import ModelError

logger = logging.getLogger(__name__)

FloatTensor = npt.NDArray[np.float32]

_TAG_VERSION = 1
_LAYER_VERSION = 2
_BOTTOM_LAYER_VERSION = 3
_TENSOR_VERSION = 2
_ALIAS_VERSION = 1


class DlibFormatError(ModelError):
    """Raised when a dlib model file does not have the expected structure."""


@dataclass(frozen=True)
class InputRecord:
    """The input layer of a network.

    Attributes:
        name: dlib's name of the layer, e.g. ``input_rgb_image_sized``.
        mean_rgb: Mean colour subtracted from the pixels (0..255 scale).
        rows: Input height in pixels.
        cols: Input width in pixels.
    """

    name: str
    mean_rgb: tuple[float, float, float]
    rows: int
    cols: int


@dataclass(frozen=True)
class LayerRecord:
    """One layer of a dlib network as stored in the file.

    Attributes:
        kind: ``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``,
            ``add_prev``, ``fc`` or ``tag`` (a tag or skip layer).
        name: The name string dlib stored (``con_4``...), empty for tags.
        ints: Integer settings by name (filters, strides, paddings...).
        tensors: Parameter tensors by name, float32.
    """

    kind: str
    name: str
    ints: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, FloatTensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DlibNet:
    """A parsed dlib network.

    Attributes:
        loss: Name of the loss layer, e.g. ``loss_metric_2``.
        loss_params: The loss layer's float settings by name.
        input: The input layer.
        layers: Every layer from the input upwards (tags included).
    """

    loss: str
    loss_params: dict[str, float]
    input: InputRecord
    layers: list[LayerRecord]

    def layer_names(self) -> list[str]:
        """Return the kind of every layer, input first, e.g. for a structure dump."""
        return [layer.kind for layer in self.layers]


class DlibReader:
    """Sequential reader of dlib's primitive types from a byte buffer."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.pos = 0

    @property
    def at_end(self) -> bool:
        """True when every byte has been read."""
        return self.pos >= len(self._data)

    def _take(self, count: int) -> memoryview:
        if count < 0 or self.pos + count > len(self._data):
            raise DlibFormatError(
                f"The dlib file ends early: {count} bytes wanted at offset "
                f"{self.pos} of {len(self._data)}."
            )
        chunk = self._data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def read_int(self) -> int:
        """Read one integer (control byte, then little-endian magnitude)."""
        control = self._take(1)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise DlibFormatError(
                f"Bad integer control byte {control:#04x} at offset {self.pos - 1}."
            )
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if control & 0x80 else value

    def peek_int(self) -> int:
        """Return the next integer without consuming it."""
        saved = self.pos
        try:
            return self.read_int()
        finally:
            self.pos = saved

    def read_float(self) -> float:
        """Read a float stored as mantissa and base-2 exponent."""
        mantissa = self.read_int()
        exponent = self.read_int()
        return float(np.ldexp(float(mantissa), exponent))

    def read_str(self) -> str:
        """Read a length-prefixed string."""
        length = self.read_int()
        return bytes(self._take(length)).decode("ascii", errors="replace")

    def read_bool(self) -> bool:
        """Read a bool stored as the ASCII byte 0 or 1."""
        byte = bytes(self._take(1))
        if byte not in (b"0", b"1"):
            raise DlibFormatError(f"Bad bool byte {byte!r} at offset {self.pos - 1}.")
        return byte == b"1"

    def read_tensor(self) -> FloatTensor:
        """Read a tensor: version, n, k, nr, nc, then float32 values."""
        version = self.read_int()
        if version != _TENSOR_VERSION:
            raise DlibFormatError(
                f"Unknown tensor version {version} at offset {self.pos}; "
                f"expected {_TENSOR_VERSION}."
            )
        shape = tuple(self.read_int() for _ in range(4))
        if min(shape) < 0:
            raise DlibFormatError(f"Negative tensor shape {shape} at {self.pos}.")
        count = int(np.prod(shape))
        raw = self._take(4 * count)
        values = np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
        return values.reshape(shape)

    def read_alias(self) -> tuple[int, int, int, int]:
        """Read an alias tensor's shape (version, then n, k, nr, nc)."""
        version = self.read_int()
        if version != _ALIAS_VERSION:
            raise DlibFormatError(
                f"Unknown alias tensor version {version} at offset {self.pos}."
            )
        n, k, nr, nc = (self.read_int() for _ in range(4))
        return n, k, nr, nc


def _read_con(reader: DlibReader, name: str) -> LayerRecord:
    params = reader.read_tensor()
    keys = ("filters", "rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")
    ints = {key: reader.read_int() for key in keys}
    filter_shape = reader.read_alias()
    bias_shape = reader.read_alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        reader.read_float()
    n_weights = int(np.prod(filter_shape))
    n_bias = int(np.prod(bias_shape))
    flat = params.reshape(-1)
    if flat.size != n_weights + n_bias:
        raise DlibFormatError(
            f"Convolution {name} holds {flat.size} values, expected "
            f"{n_weights} weights + {n_bias} biases."
        )
    return LayerRecord(
        kind="con",
        name=name,
        ints=ints,
        tensors={
            "weight": flat[:n_weights].reshape(filter_shape).copy(),
            "bias": flat[n_weights:].copy(),
        },
    )


def _read_affine(reader: DlibReader, name: str) -> LayerRecord:
    params = reader.read_tensor().reshape(-1)
    gamma_shape = reader.read_alias()
    beta_shape = reader.read_alias()
    mode = reader.read_int()
    channels = int(np.prod(gamma_shape))
    if params.size != channels + int(np.prod(beta_shape)):
        raise DlibFormatError(f"Affine layer holds {params.size} values.")
    return LayerRecord(
        kind="affine",
        name=name,
        ints={"channels": channels, "mode": mode},
        tensors={
            "gamma": params[:channels].copy(),
            "beta": params[channels:].copy(),
        },
    )


def _read_pool(reader: DlibReader, name: str, kind: str) -> LayerRecord:
    keys = ("rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")
    return LayerRecord(
        kind=kind, name=name, ints={key: reader.read_int() for key in keys}
    )


def _read_fc(reader: DlibReader, name: str) -> LayerRecord:
    outputs = reader.read_int()
    inputs = reader.read_int()
    params = reader.read_tensor().reshape(-1)
    weight_shape = reader.read_alias()
    bias_shape = reader.read_alias()
    bias_mode = reader.read_int()
    for _ in range(4):
        reader.read_float()
    n_weights = int(np.prod(weight_shape))
    if n_weights != inputs * outputs:
        raise DlibFormatError(
            f"Fully connected layer stores {n_weights} weights for "
            f"{inputs} inputs and {outputs} outputs."
        )
    # dlib computes x @ W with W stored inputs x outputs.
    tensors = {"weight": params[:n_weights].reshape(inputs, outputs).copy()}
    if int(np.prod(bias_shape)):
        tensors["bias"] = params[n_weights:].copy()
    return LayerRecord(
        kind="fc",
        name=name,
        ints={"outputs": outputs, "inputs": inputs, "bias_mode": bias_mode},
        tensors=tensors,
    )


def _read_details(reader: DlibReader) -> LayerRecord:
    name = reader.read_str()
    if name.startswith("con_"):
        return _read_con(reader, name)
    if name == "affine_":
        return _read_affine(reader, name)
    if name == "relu_":
        return LayerRecord(kind="relu", name=name)
    if name == "add_prev_":
        return LayerRecord(kind="add_prev", name=name)
    if name.startswith("max_pool_"):
        return _read_pool(reader, name, "max_pool")
    if name.startswith("avg_pool_"):
        return _read_pool(reader, name, "avg_pool")
    if name.startswith("fc_"):
        return _read_fc(reader, name)
    raise DlibFormatError(
        f"Unsupported dlib layer {name!r} at offset {reader.pos}; known: con_, "
        "affine_, relu_, add_prev_, max_pool_, avg_pool_, fc_."
    )


def _read_training_state(reader: DlibReader) -> None:
    for _ in range(3):  # setup done, gradient stale, output disabled
        reader.read_bool()
    for _ in range(3):  # x_grad, cached output, parameter gradient
        reader.read_tensor()


def _read_loss(reader: DlibReader) -> tuple[str, dict[str, float]]:
    reader.read_int()  # loss wrapper version
    name = reader.read_str()
    if name == "loss_metric_2":
        return name, {"margin": reader.read_float(), "dist_thresh": reader.read_float()}
    raise DlibFormatError(
        f"Unsupported dlib loss layer {name!r}; this reader knows loss_metric_2."
    )


def _read_versions(reader: DlibReader) -> list[int]:
    versions: list[int] = []
    while True:
        version = reader.read_int()
        if version not in (_TAG_VERSION, _LAYER_VERSION, _BOTTOM_LAYER_VERSION):
            raise DlibFormatError(
                f"Unexpected layer version {version} at offset {reader.pos}."
            )
        versions.append(version)
        if version == _BOTTOM_LAYER_VERSION:
            return versions


def _read_input(reader: DlibReader) -> InputRecord:
    name = reader.read_str()
    if name != "input_rgb_image_sized":
        raise DlibFormatError(
            f"Unsupported input layer {name!r}; expected input_rgb_image_sized."
        )
    mean = (reader.read_float(), reader.read_float(), reader.read_float())
    rows = reader.read_int()
    cols = reader.read_int()
    return InputRecord(name=name, mean_rgb=mean, rows=rows, cols=cols)


def parse_dlib_net(data: bytes) -> DlibNet:
    """Parse a dlib DNN file held in memory.

    Args:
        data: The whole file.

    Returns:
        The loss, input and layer records, input first.

    Raises:
        DlibFormatError: The bytes are not a dlib network this reader knows.
    """
    reader = DlibReader(data)
    loss, loss_params = _read_loss(reader)
    versions = _read_versions(reader)
    input_record = _read_input(reader)
    layers: list[LayerRecord] = []
    for version in reversed(versions):
        if version == _TAG_VERSION:
            layers.append(LayerRecord(kind="tag", name=""))
            continue
        layers.append(_read_details(reader))
        _read_training_state(reader)
        if version == _BOTTOM_LAYER_VERSION:
            reader.read_int()  # sample expansion factor
    if not reader.at_end:
        raise DlibFormatError(
            f"{len(data) - reader.pos} unread bytes after the last layer."
        )
    return DlibNet(
        loss=loss, loss_params=loss_params, input=input_record, layers=layers
    )


def read_dlib_net(path: str | Path) -> DlibNet:
    """Read and parse a dlib DNN file (e.g. the ResNet face descriptor).

    Args:
        path: Path of the ``.dat`` file (not compressed).

    Returns:
        The parsed network.

    Raises:
        DlibFormatError: The file is not a dlib network this reader knows.
        ModelError: The file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ModelError(f"Cannot read the dlib model file {path}: {error}") from error
    net = parse_dlib_net(data)
    logger.debug("Parsed %s: %d layer records", path, len(net.layers))
    return net


__all__ = [
    "DlibFormatError",
    "DlibNet",
    "DlibReader",
    "InputRecord",
    "LayerRecord",
    "parse_dlib_net",
    "read_dlib_net",
]
