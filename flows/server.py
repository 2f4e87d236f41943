"""A local Prefect server that outlives one command, so that runs without PREFECT_API_URL need not start one each.

The first command of a PREFECT_HOME starts `prefect server start` in the background (its own process group, its
database and log in that PREFECT_HOME) and records its pid, port and process start time in
`PREFECT_HOME/mnist-pipeline-server.json`; later commands of the same PREFECT_HOME find it and reuse it. A server
that died, or a record whose pid now belongs to another process, is replaced. `mnist-pipeline server stop` stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.errors import PipelineError
from tasks.files import atomic_write, flocked

RECORD = "mnist-pipeline-server.json"
LOG = "mnist-pipeline-server.log"
LOCK = "mnist-pipeline-server.lock"
PREFERRED_PORT = 4200  # Prefect's usual port, when it is free
# Set to false (or 0, no) to have Prefect start a temporary server inside each command instead.
SWITCH = "MNIST_PIPELINE_LOCAL_SERVER"


@dataclass(frozen=True)
class LocalServer:
    """A background `prefect server start` of one PREFECT_HOME."""

    home: str
    pid: int
    port: int
    # The process's start time (clock ticks after boot): a pid reused by another process never passes for the server.
    started: int

    @property
    def url(self) -> str:
        """Return the address of the server's UI."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """Return the address of the server's API."""
        return f"{self.url}/api"

    def alive(self) -> bool:
        """Return whether the recorded process still runs (the same process, not a later one with its pid)."""
        return _start_time(self.pid) == self.started

    def healthy(self) -> bool:
        """Return whether the API answers its health check."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def enabled() -> bool:
    """Return whether commands may start and reuse a local server (the default)."""
    return os.environ.get(SWITCH, "true").strip().lower() not in ("0", "false", "no", "off")


def find(home: Path) -> LocalServer | None:
    """Return the running local server of a PREFECT_HOME, or None if there is none (or it died)."""
    try:
        server = LocalServer(**json.loads((home / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return server if server.alive() else None


def ensure(home: Path) -> tuple[LocalServer, bool]:
    """Return the local server of `home`, starting one if none runs; and whether it was started now.

    Does not wait for a new server to answer (see `wait_until_ready`), so that its start overlaps the command's work.
    """
    home.mkdir(parents=True, exist_ok=True)
    with flocked(home / LOCK):  # two commands at once start one server
        server = find(home)
        if server is not None:
            return server, False
        port = PREFERRED_PORT if _port_free(PREFERRED_PORT) else free_port()
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            # On a port other than 4200 the UI needs to be told where its API is.
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_V2_ENABLED": os.environ.get("PREFECT_SERVER_UI_V2_ENABLED", "false"),
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        }
        env.pop("PREFECT_API_URL", None)
        with open(home / LOG, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C in the terminal does not stop it
            )
        server = LocalServer(home=str(home), pid=process.pid, port=port, started=_start_time(process.pid))
        atomic_write(home / RECORD, json.dumps(asdict(server), indent=2) + "\n")
        return server, True


def wait_until_ready(server: LocalServer, timeout: float = 120.0) -> None:
    """Wait until the server answers; raise PipelineError (naming its log) if it dies or does not answer in time."""
    deadline = time.monotonic() + timeout
    while not server.healthy():
        if not server.alive() or time.monotonic() > deadline:
            state = "exited" if not server.alive() else f"did not answer within {timeout:.0f} s"
            raise PipelineError(f"local Prefect server: expected it to answer at {server.url}, found it {state}; "
                                f"see {Path(server.home) / LOG}")
        time.sleep(0.1)


def stop(home: Path, timeout: float = 20.0) -> LocalServer | None:
    """Stop the local server of `home` (its whole process group) and forget it; return it, or None if none ran."""
    with flocked(home / LOCK) if home.is_dir() else nullcontext():
        server = find(home)
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while server.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if server.alive():
                os.killpg(server.pid, signal.SIGKILL)
        (home / RECORD).unlink(missing_ok=True)
    return server


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the command name, which is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
