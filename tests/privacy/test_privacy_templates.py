import base64
import random

import numpy as np
import pytest

from facefed.core.errors import ProtectionError, TemplateError
from facefed.privacy.protection import generate_key
from facefed.privacy.templates import (
    ProtectedTemplate,
    protect_template,
    similarity,
    stack_templates,
)


def _embeddings(test_data):
    return np.load(test_data / "lfw" / "dlib_embeddings.npz")["embeddings"]


@pytest.mark.parametrize("scheme", ["orthonormal-v1", "biohash-v1"])
def test_wire_round_trip(test_data, scheme):
    key = generate_key(scheme, 3, rng=random.Random(5))
    template = protect_template(_embeddings(test_data)[0], key=key, model_id="m1")
    wire = template.to_wire()
    assert set(wire) == {"model_id", "scheme", "key_version", "dim", "data"}
    assert wire["scheme"] == scheme and wire["key_version"] == 3
    assert wire["dim"] == (128 if scheme == "orthonormal-v1" else 512)
    back = ProtectedTemplate.from_wire(wire)
    np.testing.assert_array_equal(back.data, template.data)
    assert similarity(back, template) == pytest.approx(1.0, abs=1e-6)


def test_float_wire_is_little_endian_float32():
    data = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    wire = ProtectedTemplate("m", "orthonormal-v1", 1, data).to_wire()
    assert base64.b64decode(wire["data"]) == data.astype("<f4").tobytes()


def _wire(**changes):
    wire = ProtectedTemplate(
        "m", "orthonormal-v1", 1, np.ones(4, dtype=np.float32)
    ).to_wire()
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"scheme": "rot13"}, ProtectionError, "rot13"),
        ({"dim": 5}, TemplateError, "needs 20 bytes of data, got 16"),
        ({"dim": "4"}, TemplateError, "dim must be an integer"),
        ({"dim": 0}, TemplateError, "got 0"),
        ({"key_version": 0}, TemplateError, "key version"),
        ({"key_version": True}, TemplateError, "key version"),
        ({"model_id": ""}, TemplateError, "model id"),
        ({"data": "not base64!"}, TemplateError, "base64"),
        ({"data": 12}, TemplateError, "base64 string"),
        ({"extra": 1}, TemplateError, "unknown fields"),
        (
            {
                "data": base64.b64encode(
                    np.array([np.nan] * 4, "<f4").tobytes()
                ).decode()
            },
            TemplateError,
            "NaN",
        ),
    ],
)
def test_from_wire_refuses_malformed(changes, error, message):
    with pytest.raises(error, match=message):
        ProtectedTemplate.from_wire(_wire(**changes))


def test_from_wire_refuses_missing_fields_and_bad_binary():
    with pytest.raises(TemplateError, match="lacks the fields"):
        ProtectedTemplate.from_wire({"model_id": "m"})
    with pytest.raises(TemplateError, match="JSON object"):
        ProtectedTemplate.from_wire([1, 2])
    wire = {
        "model_id": "m",
        "scheme": "biohash-v1",
        "key_version": 1,
        "dim": 12,
        "data": base64.b64encode(b"\x01\x02").decode(),
    }
    with pytest.raises(TemplateError, match="multiple of 8"):
        ProtectedTemplate.from_wire(wire)


def test_templates_of_different_keys_are_not_compared(test_data):
    vector = _embeddings(test_data)[0]
    a = protect_template(vector, key=generate_key("orthonormal-v1", 1), model_id="m")
    b = protect_template(vector, key=generate_key("orthonormal-v1", 2), model_id="m")
    with pytest.raises(TemplateError, match="key_version 1 and 2"):
        similarity(a, b)
    c = protect_template(vector, key=generate_key("orthonormal-v1", 1), model_id="n")
    with pytest.raises(TemplateError, match="model_id"):
        stack_templates([a, c])


def test_template_data_is_read_only():
    template = ProtectedTemplate("m", "orthonormal-v1", 1, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="read-only"):
        template.data[0] = 2.0
