"""The local Prefect server of runs without PREFECT_API_URL: started once, reused, replaced when dead, stopped."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows import server
from synthetic import write_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path):
    """A PREFECT_HOME of its own; whatever server the test leaves in it is stopped."""
    home = tmp_path / "prefect-home"
    yield home
    left = server.stop(home)
    assert left is None or not left.alive()


@pytest.fixture
def command(tmp_path, home):
    """Return a function that runs `mnist-pipeline ARGS` on a small synthetic source with the local server on."""
    digests = write_source(tmp_path / "source")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({
        "PREFECT_HOME": str(home), server.SWITCH: "true",
        "MNIST_PIPELINE_DOWNLOAD__SHA256": json.dumps(digests), "MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]",
        "MNIST_PIPELINE_VALIDATION__TRAIN_COUNT": "200", "MNIST_PIPELINE_VALIDATION__TEST_COUNT": "50",
    })
    roots = ["--source", str(tmp_path / "source"), "--data-dir", str(tmp_path / "data"),
             "--artifacts-dir", str(tmp_path / "artifacts")]

    def run(*args, code=0, **more_env):
        extra = roots if args[0] == "run" else []
        result = subprocess.run([sys.executable, "-m", "flows.cli", *args, *extra], capture_output=True, text=True,
                                env={**env, **more_env}, cwd=REPO, timeout=300)
        assert result.returncode == code, result.stderr[-3000:]
        return result

    return run


def living_in_group(pgid: int) -> list[int]:
    """Return the processes of a process group that are not zombies."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def flow_runs(local: server.LocalServer) -> list[dict]:
    request = urllib.request.Request(f"{local.api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_two_commands_share_one_server_that_records_both_runs(command, home):
    first = command("run", "--until", "validate", "--json")
    assert "starting a local Prefect server" in first.stderr
    local = server.find(home)
    assert local is not None and local.healthy() and Path(local.home) == home

    second = command("run", "--until", "validate", "--json")
    assert "starting a local Prefect server" not in second.stderr
    assert server.find(home) == local  # the same process
    runs = {json.loads(out.stdout)["run_id"] for out in (first, second)}
    recorded = {r["id"]: r for r in flow_runs(local)}
    assert runs <= set(recorded) and all(recorded[r]["state_type"] == "COMPLETED" for r in runs)
    assert f"Prefect UI: {local.url}/runs/flow-run/" in second.stderr
    assert (home / "prefect.db").is_file()  # the server's database stays in PREFECT_HOME


def test_a_killed_server_is_replaced(command, home):
    command("run", "--until", "download")
    dead = server.find(home)
    os.killpg(dead.pid, signal.SIGKILL)

    assert "no local Prefect server" in command("server", "status", code=1).stdout
    again = command("run", "--until", "download")
    assert "starting a local Prefect server" in again.stderr
    replaced = server.find(home)
    assert replaced is not None and replaced.pid != dead.pid and replaced.healthy()


def test_stop_stops_it_and_leaves_nothing_running(command, home):
    command("run", "--until", "download")
    local = server.find(home)
    assert f"{local.url} (pid {local.pid}), answering" in command("server", "status").stdout

    assert f"stopped the local Prefect server at {local.url}" in command("server", "stop").stdout
    assert not local.alive() and not local.healthy()
    assert living_in_group(local.pid) == []  # nothing of its process group runs (zombies aside: no init reaps here)
    assert not (home / server.RECORD).exists()
    assert "no local Prefect server" in command("server", "stop").stdout


def test_a_configured_api_or_the_switch_means_no_local_server(command, home, prefect_api_url):
    with_api = command("run", "--until", "download", PREFECT_API_URL=prefect_api_url)
    switched_off = command("run", "--until", "download", **{server.SWITCH: "false"})
    assert server.find(home) is None and not (home / server.RECORD).exists()
    assert "local Prefect server" not in with_api.stderr + switched_off.stderr
