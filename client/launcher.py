"""Start and stop a local `facefed serve` process (demo, tests, local deploy).

The server runs as a child process on 127.0.0.1 at a free port, with its own
environment (home folder, database URL, master key file). Start-up waits,
bounded, until the API answers; stopping sends SIGTERM, then SIGKILL after a
grace period, so nothing outlives the caller.
"""

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from facefed.core.errors import ServiceError

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def facefed_command() -> list[str]:
    """The command that runs `facefed` with this interpreter."""
    return [sys.executable, "-c", "from facefed.core.cli import main; main()"]


def create_key_with_cli(
    env: Mapping[str, str], *, role: str, name: str, site_name: str | None = None
) -> str:
    """Create an API key with `facefed admin create-key`, as an operator would.

    The command talks to the server's database directly (it is how the first
    admin key is made), so `env` must name the same database and master key
    as the server's.

    Args:
        env: The server's FACEFED_* environment.
        role: `admin` or `site`.
        name: A label for the key.
        site_name: For a site key: create a site of this name for it.

    Returns:
        The new key (keep it secret; it is not shown again).

    Raises:
        ServiceError: The command failed or printed no key.
    """
    command = [
        *facefed_command(),
        "admin",
        "create-key",
        "--role",
        role,
        "--name",
        name,
    ]
    if site_name is not None:
        command += ["--site-name", site_name]
    done = subprocess.run(  # noqa: S603 (our own interpreter and arguments)
        command,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    for line in done.stdout.splitlines():
        label, _, value = line.partition(":")
        if label.strip() == "api key" and value.strip():
            return value.strip()
    raise ServiceError(
        f"`facefed admin create-key` failed (exit {done.returncode}): "
        f"{done.stderr.strip()[-500:]}"
    )


class ServerProcess:
    """A `facefed serve` child process bound to 127.0.0.1.

    Args:
        env: Extra environment variables (FACEFED_HOME, FACEFED_DATABASE_URL,
            FACEFED_MASTER_KEY_FILE, ...), added to this process's environment.
        log_file: File receiving the server's stdout and stderr.
        port: Port to listen on; a free one when None.
        start_timeout_s: Longest wait for the API to answer.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        log_file: Path,
        port: int | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.env = {**os.environ, **env}
        self.log_file = log_file
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        """Start the server and wait until it answers.

        Raises:
            ServiceError: The server exited or did not answer in time (the end
                of its log is in the message).
        """
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [
            *facefed_command(),
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 (our own interpreter)
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()
        logger.info("facefed server up at %s (pid %d)", self.url, self._process.pid)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise ServiceError(
                    f"facefed serve exited with code {self._process.returncode} at "
                    f"start-up; the end of its log:\n{self.log_tail()}"
                )
            try:
                if (
                    httpx.get(f"{self.url}/openapi.json", timeout=2.0).status_code
                    == 200
                ):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise ServiceError(
            f"facefed serve did not answer within {self.start_timeout_s:.0f} s; "
            f"the end of its log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        if not self.log_file.exists():
            return "(no log)"
        text = self.log_file.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after `grace_s` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("facefed serve ignored SIGTERM; killing it")
            process.kill()
            process.wait(timeout=grace_s)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
