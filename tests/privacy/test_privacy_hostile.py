"""Hostile input to the privacy library: clear errors, never a silent success.

Wire templates and rotation transforms come from other machines; the privacy
ledger is a file anyone with disk access can edit. None of them may be
misread into a weaker guarantee (a lower spent budget, a scaled gallery).
"""

import base64
import json
import math
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

from facefed.core.errors import (
    ConfigurationError,
    PrivacyBudgetExceededError,
    ProtectionError,
    TemplateError,
)
from facefed.privacy.dp import DPConfig, LedgerError, PrivacyLedger
from facefed.privacy.protection import generate_key
from facefed.privacy.rotation import (
    RotationTransform,
    apply_rotation,
    rotation_transform,
)
from facefed.privacy.templates import ProtectedTemplate, protect_template

CONFIG = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    data = np.load(Path(__file__).parents[1] / "data" / "lfw" / "dlib_embeddings.npz")
    return data["embeddings"][:6].astype(np.float32)


@pytest.fixture
def good_wire(embeddings) -> dict:
    key = generate_key("orthonormal-v1", 1)
    return protect_template(embeddings[0], key=key, model_id="dlib-resnet").to_wire()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("model_id", "dlib\x00resnet", TemplateError, "printable"),
        ("model_id", "dlib\nresnet", TemplateError, "printable"),
        ("model_id", "x" * 10_000, TemplateError, "exceeds the limit"),
        ("model_id", 7, TemplateError, "non-empty string"),
        ("scheme", "rot13-v1", ProtectionError, "known schemes"),
        ("scheme", None, TemplateError, "must be a string"),
        ("key_version", True, TemplateError, "key version"),
        ("key_version", "1", TemplateError, "key version"),
        ("key_version", 0, TemplateError, "key version"),
        ("dim", 128.0, TemplateError, "integer"),
        ("dim", 10**12, TemplateError, "1..65536"),
        ("dim", 64, TemplateError, "needs 256 bytes"),
        ("data", "!!not base64!!", TemplateError, "base64"),
        ("data", 12345, TemplateError, "base64 string"),
        ("data", "A" * 10**6, TemplateError, "too long"),
        ("data", _b64(np.ones(128, "<f8")), TemplateError, "needs 512 bytes"),
        ("data", _b64(np.full(128, np.nan, "<f4")), TemplateError, "NaN"),
        ("data", _b64(np.full(128, -np.inf, "<f4")), TemplateError, "infinite"),
    ],
)
def test_from_wire_refuses_hostile_fields(good_wire, field, value, error, match):
    hostile = {**good_wire, field: value}
    with pytest.raises(error, match=match):
        ProtectedTemplate.from_wire(hostile)


@pytest.mark.parametrize(
    "wire",
    [None, [], "template", {"model_id": "m"}],
)
def test_from_wire_refuses_non_templates(wire):
    with pytest.raises(TemplateError):
        ProtectedTemplate.from_wire(wire)


def test_from_wire_refuses_extra_fields_and_binary_mismatch(good_wire):
    with pytest.raises(TemplateError, match="unknown fields"):
        ProtectedTemplate.from_wire({**good_wire, "secret": "x"})
    # Float bytes declared as a binary scheme: 512 bytes are not 128 bits.
    with pytest.raises(TemplateError, match="128-bit template needs 16 bytes"):
        ProtectedTemplate.from_wire({**good_wire, "scheme": "biohash-v1"})


@pytest.mark.parametrize(
    "matrix",
    [
        2.0 * np.eye(128),  # scales every score by 4
        np.eye(128) + 1e-3,  # nearly orthonormal
        np.zeros((128, 128)),
        np.full((128, 128), np.nan),
        np.eye(128)[:, :64],  # not square
    ],
)
def test_rotation_refuses_non_orthonormal_matrices(matrix):
    with pytest.raises(ProtectionError):
        RotationTransform("orthonormal-v1", 1, 2, matrix)


def test_rotation_matrix_cannot_be_altered_after_checking(embeddings):
    old, new = generate_key("orthonormal-v1", 1), generate_key("orthonormal-v1", 2)
    transform = rotation_transform(old, new, dim=128)
    with pytest.raises(ValueError, match="read-only"):
        transform.matrix[0, 0] = 2.0
    gallery = [protect_template(e, key=old, model_id="m") for e in embeddings]
    rotated = apply_rotation(gallery, transform)
    direct = [protect_template(e, key=new, model_id="m") for e in embeddings]
    for a, b in zip(rotated, direct, strict=True):
        assert a.key_version == 2
        np.testing.assert_allclose(a.data, b.data, atol=1e-5)


def test_rotation_from_wire_refuses_a_tampered_matrix():
    old, new = generate_key("orthonormal-v1", 1), generate_key("orthonormal-v1", 2)
    wire = rotation_transform(old, new, dim=128).to_wire()
    matrix = np.frombuffer(base64.b64decode(wire["matrix"]), "<f8").copy()
    matrix[5] *= 1.01
    with pytest.raises(ProtectionError, match="not orthonormal"):
        RotationTransform.from_wire({**wire, "matrix": _b64(matrix.astype("<f8"))})
    with pytest.raises(ProtectionError, match="bytes"):
        RotationTransform.from_wire({**wire, "matrix": wire["matrix"][:-8]})


