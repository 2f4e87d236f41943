"""Test isolation: a private PREFECT_HOME, no telemetry, one Prefect test server per session."""

import os
import sys
import tempfile
from pathlib import Path

# Before anything imports prefect: keep tests out of ~/.prefect and the user's environment.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mnist-pipeline-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
# Tasks called outside a flow (tests/test_tasks_direct.py) have no flow run to send their logs to.
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.pop("PREFECT_API_URL", None)
for _name in [n for n in os.environ if n.startswith("MNIST_PIPELINE_")]:
    del os.environ[_name]
# Commands started by tests use Prefect's temporary server or the test server, never a local server that would
# outlive them; tests/test_server.py turns it on for its own PREFECT_HOMEs and stops what it starts.
os.environ["MNIST_PIPELINE_LOCAL_SERVER"] = "false"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

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
