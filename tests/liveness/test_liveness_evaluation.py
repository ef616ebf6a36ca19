"""PAD metrics (ISO/IEC 30107-3) and the liveness commands, end to end."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from facefed.core.errors import ConfigurationError, SpoofError
from facefed.core.liveness.evaluation import (
    calibrate_threshold,
    det_points,
    equal_error_rate,
    error_rates,
    load_pad_samples,
    pearson,
)


def test_apcer_is_per_species_and_the_worst_is_reported():
    live = [0.9, 0.8, 0.3, 0.7]
    attacks = {"print": [0.1, 0.6, 0.2, 0.05], "replay": [0.55, 0.52]}
    rates = error_rates(live, attacks, 0.5)
    assert rates.apcer == {"print": 0.25, "replay": 1.0}
    assert rates.apcer_max == 1.0
    assert rates.bpcer == 0.25
    assert rates.n_attack == {"print": 4, "replay": 2}


def test_threshold_is_inclusive_for_bona_fide():
    rates = error_rates([0.5], {"x": [0.5]}, 0.5)
    assert rates.bpcer == 0.0 and rates.apcer_max == 1.0


def test_det_points_trade_apcer_against_bpcer():
    rng = np.random.default_rng(3)
    live = list(rng.uniform(0.3, 1.0, 50))
    attacks = {"a": list(rng.uniform(0.0, 0.7, 40)), "b": list(rng.uniform(0, 0.5, 9))}
    thresholds, apcer, bpcer = det_points(live, attacks)
    assert np.all(np.diff(thresholds) > 0)
    assert np.all(np.diff(apcer) <= 0) and np.all(np.diff(bpcer) >= 0)
    assert apcer[0] == 1.0 and bpcer[0] == 0.0 and apcer[-1] == 0.0 and bpcer[-1] == 1.0


def test_calibration_respects_the_apcer_limit_and_minimises_bpcer():
    live = [0.2, 0.45, 0.6, 0.7, 0.8, 0.9]
    attacks = {"a": [0.1, 0.15, 0.3, 0.5]}
    rates = calibrate_threshold(live, attacks, max_apcer=0.25)
    # one attack in four may pass: 0.5 gets through, 0.3 must not, and the
    # threshold sits between 0.3 and the live 0.45 (only the live 0.2 refused)
    assert 0.3 < rates.threshold <= 0.45
    assert rates.apcer_max == 0.25 and rates.bpcer == pytest.approx(1 / 6)
    strict = calibrate_threshold(live, attacks, max_apcer=0.0)
    assert 0.5 < strict.threshold <= 0.6 and strict.bpcer == pytest.approx(2 / 6)
    with pytest.raises(ConfigurationError, match=r"1\.5"):
        calibrate_threshold(live, attacks, max_apcer=1.5)


def test_eer_of_separable_scores_is_zero():
    eer, threshold = equal_error_rate([0.8, 0.9], {"a": [0.1, 0.2]})
    assert eer == 0.0 and 0.2 < threshold <= 0.8


def test_pearson_is_nan_for_constant_input():
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_label_file_with_an_unknown_label_is_refused(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,attack_type,subject,source\na.jpg,maybe,,s,x\n")
    with pytest.raises(ConfigurationError, match="maybe"):
        load_pad_samples(tmp_path, labels)


@pytest.fixture()
def cli():
    from facefed.core.cli import app, eval_app
    from facefed.core.liveness.commands import register

    register(app, eval_app)
    return app


def test_cli_check_prints_a_decision_per_image(cli, test_data):
    runner = CliRunner()
    images = [
        str(test_data / "antispoof" / n) for n in ("image_T1.jpg", "image_F2.jpg")
    ]
    result = runner.invoke(cli, ["liveness", "check", "--json", *images])
    assert result.exit_code == 0, result.output
    rows = [
        json.loads(line) for line in result.output.splitlines() if line.startswith("{")
    ]
    assert [r["is_live"] for r in rows] == [True, False]
    assert rows[1]["reasons"] and "network" in rows[1]["cues"]


def test_cli_challenge_new_then_verify_a_folder_of_frames(cli, tmp_path, action_frames):
    import cv2

    runner = CliRunner()
    challenge_file = tmp_path / "challenge.json"
    result = runner.invoke(
        cli,
        [
            "liveness",
            "challenge",
            "new",
            "--actions",
            "2",
            "--out",
            str(challenge_file),
        ],
    )
    assert result.exit_code == 0, result.output
    actions = json.loads(challenge_file.read_text())["actions"]
    folder = tmp_path / "frames"
    folder.mkdir()
    sequence = [action_frames["neutral"]]
    for action in actions:
        sequence += [action_frames[action], action_frames["neutral"]]
    for index, frame in enumerate(sequence):
        cv2.imwrite(str(folder / f"{index:03d}.png"), frame[..., ::-1])
    args = [
        "liveness",
        "challenge",
        "verify",
        "--challenge",
        str(challenge_file),
        str(folder),
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "challenge passed" in result.output
    replay = runner.invoke(cli, args)
    assert isinstance(replay.exception, SpoofError)
    assert "replayed nonce" in replay.exception.reasons[0]


def test_eval_liveness_writes_rates_and_a_det_png(cli, tmp_path, test_data):
    data = tmp_path / "data"
    (data / "antispoof" / "silent_face").mkdir(parents=True)
    (data / "labels").mkdir()
    rows = [
        ("image_F1.jpg", "spoof"),
        ("image_F2.jpg", "spoof"),
        ("image_T1.jpg", "live"),
    ]
    with open(data / "labels" / "antispoof_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "attack_type", "subject", "source"])
        for name, label in rows:
            shutil.copy(
                test_data / "antispoof" / name, data / "antispoof" / "silent_face"
            )
            attack = "print or screen" if label == "spoof" else ""
            writer.writerow(
                [f"antispoof/silent_face/{name}", label, attack, "s", "silent_face"]
            )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["eval", "liveness", "--data", str(data), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "liveness_eval.json").read_text())
    frames = report["runs"]["frames"]["rates"]
    assert frames["apcer"] == {"print or screen": 0.0} and frames["bpcer"] == 0.0
    assert (out / "liveness_det.png").read_bytes()[:4] == b"\x89PNG"
    assert "small and biased" in report["caveat"]


@pytest.mark.shared_data
@pytest.mark.slow
def test_eval_on_the_shared_set_keeps_its_calibrated_error_rates(shared_data, tmp_path):
    from facefed.core.liveness.report import run_evaluation

    report = run_evaluation(
        shared_data,
        shared_data / "labels" / "antispoof_labels.csv",
        tmp_path,
        calibrate=True,
        max_apcer=0.05,
    )
    everything = report["runs"]["all"]
    assert everything["rates"]["apcer_max"] <= 0.05
    assert everything["rates"]["bpcer"] <= 0.10
    assert everything["calibrated_threshold"] == pytest.approx(
        report["threshold"], abs=0.01
    )


@given(
    live=st.lists(st.floats(0, 1), min_size=1, max_size=30),
    a=st.lists(st.floats(0, 1), min_size=1, max_size=30),
    b=st.lists(st.floats(0, 1), min_size=1, max_size=30),
    threshold=st.floats(0, 1),
)
def test_error_rates_match_counting_by_hand(live, a, b, threshold):
    rates = error_rates(live, {"a": a, "b": b}, threshold)
    accepted_a = sum(1 for s in a if s >= threshold) / len(a)
    accepted_b = sum(1 for s in b if s >= threshold) / len(b)
    refused = sum(1 for s in live if s < threshold) / len(live)
    assert rates.apcer == {
        "a": pytest.approx(accepted_a),
        "b": pytest.approx(accepted_b),
    }
    assert rates.apcer_max == pytest.approx(max(accepted_a, accepted_b))
    assert rates.bpcer == pytest.approx(refused)
