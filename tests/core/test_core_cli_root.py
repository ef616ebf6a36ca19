"""The root `facefed` command: error reporting and invalid settings."""

import os
import subprocess
import sys

import pytest

from facefed.core.errors import ConfigurationError
from facefed.core.settings import get_core_settings


def _facefed(*args: str, env: dict[str, str] | None = None):
    command = [sys.executable, "-c", "from facefed.core.cli import main; main()"]
    # A wide console keeps long temporary paths on one line of stderr.
    env = {**(env or os.environ), "COLUMNS": "400"}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_invalid_setting_is_a_configuration_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("FACEFED_MAX_IMAGE_PIXELS", "abc")
    get_core_settings.cache_clear()

    with pytest.raises(ConfigurationError, match="FACEFED_MAX_IMAGE_PIXELS"):
        get_core_settings()


def test_error_quoting_markup_like_input_is_printed_verbatim(tmp_path):
    missing = tmp_path / "d[/x].jpg"

    result = _facefed("detect", str(missing))

    assert result.returncode == 3
    assert "d[/x].jpg" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_setting_exits_with_the_configuration_code(tmp_path):
    env = {**os.environ, "FACEFED_MAX_IMAGE_PIXELS": "abc"}

    result = _facefed("detect", "tests/data/antispoof/image_T1.jpg", env=env)

    assert result.returncode == ConfigurationError.exit_code
    assert "FACEFED_MAX_IMAGE_PIXELS" in result.stderr
    assert "Traceback" not in result.stderr


def test_exit_code_set_through_typer_exit_reaches_the_shell(monkeypatch):
    import typer

    from facefed.core import cli

    def _fails() -> None:
        raise typer.Exit(code=7)

    monkeypatch.setattr(
        cli.app, "registered_commands", list(cli.app.registered_commands)
    )
    cli.app.command("always-fails-for-test")(_fails)
    monkeypatch.setattr(sys, "argv", ["facefed", "always-fails-for-test"])

    with pytest.raises(SystemExit) as finished:
        cli.main()

    assert finished.value.code == 7
