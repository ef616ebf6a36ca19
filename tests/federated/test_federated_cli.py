"""`facefed train` as a user drives it: site checks, detach, cancel, readable errors."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facefed.client.federated.store import HELDOUT_DIR, site_folder_problems
from facefed.server.federated.commands import CANCELLED_EXIT_CODE
from facefed.server.federated.runner import read_progress
from facefed.server.federated.runs import (
    cancel_run,
    process_alive,
    run_info,
    runs_dir,
)
from facefed.server.federated.strategy import RunLog, error_summary

FACEFED = str(Path(sys.executable).with_name("facefed"))

# What Flower's simulation engine sends back when a ClientApp raised: a Ray
# traceback whose last line carries the site's own message.
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::"
    "ClientAppActor.run()\x1b[39m (pid=26034, ip=192.0.2.2)\n"
    "                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/venv/flwr/clientapp/client_app.py", line 161, in __call__\n'
    "    return self._registered_funcs[full_name](message, context)\n"
    + '  File "/venv/x.py", line 1, in f\n    frame()\n'
    * 20
    + "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: site-a: refused the round: "
    "it would reach epsilon 12.174 at delta 1e-05, over its budget of 8.'>"
)


def _write_pairs(site: Path, rows: list[list[object]]) -> None:
    with open(site / HELDOUT_DIR / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path1", "path2", "same"])
        writer.writerows(rows)


# -- item: unusable site folders are refused up front -------------------------


def test_site_check_names_what_each_folder_lacks(sites, tmp_path):
    good = sites[0]
    assert site_folder_problems(good) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    problems = site_folder_problems(empty)
    assert problems == [
        f"Site {empty} has 0 training identities with at least 2 photos, 2 are "
        "needed (<site>/<identity>/<photo>.jpg).",
        f"Site {empty} has no _heldout/pairs.csv (held-out pairs: columns "
        "path1,path2,same, paths relative to _heldout/).",
    ]

    # One identity left: a margin head cannot separate a single class.
    one = shutil.copytree(good, tmp_path / "one")
    identities = sorted(
        p for p in one.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )
    for folder in identities[1:]:
        shutil.rmtree(folder)
    assert site_folder_problems(one) == [
        f"Site {one} has 1 training identities with at least 2 photos, 2 are "
        "needed (<site>/<identity>/<photo>.jpg)."
    ]

    # Genuine pairs only, and a pair naming a photo that is not there.
    genuine = shutil.copytree(good, tmp_path / "genuine")
    with open(genuine / HELDOUT_DIR / "pairs.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["same"] == "1"]
    _write_pairs(
        genuine,
        [[r["path1"], r["path2"], 1] for r in rows] + [["a/x.jpg", "b/y.jpg", 0]],
    )
    assert site_folder_problems(genuine) == [
        f"Site {genuine} has {len(rows)} genuine and 0 impostor held-out pairs "
        "whose photos exist under _heldout/, at least 2 of each are needed."
    ]


def test_train_refuses_unusable_sites_before_anything_starts(
    sites, tmp_path, facefed_cli
):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_photos = tmp_path / "nophotos"
    (no_photos / "someone").mkdir(parents=True)
    (no_photos / "someone" / "notes.txt").write_text("not a photo")

    done = facefed_cli(
        "train", "--site", str(sites[0]), "--site", str(empty), "--site",
        str(no_photos), "--rounds", "1",
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "nothing was started" in message
    assert f"Site {empty} has 0 training identities" in message
    assert f"Site {empty} has no _heldout/pairs.csv" in message
    assert f"Site {no_photos} has 0 training identities" in message
    assert str(sites[0]) not in message
    assert "prepare" not in message
    # No run, and the good site's budget untouched.
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
    assert not (sites[0] / ".facefed" / "ledger.json").exists()


# -- item: a site's error stays readable --------------------------------------


def test_error_summary_keeps_the_sites_own_message():
    assert error_summary(RAY_REASON) == (
        "site-a: refused the round: it would reach epsilon 12.174 at delta 1e-05, "
        "over its budget of 8."
    )
    # The deployment engine's format, and a plain traceback's last line.
    deployed = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
        "ClientAppException occurred. Message: Site /s has no _heldout/pairs.csv.'>"
    )
    assert error_summary(deployed) == "Site /s has no _heldout/pairs.csv."
    traceback = "Traceback (most recent call last):\n  ...\nValueError: bad shape\n"
    assert error_summary(traceback) == "bad shape"
    assert len(error_summary("x" * 5000)) == 500


def _reply(node: int, *, error: str | None = None, site: str | None = None):
    from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict

    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="i",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    if error is not None:
        return Message(metadata=metadata, error=Error(code=3, reason=error))
    content = RecordDict({"site": ConfigRecord({"site": site or ""})})
    return Message(metadata=metadata, content=content)


def test_failed_run_error_names_each_sites_reason(tmp_path):
    from facefed.server.federated.app import _no_round_error

    run_log = RunLog(tmp_path / "run")
    run_log.received(1, "train", _reply(11, error=RAY_REASON))
    run_log.received(1, "evaluate", _reply(11, site="site-a"))
    run_log.received(1, "train", _reply(22, error="<class 'E'>:<'disk full'>"))

    logged = [
        json.loads(line) for line in run_log.messages_path.read_text().splitlines()
    ]
    assert logged[0]["error"].endswith("over its budget of 8.")

    error = _no_round_error(run_log)
    assert error.splitlines()[1:3] == [
        "- node 22: disk full",
        "- site-a: refused the round: it would reach epsilon 12.174 at delta "
        "1e-05, over its budget of 8.",
    ]
    assert "\x1b" not in error and "Traceback" not in error


def test_site_refusing_the_round_says_who_and_why(sites):
    from facefed.client.federated.config import TrainingConfig
    from facefed.client.federated.site import SiteRuntime
    from facefed.core.errors import PrivacyBudgetExceededError
    from facefed.privacy.dp import DPConfig

    runtime = SiteRuntime(sites[0], TrainingConfig(num_rounds=1, target_epsilon=1.0))
    spent = DPConfig(noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-5)
    runtime.ledger.record_run(
        runtime.site_id, run_id="earlier", config=spent, sample_rate=1.0, steps=10
    )
    shared = runtime.split.shared_state()
    with pytest.raises(PrivacyBudgetExceededError) as refused:
        runtime.train_round(shared, run_id="now", server_round=1)
    assert str(refused.value).startswith(
        f"{sites[0].name}: refused the round: it would reach epsilon "
    )
    assert str(refused.value).endswith("over its budget of 1.")


# -- items: --detach returns at once; a cancel ends every view -----------------


def _run_id(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line[:4] == "run ")


def _descendants(pid: int) -> list[int]:
    from facefed.server.federated.deployment import _descendants as tree

    return tree(pid)


@pytest.mark.slow
def test_detached_run_returns_at_once_and_a_cancel_stops_it(sites, facefed_cli):
    started = time.monotonic()
    done = facefed_cli(
        "train", "--site", str(sites[0]), "--site", str(sites[1]), "--rounds", "30",
        "--detach",
    )  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    run_id = _run_id(done.stdout)
    assert f"facefed runs show {run_id}" in done.stdout
    # Thirty rounds take far longer than a start: the run goes on without it.
    pid = int((runs_dir() / run_id / "pid").read_text())
    assert process_alive(pid), (runs_dir() / run_id / "training.log").read_text()
    assert run_info(run_id).progress.status == "running"
    assert took < 60

    cancelled = facefed_cli("runs", "cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert not process_alive(pid)
    shown = json.loads(facefed_cli("runs", "show", run_id).stdout)
    assert shown["status"] == "cancelled"
    assert shown["error"] == "cancelled on request"
    assert facefed_cli("runs", "cancel", run_id).returncode == 10


@pytest.mark.slow
def test_foreground_train_exits_when_its_run_is_cancelled(sites):
    follower = subprocess.Popen(
        [FACEFED, "train", "--site", str(sites[0]), "--site", str(sites[1]),
         "--rounds", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        run_id = _run_id(follower.stdout.readline() if follower.stdout else "")
        run_dir = runs_dir() / run_id
        # Wait until the ServerApp runs: Ray and its workers are up by then.
        deadline = time.monotonic() + 240
        while "round-started" not in _text(run_dir / "progress.jsonl"):
            assert time.monotonic() < deadline, _text(run_dir / "training.log")
            assert follower.poll() is None, follower.stderr
            time.sleep(1)
        pid = int((run_dir / "pid").read_text())
        family = [pid, *_descendants(pid)]
        assert len(family) > 2  # the child, Ray's services and workers

        cancel_run(run_id)  # what the admin API's cancel route calls

        # Every view says so at once, not "failed" with a signal number.
        progress = read_progress(run_dir)
        assert (progress.status, progress.error) == (
            "cancelled",
            "cancelled on request",
        )
        assert run_info(run_id).progress.status == "cancelled"
        left = [_describe(p) for p in family if process_alive(p)]
        assert not left
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            os.kill(follower.pid, signal.SIGKILL)
    assert follower.returncode == CANCELLED_EXIT_CODE
    assert f"run {run_id} was cancelled: cancelled on request" in " ".join(err.split())
    assert json.loads(out[out.index("{") :])["status"] == "cancelled"


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _describe(pid: int) -> str:
    proc = Path(f"/proc/{pid}")
    try:
        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        return f"{pid} {(proc / 'stat').read_text()[:60]} {command[:200]}"
    except OSError:
        return f"{pid} (gone)"


@pytest.mark.slow
def test_cancel_through_the_api_answers_cancelled(admin_client, sites):
    started = admin_client.post(
        "/v1/training/runs",
        json={"sites": [str(s) for s in sites], "rounds": 30},
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["id"]
    pid = int((runs_dir() / run_id / "pid").read_text())

    answer = admin_client.post(f"/v1/training/runs/{run_id}/cancel")

    assert answer.status_code == 200, answer.text
    assert (answer.json()["status"], answer.json()["error"]) == (
        "cancelled",
        "cancelled on request",
    )
    assert not process_alive(pid)
    # The server's child died of SIGTERM; the run still reads as cancelled.
    time.sleep(1)
    shown = admin_client.get(f"/v1/training/runs/{run_id}").json()
    assert (shown["status"], shown["error"]) == ("cancelled", "cancelled on request")
    again = admin_client.post(f"/v1/training/runs/{run_id}/cancel")
    assert again.status_code == 409
