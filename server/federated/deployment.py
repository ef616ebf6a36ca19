"""A local Flower deployment: one SuperLink and a SuperNode per site, on loopback.

For tests, benchmarks and trying the deployment engine on one machine. Every
process is started in its own process group and stopped (SIGTERM, then
SIGKILL) when the context exits, whatever happened. The SuperLink runs with
``--insecure`` (loopback only) and with runtime dependency installation
disabled: the apps run from the facefed installation in this environment.
Real sites use the TLS and node-authentication settings of ``deploy/flower/``.
"""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from facefed.core.errors import ServiceError
from facefed.server.federated.runner import QUIET_FLOWER_ENV

logger = logging.getLogger(__name__)

CONNECTION = "facefed-local"


@dataclass(frozen=True)
class LocalFederation:
    """A running local federation.

    Attributes:
        flwr_home: FLWR_HOME whose config.toml names the SuperLink as
            `CONNECTION` (the default connection).
        control_address: The SuperLink's Control API address.
        fleet_address: The SuperLink's Fleet API address (the same port).
        processes: The SuperLink, then one SuperNode per site.
    """

    flwr_home: Path
    control_address: str
    fleet_address: str
    processes: tuple[subprocess.Popen[bytes], ...]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _start(
    command: list[str], log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115 - owned by the child's lifetime
    # Fixed executables from this environment with arguments built here.
    return subprocess.Popen(  # noqa: S603
        command,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_listening(
    address: str, process: subprocess.Popen[bytes], timeout: float
) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"The SuperLink exited with code {process.returncode}.")
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise ServiceError(f"The SuperLink did not listen on {address} in {timeout:g} s.")


@contextmanager
def local_federation(
    site_dirs: Sequence[Path], work_dir: Path, *, start_timeout: float = 60.0
) -> Iterator[LocalFederation]:
    """Start a SuperLink and one SuperNode per site folder; stop them on exit.

    Args:
        site_dirs: One site folder per SuperNode (``site-dir`` node config).
        work_dir: Folder for FLWR_HOME, the SuperLink database and the logs.
        start_timeout: Seconds to wait for the SuperLink to listen.

    Yields:
        The running federation.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        **QUIET_FLOWER_ENV,
        "FLWR_HOME": str(flwr_home),
        # The SuperLink and SuperNodes start flower-superexec by name.
        "PATH": os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
        ),
    }
    # Flower 1.42 serves the Control, Fleet and Runtime APIs on one HTTP port.
    port = free_port()
    control = fleet = f"127.0.0.1:{port}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{control}"\ninsecure = true\n'
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        superlink = _start(
            [
                _bin("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(work_dir / "superlink.db"),
            ],
            work_dir / "superlink.log",
            env,
        )
        processes.append(superlink)
        _wait_listening(control, superlink, start_timeout)
        for index, site in enumerate(site_dirs):
            processes.append(
                _start(
                    [
                        _bin("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        fleet,
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f'site-dir="{Path(site).resolve()}"',
                    ],
                    work_dir / f"supernode-{index}.log",
                    env,
                )
            )
        logger.info(
            "Local federation up: SuperLink %s, %d SuperNodes", control, len(site_dirs)
        )
        yield LocalFederation(flwr_home, control, fleet, tuple(processes))
    finally:
        # Flower starts its SuperExec and app processes detached (their own
        # sessions), so collect every descendant before stopping the parents.
        descendants = [pid for p in processes for pid in _descendants(p.pid)]
        for process in reversed(processes):
            _stop(process)
        for pid in descendants:
            _kill_pid(pid)
        logger.info("Local federation stopped")
