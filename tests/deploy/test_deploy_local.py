"""deploy/local/up.sh brings the topology up; it enrolls, identifies, trains, erases.

Everything runs on 127.0.0.1: PostgreSQL (a fresh database on the test server,
or a throwaway cluster up.sh makes), the gallery server, a Flower SuperLink,
and two sites with a SuperNode each. The sites are driven through the
`facefed site` CLI, as an operator would; training is one round on Flower's
deployment engine. down.sh must stop every process up.sh started.
"""

import csv
import glob
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from facefed.client.admin import AdminClient
from facefed.client.gallery import GalleryClient
from facefed.client.launcher import facefed_command
from facefed.client.settings import ClientSettings

REPO = Path(__file__).resolve().parents[2]
UP = REPO / "deploy" / "local" / "up.sh"
DOWN = REPO / "deploy" / "local" / "down.sh"
TRAINING_TIMEOUT_S = 600


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            env[name] = value
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def database_url():
    """A fresh database on the test server, or None to let up.sh make a cluster."""
    base = os.environ.get("FACEFED_TEST_POSTGRES_URL")
    if not base:
        if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
            pytest.skip("no FACEFED_TEST_POSTGRES_URL and no PostgreSQL binaries")
        yield None
        return
    name = f"facefed_local_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield (
            sa.engine.make_url(base)
            .set(database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            )
        admin.dispose()


