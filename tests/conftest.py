"""Fixtures every test module may use: test images, the shared data set, folders."""

import csv
import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
TEST_DATA = TESTS_DIR / "data"
SHARED_DATA = Path(
    os.environ.get("FACEFED_SHARED_DATA", TESTS_DIR.parent.parent / "shared" / "data")
)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Give every test its own FACEFED_HOME so no test sees another's state.

    Exported models are cached in one session-wide folder instead, because
    exporting the embedding network takes seconds.
    """
    home = tmp_path_factory.mktemp("facefed-home")
    monkeypatch.setenv("FACEFED_HOME", str(home))
    monkeypatch.setenv(
        "FACEFED_MODEL_CACHE", str(_session_model_cache(tmp_path_factory))
    )
    from facefed.core.settings import get_core_settings

    get_core_settings.cache_clear()


_MODEL_CACHE: Path | None = None


def _session_model_cache(factory: pytest.TempPathFactory) -> Path:
    global _MODEL_CACHE
    if _MODEL_CACHE is None:
        _MODEL_CACHE = Path(
            os.environ.get("FACEFED_TEST_MODEL_CACHE", factory.mktemp("model-cache"))
        )
    return _MODEL_CACHE


@pytest.fixture(scope="session")
def test_data() -> Path:
    """Folder of the real photos shipped with the tests (see tests/data/README.md)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def lfw_manifest() -> list[dict[str, str]]:
    """Rows of tests/data/lfw/manifest.csv: path (under tests/data), identity, role."""
    with open(TEST_DATA / "lfw" / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data set; tests that need it are skipped, saying so, when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data set is not at {SHARED_DATA}")
    return SHARED_DATA