# --- privacy ledger -------------------------------------------------------


def _ledger_with_one_run(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "ledger.json"
    PrivacyLedger(path).record_run(
        "site-a", run_id="run-1", config=CONFIG, sample_rate=0.02, steps=300
    )
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "edit",
    [
        {"steps": -300},  # used to count as epsilon 0: a silent budget reset
        {"steps": 3.5},
        {"steps": "300"},
        {"steps": True},
        {"noise_multiplier": "1.1"},
        {"noise_multiplier": -1.1},
        {"noise_multiplier": 0},
        {"sample_rate": 2.0},
        {"sample_rate": -0.02},
        {"delta": 0},
        {"accountant": "gdp"},
        {"epsilon": float("nan")},
        {"epsilon": -1.0},
        {"site_id": 5},  # used to make the run vanish from site-a's history
        {"run_id": ""},
    ],
)
def test_damaged_ledger_entry_is_a_clear_error(tmp_path, edit):
    path, document = _ledger_with_one_run(tmp_path)
    document["runs"][0].update(edit)
    path.write_text(json.dumps(document))
    damaged = path.read_bytes()
    ledger = PrivacyLedger(path)
    with pytest.raises(LedgerError, match="damaged at run 1"):
        ledger.spent_epsilon("site-a", delta=1e-5)
    with pytest.raises(LedgerError):
        ledger.ensure_budget("site-a", budget=8.0, planned_run=(CONFIG, 0.02, 300))
    with pytest.raises(LedgerError):
        ledger.record_run(
            "site-a", run_id="run-2", config=CONFIG, sample_rate=0.02, steps=300
        )
    assert path.read_bytes() == damaged  # never rewritten, never reset


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"format": 1, "runs": "x"}', '{"format": 2, "runs": []}'],
)
def test_unreadable_ledger_is_a_clear_error(tmp_path, content):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match=str(path)):
        PrivacyLedger(path).spent_epsilon("site-a", delta=1e-5)
    assert path.read_text() == content


def test_duplicated_run_in_the_file_is_a_clear_error(tmp_path):
    path, document = _ledger_with_one_run(tmp_path)
    document["runs"].append(dict(document["runs"][0]))
    path.write_text(json.dumps(document))
    with pytest.raises(LedgerError, match="twice"):
        PrivacyLedger(path).spent_epsilon("site-a", delta=1e-5)


def _record_two(path: str, worker: int) -> None:
    ledger = PrivacyLedger(Path(path))
    for run in range(2):
        ledger.record_run(
            "site-a",
            run_id=f"proc-{worker}-{run}",
            config=CONFIG,
            sample_rate=0.01,
            steps=10,
        )


def test_concurrent_writers_lose_no_run(tmp_path):
    path = tmp_path / "ledger.json"
    threads = [
        threading.Thread(target=_record_two, args=(str(path), 100 + i))
        for i in range(4)
    ]
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_record_two, args=(str(path), i)) for i in range(3)
    ]
    for worker in [*threads, *processes]:
        worker.start()
    for worker in [*threads, *processes]:
        worker.join(timeout=120)
    assert all(p.exitcode == 0 for p in processes)
    entries = PrivacyLedger(path).entries("site-a")
    assert len(entries) == 2 * (len(threads) + len(processes))
    assert len({e.run_id for e in entries}) == len(entries)


def test_ensure_budget_boundaries(tmp_path):
    path, _ = _ledger_with_one_run(tmp_path)
    ledger = PrivacyLedger(path)
    spent = ledger.spent_epsilon("site-a", delta=1e-5)
    assert 2.0 < spent < 2.2  # sigma 1.1, q 0.02, 300 steps
    # Exactly reaching the budget with a planned run is allowed...
    assert ledger.ensure_budget(
        "site-a", budget=spent + 1.0, planned_epsilon=1.0
    ) == pytest.approx(spent + 1.0)
    # ...going past it by the smallest step is not.
    with pytest.raises(PrivacyBudgetExceededError):
        ledger.ensure_budget(
            "site-a", budget=math.nextafter(spent + 1.0, 0), planned_epsilon=1.0
        )
    # With no plan, a budget already reached is spent.
    with pytest.raises(PrivacyBudgetExceededError):
        ledger.ensure_budget("site-a", budget=spent)
    assert ledger.ensure_budget("site-a", budget=math.nextafter(spent, 10)) == spent


@pytest.mark.parametrize("planned", [float("nan"), -0.1, "1.0", None])
def test_ensure_budget_refuses_a_meaningless_planned_epsilon(tmp_path, planned):
    # NaN used to pass: every comparison with NaN is False, so "NaN > budget"
    # never refused the run.
    path, _ = _ledger_with_one_run(tmp_path)
    with pytest.raises(ConfigurationError, match="planned_epsilon"):
        PrivacyLedger(path).ensure_budget(
            "site-a", budget=100.0, planned_epsilon=planned
        )


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 0, -1.0])
def test_ensure_budget_refuses_a_meaningless_budget(tmp_path, budget):
    path, _ = _ledger_with_one_run(tmp_path)
    with pytest.raises(ConfigurationError, match="budget"):
        PrivacyLedger(path).ensure_budget("site-a", budget=budget)