@pytest.fixture
def topology(tmp_path, database_url):
    state = tmp_path / "local"
    env = {**os.environ, "FACEFED_UP_TIMEOUT_S": "180"}
    env.pop("FACEFED_DATABASE_URL", None)
    if database_url:
        env["FACEFED_DATABASE_URL"] = database_url
    up = subprocess.run(
        ["bash", str(UP), str(state)], env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    pids = {
        path.name: int(path.read_text())
        for path in (state / "pids").glob("*")
        if path.name != "postgres.bin"
    }
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert set(pids) == {
            "server",
            "superlink",
            "supernode-site-a",
            "supernode-site-b",
        }
        yield state, _read_env(state / "env.sh")
    finally:
        subprocess.run(["bash", str(DOWN), str(state)], timeout=180, check=False)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [name for name, pid in pids.items() if _alive(pid)]
        pg_pid = state / "pg" / "data" / "postmaster.pid"
        assert not pg_pid.exists(), "the throwaway PostgreSQL is still running"


def _site(state: Path, site: str, *args: str, check: bool = True) -> str:
    env = {**os.environ, **_read_env(state / site / "env.sh")}
    env.pop("FACEFED_API_KEY", None)
    done = subprocess.run(
        [*facefed_command(), "site", *args], env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _people(lfw_manifest, test_data: Path, count: int, embeddings: dict) -> list:
    """The first `count` people whose three photos all pass the site pipeline.

    (Some LFW photos are turned too far or look recaptured; a site would take
    another photo, a test cannot.) Their embeddings go to `embeddings`.
    """
    from facefed.core.errors import FaceError
    from facefed.core.image import decode_image
    from facefed.models.zoo import default_pipeline

    pipeline = default_pipeline(liveness=True)
    photos: dict[str, list[Path]] = {}
    for row in lfw_manifest:
        if row["role"] == "enrolled":
            photos.setdefault(row["identity"], []).append(test_data / row["path"])
    chosen = []
    for name, paths in sorted(photos.items()):
        try:
            found = {p: pipeline.embed_one(decode_image(p)).embedding for p in paths}
        except FaceError:
            continue
        embeddings.update(found)
        chosen.append((name, sorted(paths)))
        if len(chosen) == count:
            break
    assert len(chosen) == count
    return chosen


def _fill_training(folder: Path, people, heldout) -> None:
    for identity, photos in people:
        (folder / identity).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            shutil.copy2(photo, folder / identity / photo.name)
    rows = []
    for identity, photos in heldout:
        (folder / "_heldout" / identity).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            shutil.copy2(photo, folder / "_heldout" / identity / photo.name)
        rows.append((f"{identity}/{photos[0].name}", f"{identity}/{photos[1].name}", 1))
    first, second = heldout[0], heldout[1]
    rows.append(
        (f"{first[0]}/{first[1][0].name}", f"{second[0]}/{second[1][0].name}", 0)
    )
    rows.append(
        (f"{first[0]}/{first[1][1].name}", f"{second[0]}/{second[1][1].name}", 0)
    )
    with (folder / "_heldout" / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path1", "path2", "same"])
        writer.writerows(rows)


@pytest.mark.slow
@pytest.mark.postgres
def test_local_topology_enrolls_identifies_trains_one_round_and_erases(
    topology, lfw_manifest, test_data, tmp_path
):
    from facefed.client.federated.config import TrainingConfig
    from facefed.client.federated.store import SiteDataStore
    from facefed.server.federated.runner import read_progress, start_deployment

    state, env = topology
    # up.sh made the gallery's protection key and collection as the admin;
    # the collection's key is served to the sites.
    admin_key = Path(env["FACEFED_LOCAL_ADMIN_KEY_FILE"]).read_text().strip()
    settings = ClientSettings(server_url=env["FACEFED_SERVER_URL"])
    with AdminClient.connect(api_key=admin_key, settings=settings) as admin:
        created = admin.audit_events(action="admin.collection.create")
    assert [event["details"]["collection"] for event in created] == ["default"]
    site_key = (state / "site-a" / "api.key").read_text().strip()
    with GalleryClient.from_settings(settings, api_key=site_key) as site_client:
        assert site_client.protection_key().scheme_id == "orthonormal-v1"
    # admin-env.sh holds the server's own settings (private to the user), so
    # `facefed admin ...` reaches the deployment's database.
    admin_env_file = state / "admin-env.sh"
    assert admin_env_file.stat().st_mode & 0o077 == 0
    admin_env = {**os.environ, **_read_env(admin_env_file)}
    audit = subprocess.run(
        [*facefed_command(), "admin", "audit-verify"], env=admin_env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stderr[-2000:]

    consent = tmp_path / "consent.json"
    consent.write_text(json.dumps({
        "purpose": "Entrance access", "lawful_basis": "consent",
        "consent_text_version": "v1", "retention_days": 90,
    }))  # fmt: skip
    embeddings: dict = {}
    people = _people(lfw_manifest, test_data, 8, embeddings)
    sites = {"site-a": people[0:2], "site-b": people[2:4]}
    heldout = {"site-a": people[4:6], "site-b": people[6:8]}

    # Enroll through the CLI, from each site's folder and key.
    receipts = {}
    for site, members in sites.items():
        for identity, photos in members:
            receipt_file = tmp_path / f"{identity}.json"
            _site(state, site, "enroll", str(photos[0]), str(photos[1]),
                  "--subject-ref", identity, "--consent", str(consent),
                  "--receipt-out", str(receipt_file))  # fmt: skip
            receipts[identity] = json.loads(receipt_file.read_text())

    # Identify a third photo from the other site.
    for site, members in sites.items():
        other = "site-b" if site == "site-a" else "site-a"
        for identity, photos in members:
            out = _site(state, other, "identify", str(photos[2]))
            assert f"match: {receipts[identity]['subject_id']}" in out, out

    # Verify (1:1) a claim, and refuse a false one with exit code 1. The false
    # claim is the enrolled pair least alike (dlib's descriptor does give some
    # strangers cosines above its threshold; that is its FMR, not this test's).
    first, first_photos = sites["site-a"][0]
    claimed = receipts[first]["subject_id"]
    second_photos = min(
        (photos for name, photos in people[:4] if name != first),
        key=lambda photos: max(
            float(embeddings[photos[2]] @ embeddings[ref]) for ref in first_photos[:2]
        ),
    )
    assert _site(state, "site-a", "verify", str(first_photos[2]), "--subject", claimed
                 ).startswith("match")  # fmt: skip
    env_a = {**os.environ, **_read_env(state / "site-a" / "env.sh")}
    false_claim = subprocess.run(
        [*facefed_command(), "site", "verify", str(second_photos[2]), "--subject",
         claimed], env=env_a, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert false_claim.returncode == 1 and false_claim.stdout.startswith("no match")

    # One federated round on the deployment engine, with DP, on both sites.
    for site in sites:
        _fill_training(state / site / "training", sites[site], heldout[site])
    run_dir = state / "runs" / "one-round"
    config = TrainingConfig(num_rounds=1, trainable_blocks=1, batch_size=8,
                            run_dir=str(run_dir), round_timeout=400.0)  # fmt: skip
    process = start_deployment(
        config,
        superlink="facefed-local",
        app_dir=REPO,
        flwr_home=Path(env["FLWR_HOME"]),
    )
    try:
        process.wait(timeout=TRAINING_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    progress = read_progress(run_dir)
    log = (run_dir / "flwr-run.log").read_text(errors="replace")[-3000:]
    assert progress.status == "finished", f"{progress.error}\n{log}"
    assert set(progress.epsilon) == {"site-a", "site-b"}
    assert all(0 < eps <= config.target_epsilon for eps in progress.epsilon.values())

    # Erase a subject through site-a's CLI: gone from the server and from
    # the site's training data.
    identity, _ = sites["site-a"][0]
    subject_id = receipts[identity]["subject_id"]
    erased = json.loads(_site(state, "site-a", "erase", subject_id))
    assert erased["subject_id"] == subject_id
    out = _site(state, "site-b", "identify", str(sites["site-a"][0][1][2]))
    assert subject_id not in out
    assert identity in SiteDataStore(state / "site-a" / "training").erased()

    # A data subject of site-b exports and erases themselves with the CLI and
    # their receipt, holding no API key.
    identity, _ = sites["site-b"][0]
    receipt_file = tmp_path / f"{identity}.json"
    subject_id = receipts[identity]["subject_id"]
    subject_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FACEFED_API_KEY")
    }
    subject_env["FACEFED_SERVER_URL"] = env["FACEFED_SERVER_URL"]

    def subject(*args: str) -> dict:
        done = subprocess.run(
            [*facefed_command(), "subject", *args, subject_id,
             "--token-file", str(receipt_file)],
            env=subject_env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    exported = subject("export")
    assert exported["external_ref"] == identity and len(exported["templates"]) == 2
    assert subject("erase")["removed"]["data_key_destroyed"] is True
