"""Site folders built from the real LFW test photos, with chips cached once."""

import csv
import itertools
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from facefed.client.federated.store import HELDOUT_DIR, SiteDataStore


def _identities(test_data: Path) -> list[str]:
    with open(test_data / "lfw" / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["role"] == "enrolled"]
    return sorted({r["identity"] for r in rows})


def _build_site(root: Path, test_data: Path, train: list[str], held: list[str]) -> Path:
    for identity in train:
        shutil.copytree(test_data / "lfw" / identity, root / identity)
    pairs = []
    for identity in held:
        shutil.copytree(test_data / "lfw" / identity, root / HELDOUT_DIR / identity)
        photos = sorted((root / HELDOUT_DIR / identity).glob("*.jpg"))
        for a, b in itertools.combinations(photos, 2):
            pairs.append([f"{identity}/{a.name}", f"{identity}/{b.name}", 1])
    for a, b in itertools.combinations(held, 2):
        pairs.append([f"{a}/{a}_0001.jpg", f"{b}/{b}_0002.jpg", 0])
    with open(root / HELDOUT_DIR / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path1", "path2", "same"])
        writer.writerows(pairs)
    return root


@pytest.fixture(scope="session")
def _cached_sites(tmp_path_factory, test_data) -> list[Path]:
    """Two sites of 8 training and 4 held-out identities (3 photos each)."""
    from facefed.client.federated.chips import pipeline_chip_fn
    from facefed.core.settings import get_core_settings

    names = _identities(test_data)
    base = tmp_path_factory.mktemp("federated-sites")
    sites = []
    # Session fixtures run before the per-test FACEFED_HOME is set: give the
    # pipeline's exported model a session folder of its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACEFED_HOME", str(base / "home"))
        cache = os.environ.get("FACEFED_TEST_MODEL_CACHE", str(base / "models"))
        patch.setenv("FACEFED_MODEL_CACHE", cache)
        get_core_settings.cache_clear()
        chip_fn = pipeline_chip_fn()
        for index in range(2):
            mine = names[index * 12 : (index + 1) * 12]
            site = _build_site(base / f"site{index}", test_data, mine[:8], mine[8:])
            SiteDataStore(site).prepare(chip_fn)
            sites.append(site)
    get_core_settings.cache_clear()
    return sites


@pytest.fixture
def sites(_cached_sites, tmp_path) -> list[Path]:
    """Fresh copies of the cached sites (chips cached, no ledger, no head)."""
    copies = []
    for site in _cached_sites:
        target = tmp_path / site.name
        shutil.copytree(site, target)
        copies.append(target)
    return copies


@pytest.fixture
def admin_client(tmp_path):
    """A test client of the server app holding an admin API key."""
    from facefed.privacy.envelope import encode_master_key
    from facefed.server.app import create_app
    from facefed.server.service import GalleryService
    from facefed.server.settings import ServerSettings

    settings = ServerSettings(
        home=tmp_path / "server-home",
        database_url=f"sqlite:///{tmp_path / 'server.db'}",
        master_key=encode_master_key(bytes(range(32))),
        purge_interval_s=0,
        use_gpu=False,
    )
    service = GalleryService(settings)
    service.start()
    try:
        _, admin_key = service.create_api_key("test", role="admin", site_id=None)
    finally:
        service.close()
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {admin_key}"
        yield client


@pytest.fixture
def deployment_run(tmp_path):
    """Run a training config on a local SuperLink with a SuperNode per site.

    Returns a function (sites, config) -> the run's final progress; the
    federation's processes are stopped before it returns.
    """
    import time

    from facefed.server.federated.deployment import CONNECTION, local_federation
    from facefed.server.federated.runner import read_progress, start_deployment

    app_dir = Path(__file__).resolve().parents[2]

    def run(sites: list[Path], config):
        run_dir = Path(config.run_dir)
        with local_federation(sites, tmp_path / "federation") as federation:
            flwr = start_deployment(
                config,
                superlink=CONNECTION,
                app_dir=app_dir,
                flwr_home=federation.flwr_home,
            )
            try:
                log = run_dir / "flwr-run.log"
                assert flwr.wait(timeout=420) == 0, log.read_text()
            finally:
                if flwr.poll() is None:
                    flwr.kill()
            # `flwr run` returns once the run is submitted and streamed; the
            # ServerApp may still be publishing the model.
            deadline = time.monotonic() + 120
            while (
                read_progress(run_dir).status == "running"
                and time.monotonic() < deadline
            ):
                time.sleep(1)
        return read_progress(run_dir)

    return run


@pytest.fixture
def faceless_site():
    """Build a site folder laid out correctly whose photos hold no face.

    It passes the up-front folder check, so a run starts with it, and then
    fails every round at that site (no chip can be made): a site that drops
    out for real.
    """
    import cv2
    import numpy as np

    def build(root: Path) -> Path:
        gray = np.full((120, 120, 3), 128, np.uint8)
        for identity in ("person-a", "person-b"):
            for folder in (root / identity, root / HELDOUT_DIR / identity):
                folder.mkdir(parents=True)
                for index in (1, 2):
                    cv2.imwrite(str(folder / f"{index}.jpg"), gray)
        rows = [
            ["person-a/1.jpg", "person-a/2.jpg", 1],
            ["person-b/1.jpg", "person-b/2.jpg", 1],
            ["person-a/1.jpg", "person-b/1.jpg", 0],
            ["person-a/2.jpg", "person-b/2.jpg", 0],
        ]
        with open(root / HELDOUT_DIR / "pairs.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path1", "path2", "same"])
            writer.writerows(rows)
        return root

    return build


@pytest.fixture
def facefed_cli():
    """Run the installed `facefed` command; returns the finished process."""
    import subprocess
    import sys

    executable = str(Path(sys.executable).with_name("facefed"))

    def run(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [executable, *arguments],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
