"""Test isolation: a private PREFECT_HOME, no telemetry, one Prefect test server per session."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Before anything imports prefect: keep tests out of ~/.prefect and the user's environment.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mnist-pipeline-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
# Tasks called outside a flow (tests/test_tasks_direct.py) have no flow run to send their logs to.
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.pop("PREFECT_API_URL", None)
# pytest-xdist's worker processes get COLUMNS=80 and LINES=24: commands the tests start would wrap their tables.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
for _name in [n for n in os.environ if n.startswith("MNIST_PIPELINE_")]:
    del os.environ[_name]
# Commands started by tests use Prefect's temporary server or the test server, never a local server that would
# outlive them; tests/test_server.py turns it on for its own PREFECT_HOMEs and stops what it starts.
os.environ["MNIST_PIPELINE_LOCAL_SERVER"] = "false"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from flows.server import free_port  # noqa: E402, F401  (for the tests that start servers)
from synthetic import write_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_api_url():
    """Start one Prefect test server (temporary SQLite) for the session and return its API URL."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    # Startup on 2 busy cores can take far longer than the default 30 s.
    with prefect_test_harness(server_startup_timeout=300):
        yield prefect.settings.PREFECT_API_URL.value()


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process the tests started, with its session (its own children), by PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """Start Debian's redis-server on a free local port (no persistence, own session) and return its URL."""
    import redis

    server = shutil.which("redis-server")
    assert server, "redis-server is not installed (.ci/run installs Debian's package)"
    port = free_port()
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def synthetic_config(tmp_path):
    """Return a PipelineConfig over small synthetic IDX files, with roots in a temp dir and no mirrors."""
    from flows.config import PipelineConfig

    source = tmp_path / "source"
    digests = write_source(source)
    return PipelineConfig(
        data_dir=tmp_path / "data",
        artifacts_dir=tmp_path / "artifacts",
        download={"source": str(source), "mirrors": [], "sha256": digests, "retries": 0},
        validation={"train_count": 200, "test_count": 50},
        # Small and without XLA compilation: seconds per run; the real-data tests use the defaults.
        train={"epochs": 2, "hidden_units": 32, "batch_size": 32, "jit_compile": False},
    )


def tree_state(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Return {path: (inode, size, mtime_ns)} of every file under the roots."""
    state = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                st = path.stat()
                state[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """Start moto's S3 API server on a free local port (own session, stopped by PID) and return its URL; the AWS
    variables of this process point at it (dummy credentials)."""
    import urllib.request

    server = Path(sys.executable).with_name("moto_server")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        os.environ.update(S3_ENV | {"AWS_ENDPOINT_URL": url})
        yield url
    finally:
        stop_process(proc)


# Credentials and region for the local S3 server (it accepts any).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(s3_endpoint):
    """Create a new bucket on the local S3 server and return its URL (s3://NAME)."""
    from tasks.storage import filesystem

    name = f"test-{uuid.uuid4().hex[:12]}"
    filesystem().mkdir(name)
    return f"s3://{name}"
