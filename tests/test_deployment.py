"""prefect.yaml end to end: a real `prefect server start`, `prefect deploy --all`, the weekly schedule, an adhoc run on a
process worker, and the run seen in the UI by headless Chromium.

Every process started here (server, worker, Chromium) is stopped by its PID when the module's tests are done, whether
they passed or not. Screenshots are copied to SCREENSHOT_DIR and the paths printed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from conftest import free_port
from synthetic import write_source

pytestmark = pytest.mark.slow  # run by CI; `pytest -m 'not slow'` skips it locally

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))  # the venv's CLI, next to the interpreter running the tests
FLOW = "mnist-pipeline"
FLOWS = {"flows/pipeline.py:mnist_pipeline": FLOW, "flows/predict.py:mnist_predict": "mnist-predict",
         "flows/sweep.py:mnist_sweep": "mnist-sweep"}
TASKS = ["download_mnist", "validate_mnist", "preprocess_mnist", "train_model", "evaluate_model", "report_results"]
REPORT_KEYS = ["mnist-report", "mnist-metrics", "mnist-confusion-matrix"]
SCREENSHOT_DIR = Path(tempfile.gettempdir()) / "mnist-pipeline-ui"
PROJECT = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PROJECT["deployments"]}
POOL = DEPLOYMENTS["adhoc"]["work_pool"]["name"]
SERVER_STARTUP_S = 180  # 10-20 s when idle; far more on 2 busy cores
WORKER_RUN_S = 300  # the tiny run takes 20-40 s


# --- processes ------------------------------------------------------------------------------------------------------


def _start(args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen:
    """Start a process in its own session (so its children can be found again), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started by `_start`: SIGTERM, wait, SIGKILL on timeout; then whatever it left in its session."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    try:  # flow-run or renderer processes it started and did not stop; the session id is its PID
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"--- last lines of {log} ---\n" + "\n".join(text.splitlines()[-lines:])


def _cli(server: SimpleNamespace, *args: str, cwd: Path = REPO, timeout: float = 300) -> str:
    """Run `prefect ARGS` against the test server; return its output, failing the test if it fails."""
    result = subprocess.run([PREFECT, *args], cwd=cwd, env=server.env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _prefect_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment of every Prefect process of these tests: a private PREFECT_HOME, no telemetry, no prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and not k.startswith("MNIST_PIPELINE_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLI_PROMPT="false",
        PREFECT_CLI_COLORS="false",
        PREFECT_CLI_WRAP_LINES="false",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `prefect server start` on a free port of 127.0.0.1 (SQLite in a temp PREFECT_HOME), started in the checkout."""
    base = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _prefect_env(base / "home", api)
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_env.update(
        # The UI asks this URL for its API; the default assumes port 4200.
        PREFECT_UI_API_URL=api,
        # The scheduler's main loop (default 60 s); new deployments are also picked up by a 5 s loop.
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
    )
    log = base / "server.log"
    started = time.monotonic()
    proc = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, cwd=REPO, env=server_env)
    try:
        with httpx.Client(base_url=api, timeout=10) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"prefect server start exited {proc.returncode}\n{_tail(log)}")
                if time.monotonic() - started > SERVER_STARTUP_S:
                    pytest.fail(f"the server did not answer /api/health within {SERVER_STARTUP_S} s\n{_tail(log)}")
                try:
                    if client.get("/health").json() is True:
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.5)
            print(f"server up after {time.monotonic() - started:.1f} s at {api}")
            yield SimpleNamespace(api=api, ui=f"http://127.0.0.1:{port}", env=env, base=base, log=log, client=client)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def deployed(server):
    """The process work pool of prefect.yaml and its deployments, created with the commands of the README."""
    _cli(server, "work-pool", "create", POOL, "--type", "process")
    output = _cli(server, "--no-prompt", "deploy", "--all")
    ids = {}
    for name, spec in DEPLOYMENTS.items():
        flow = FLOWS[spec["entrypoint"]]
        response = server.client.get(f"/deployments/name/{flow}/{name}")
        assert response.status_code == 200, f"{flow}/{name} not deployed:\n{output}"
        ids[name] = response.json()
    return ids


def _config(base: Path) -> dict[str, Any]:
    """A run over small synthetic IDX files with roots under `base`, as the `config` parameter of the flow."""
    digests = write_source(base / "source")
    return {
        "data_dir": str(base / "data"),
        "artifacts_dir": str(base / "artifacts"),
        "download": {"source": str(base / "source"), "mirrors": [], "sha256": digests, "retries": 0},
        "validation": {"train_count": 200, "test_count": 50},
        "train": {"epochs": 2, "hidden_units": 32, "batch_size": 32, "jit_compile": False},
    }


@pytest.fixture(scope="module")
def adhoc_run(server, deployed):
    """Trigger the adhoc deployment with a tiny config, let a process worker run it, and return the flow run."""
    base = server.base / "adhoc"
    base.mkdir()
    return _run_deployment(server, deployed, f"{FLOW}/adhoc", {"config": _config(base)}, cwd=base)


def _run_deployment(server: SimpleNamespace, deployed: dict[str, Any], name: str, params: dict[str, Any],
                    cwd: Path) -> dict[str, Any]:
    """Trigger deployment `name` (flow/deployment), let a process worker run it, and return the completed flow run."""
    _cli(server, "deployment", "run", name, "--params", json.dumps(params))
    runs = _filter(server, "flow_runs", {"deployments": {"id": {"any_": [deployed[name.split("/")[1]]["id"]]}}})
    assert len(runs) == 1, runs
    return _work(server, runs[0]["id"], name, cwd)


def _work(server: SimpleNamespace, run_id: str, name: str, cwd: Path,
          env: dict[str, str] | None = None) -> dict[str, Any]:
    """Let a process worker (environment `env`, default the tests' Prefect one) run flow run `run_id` of deployment
    `name`, and return the completed flow run."""
    # Started outside the checkout on purpose: the deployment's pull step, not the worker's folder, locates the code.
    log = server.base / f"worker-{name.replace('/', '-')}.log"
    started = time.monotonic()
    worker = _start([PREFECT, "worker", "start", "--pool", POOL, "--name", "test-worker", "--run-once", "--limit", "1"],
                    log, cwd=cwd, env=env or server.env)
    try:
        worker.wait(timeout=WORKER_RUN_S)  # --run-once with a limit: one poll, then wait for the run it took
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish the run within {WORKER_RUN_S} s\n{_tail(log)}")
    finally:
        _stop(worker)
    print(f"worker ran {name} in {time.monotonic() - started:.1f} s")
    deadline = time.monotonic() + 30
    while True:
        run = server.client.get(f"/flow_runs/{run_id}").json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert run["state_type"] == "COMPLETED", f"flow run {run['state_name']}: {run['state']}\n{_tail(log, 80)}"
    return run


def _filter(server: SimpleNamespace, kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = server.client.post(f"/{kind}/filter", json=body)
    response.raise_for_status()
    return response.json()


# --- settings, deployments, schedule --------------------------------------------------------------------------------


def test_prefect_processes_started_in_the_checkout_send_no_telemetry(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    view = subprocess.run([PREFECT, "config", "view", "--show-sources"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert view.returncode == 0, view.stderr
    assert "PREFECT_SERVER_ANALYTICS_ENABLED='False' (from pyproject.toml)" in view.stdout
    assert "PREFECT_SERVER_UI_V2_ENABLED='False' (from pyproject.toml)" in view.stdout


def test_weekly_deployment_is_scheduled_and_adhoc_is_not(server, deployed):
    weekly, adhoc = deployed["weekly-retrain"], deployed["adhoc"]
    [schedule] = weekly["schedules"]
    spec = DEPLOYMENTS["weekly-retrain"]["schedules"][0]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == spec["cron"] == "0 3 * * 1"
    assert schedule["schedule"]["timezone"] == spec["timezone"] == "Europe/Berlin"
    assert adhoc["schedules"] == []
    for deployment in (weekly, adhoc):
        assert deployment["work_pool_name"] == POOL
        assert deployment["entrypoint"] == "flows/pipeline.py:mnist_pipeline"
        # `prefect deploy` recorded the checkout it ran in, as an absolute path.
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]

    deadline = time.monotonic() + 90
    while True:
        scheduled = _filter(server, "flow_runs", {
            "deployments": {"id": {"any_": [weekly["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        })
        if scheduled or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert scheduled, "the server's scheduler created no runs of the weekly deployment within 90 s"
    berlin = ZoneInfo("Europe/Berlin")
    for run in scheduled:
        start = datetime.fromisoformat(run["expected_start_time"])
        assert start > datetime.now(timezone.utc)
        local = start.astimezone(berlin)
        assert (local.isoweekday(), local.hour, local.minute) == (1, 3, 0), local
        assert run["auto_scheduled"] is True
    adhoc_runs = _filter(server, "flow_runs", {"deployments": {"id": {"any_": [adhoc["id"]]}}})
    assert not [run for run in adhoc_runs if run["auto_scheduled"]]


# --- the adhoc run --------------------------------------------------------------------------------------------------


def test_adhoc_run_completes_all_six_stages_with_report_artifacts_and_epoch_logs(server, adhoc_run):
    task_runs = _filter(server, "task_runs", {"flow_runs": {"id": {"any_": [adhoc_run["id"]]}}})
    assert sorted(t["name"].rsplit("-", 1)[0] for t in task_runs) == sorted(TASKS), [t["name"] for t in task_runs]
    assert {(t["state_type"], t["state_name"]) for t in task_runs} == {("COMPLETED", "Completed")}

    artifacts = _filter(server, "artifacts", {"artifacts": {"flow_run_id": {"any_": [adhoc_run["id"]]}}})
    keys = {a["key"] for a in artifacts}
    assert set(REPORT_KEYS) <= keys, keys
    assert "mnist-training-progress" in keys, keys

    logs = _filter(server, "logs", {"logs": {"flow_run_id": {"any_": [adhoc_run["id"]]}}, "sort": "TIMESTAMP_ASC",
                                    "limit": 200})
    messages = [entry["message"] for entry in logs]
    for epoch in (1, 2):
        assert any(m.startswith(f"epoch {epoch}/2: loss") for m in messages), messages


def test_score_folder_deployment_scores_images_with_a_trained_model(server, deployed, adhoc_run):
    from PIL import Image

    from synthetic import make_split

    spec = DEPLOYMENTS["score-folder"]
    assert spec["entrypoint"] == "flows/predict.py:mnist_predict" and spec["schedules"] is None
    assert deployed["score-folder"]["schedules"] == [] and deployed["sweep"]["schedules"] == []
    assert deployed["sweep"]["parameters"]["space"] == DEPLOYMENTS["sweep"]["parameters"]["space"]
    base = server.base / "adhoc"
    # The adhoc run's model, by path: whether its tiny training passed the promotion gate does not matter here.
    [model] = (base / "artifacts" / "models").glob("*/model.keras")
    incoming = server.base / "incoming"
    incoming.mkdir()
    images, _ = make_split(6, seed=3)
    for i, image in enumerate(images):
        Image.fromarray(255 - image).save(incoming / f"scan-{i}.png")  # ink on paper: detected and inverted
    params = {"inputs": [str(incoming)], "model": str(model), "output": str(server.base / "scores.csv"),
              "config": {"artifacts_dir": str(base / "artifacts")}}
    run = _run_deployment(server, deployed, "mnist-predict/score-folder", params, cwd=incoming)

    task_runs = _filter(server, "task_runs", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert sorted(t["name"].rsplit("-", 1)[0] for t in task_runs) == ["load_inputs", "predict_classes", "write_predictions"]
    assert (server.base / "scores.csv").read_text().count("scan-") == 6
    artifacts = {a["key"]: a for a in _filter(server, "artifacts", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    assert len(json.loads(artifacts["mnist-predictions"]["data"])) == 6
    assert "data:image/png;base64," in artifacts["mnist-predictions-strip"]["data"]


def test_sweep_deployment_runs_its_trials_on_a_local_cluster_in_the_worker(server, deployed, adhoc_run):
    base = server.base / "adhoc"  # the adhoc run's roots: its data stages are cached
    config = {**_config(base), "sweep": {"dask_workers": 1}, "promotion": {"min_test_accuracy": 0.0}}
    params = {"space": {"grid": {"hidden_units": [16, 24]}}, "config": config}
    run = _run_deployment(server, deployed, "mnist-sweep/sweep", params, cwd=base)

    task_runs = _filter(server, "task_runs", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    names = sorted(t["name"].rsplit("-", 1)[0] for t in task_runs)
    assert names == ["download_mnist", "evaluate_model", "evaluate_model", "preprocess_mnist", "train_model",
                     "train_model", "validate_mnist"]
    assert {t["state_name"] for t in task_runs if t["name"].startswith("download")} == {"Cached"}
    artifacts = {a["key"]: a for a in _filter(server, "artifacts", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    assert [row["hidden_units"] for row in json.loads(artifacts["mnist-sweep"]["data"])] == [16, 24]
    assert list((base / "artifacts" / "sweeps").glob("*/sweep.html"))


# --- the event-driven deployment ------------------------------------------------------------------------------------


def _worker_env(config: dict[str, Any]) -> dict[str, str]:
    """A config as MNIST_PIPELINE_* variables, as an operator sets them for the worker: SECTION__FIELD, JSON values."""
    env = {}
    for section, value in config.items():
        for field, item in (value.items() if isinstance(value, dict) else [("", value)]):
            name = f"MNIST_PIPELINE_{section}__{field}" if field else f"MNIST_PIPELINE_{section}"
            env[name.upper()] = item if isinstance(item, str) else json.dumps(item)
    return env


def _wait_for(what: str, check, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not so after {timeout} s"
        time.sleep(1)
    return value


def test_batches_landing_together_trigger_one_run_of_batch_landed_that_trains_on_them(server, deployed):
    from flows.cli import BATCH_EVENT
    from synthetic import make_split
    from tasks.sources import write_class_folders

    [trigger] = DEPLOYMENTS["batch-landed"]["triggers"]
    deployment = deployed["batch-landed"]
    assert trigger["expect"] == [BATCH_EVENT] and deployment["schedules"] == []
    [automation] = server.client.get(f"/automations/related-to/prefect.deployment.{deployment['id']}").json()
    assert automation["trigger"]["expect"] == [BATCH_EVENT] and automation["enabled"]

    base = server.base / "batch-landed"
    root = base / "batches"
    names = ["2026-12-07", "2026-12-14"]
    for seed, name in enumerate(names, start=7):
        write_class_folders(base / "incoming" / name, {"": make_split(100, seed)})
    # Two producers adding a batch each at the same time, with the real CLI: two events within the trigger's window.
    cli = str(Path(sys.executable).with_name("mnist-pipeline"))
    adds = [_start([cli, "add-batch", str(base / "incoming" / name), "--name", name, "--batches", str(root)],
                   base / f"add-{name}.log", cwd=base, env=server.env) for name in names]
    try:
        for add, name in zip(adds, names):
            add.wait(timeout=120)
            output = (base / f"add-{name}.log").read_text()
            assert add.returncode == 0 and f"emitted {BATCH_EVENT} for batch {name}" in output, output
    finally:
        for add in adds:
            _stop(add)

    # The events are on the server, each with its batch in its resource.
    ids = [f"mnist-pipeline.batch.{name}" for name in names]
    query = {"filter": {"event": {"name": [BATCH_EVENT]}, "resource": {"id": ids}}, "limit": 10}
    events = _wait_for("both events are on the server", lambda: (
        found if len(found := server.client.post("/events/filter", json=query).json()["events"]) == 2 else None))
    assert sorted(e["resource"]["prefect.resource.id"] for e in events) == ids
    assert {e["resource"]["mnist-pipeline.batches-root"] for e in events} == {str(root)}

    # One run, created by the deployment's automation, starting once the trigger's window has closed.
    runs_of_deployment = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    [run] = _wait_for("the automation created a run", lambda: _filter(server, "flow_runs", runs_of_deployment))
    assert run["created_by"]["type"] == "AUTOMATION" and run["created_by"]["id"] == automation["id"]
    assert run["parameters"] == {"until": "report"} and run["state_type"] == "SCHEDULED"
    start = datetime.fromisoformat(run["expected_start_time"])
    first = min(datetime.fromisoformat(e["occurred"]) for e in events)
    assert (start - first).total_seconds() >= trigger["schedule_after"] >= trigger["within"]
    time.sleep(max(10.0, (start - datetime.now(timezone.utc)).total_seconds()))  # 10 s: time for a second run to appear
    assert len(_filter(server, "flow_runs", runs_of_deployment)) == 1  # the second event started no run of its own

    # The roots and settings come from the worker's environment, which the flow-run process inherits.
    config = {**_config(base), "batches": {"root": str(root)}}
    run = _work(server, run["id"], f"{FLOW}/batch-landed", base, env={**server.env, **_worker_env(config)})
    assert run["deployment_id"] == deployment["id"]
    [model_config] = (base / "artifacts" / "models").glob("*/config.json")
    version = json.loads(model_config.read_text())["data_version"]
    checked = {json.loads(p.read_text())["name"]: p.parent.name
               for p in (base / "data" / "batches").glob("*/batch.json")}
    assert [digest[:16] for digest in version["batches"]] == [checked[name] for name in names]

    # Other producers emit the event themselves (README); after the window it starts a new run.
    resource = {"prefect.resource.id": "mnist-pipeline.batch.2026-12-21"}
    _cli(server, "event", "emit", BATCH_EVENT, "--resource", json.dumps(resource))
    runs = _wait_for("the emitted event created a second run", lambda: (
        found if len(found := _filter(server, "flow_runs", runs_of_deployment)) == 2 else None))
    [second] = [r for r in runs if r["id"] != run["id"]]
    assert second["created_by"]["id"] == automation["id"] and second["state_type"] == "SCHEDULED"
    server.client.delete(f"/flow_runs/{second['id']}").raise_for_status()  # not for a later worker of this module


# --- a worker that dies: heartbeats, and the automation that marks its run Crashed ----------------------------------

AUTOMATION = REPO / "automations" / "crash-runs-without-heartbeats.yaml"
HEARTBEAT = "prefect.flow-run.heartbeat"
HEARTBEAT_FREQUENCY = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
CRASH_EPOCHS = 80  # about 0.3 s each: still training when killed (after epoch 2), resumed by the next run


def _heartbeats(server: SimpleNamespace, run_id: str) -> list[datetime]:
    """When each heartbeat event of flow run `run_id` on the server occurred (oldest first)."""
    query = {"filter": {"event": {"name": [HEARTBEAT]}, "resource": {"id": [f"prefect.flow-run.{run_id}"]}},
             "limit": 50}
    response = server.client.post("/events/filter", json=query)
    response.raise_for_status()
    return sorted(datetime.fromisoformat(event["occurred"]) for event in response.json()["events"])


def _messages(server: SimpleNamespace, run_id: str) -> list[str]:
    logs = _filter(server, "logs", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
    return [entry["message"] for entry in logs]


def _kill_machine(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a worker started by `_start` and everything under it, as when its machine dies: its process group (its
    PID, the session `_start` gave it) and that of each of its descendants (the worker starts each flow run in a
    session of its own, which a SIGKILL of the worker's group does not reach). Return the descendants' PIDs."""
    import psutil

    descendants = psutil.Process(proc.pid).children(recursive=True)
    groups = {proc.pid}
    for child in descendants:
        try:
            groups.add(os.getpgid(child.pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never the test's own group
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    return [child.pid for child in descendants]


def test_a_run_whose_worker_is_sigkilled_is_marked_crashed_and_the_next_run_completes_intact(server, deployed):
    # Every run of the deployments sends heartbeats every 30 s, whatever its worker's environment (this worker's has
    # none), and carries the tag that the automation watches.
    spec = yaml.safe_load(AUTOMATION.read_text())
    within = spec["trigger"]["within"]
    for name, deployment in DEPLOYMENTS.items():
        frequency = deployment["work_pool"]["job_variables"]["env"][HEARTBEAT_FREQUENCY]
        assert deployed[name]["job_variables"]["env"][HEARTBEAT_FREQUENCY] == frequency == "30", name
        assert within >= 3 * int(frequency)  # three missed heartbeats: never a healthy run
        [tag] = deployed[name]["tags"]
        watched = {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"}
        assert spec["trigger"]["match_related"] == watched, name
    assert HEARTBEAT_FREQUENCY not in server.env
    # The README's command creates the automation.
    output = _cli(server, "automation", "create", "--from-file", str(AUTOMATION))
    assert f"Created automation '{spec['name']}'" in output, output
    [automation] = [a for a in server.client.post("/automations/filter", json={}).json() if a["name"] == spec["name"]]
    assert automation["enabled"] and automation["trigger"]["posture"] == "Proactive"

    base = server.base / "heartbeats"
    base.mkdir()
    config = _config(base)
    config["train"].update(epochs=CRASH_EPOCHS, batch_size=8)
    adhoc = deployed["adhoc"]["id"]
    created: list[str] = []

    def new_run() -> str:
        before = {r["id"] for r in _filter(server, "flow_runs", {"deployments": {"id": {"any_": [adhoc]}}})}
        _cli(server, "deployment", "run", f"{FLOW}/adhoc", "--params", json.dumps({"config": config}))
        [run] = [r for r in _filter(server, "flow_runs", {"deployments": {"id": {"any_": [adhoc]}}})
                 if r["id"] not in before]
        created.append(run["id"])
        return run["id"]

    log = base / "worker-killed.log"
    worker = None
    try:
        run_id = new_run()
        started = time.monotonic()
        worker = _start([PREFECT, "worker", "start", "--pool", POOL, "--name", "doomed-worker", "--run-once",
                         "--limit", "1"], log, cwd=base, env=server.env)

        def training_and_heartbeating() -> bool:
            assert worker.poll() is None, f"the worker exited {worker.returncode} before the kill\n{_tail(log, 80)}"
            run = server.client.get(f"/flow_runs/{run_id}").json()
            assert run["state_type"] in ("PENDING", "RUNNING", "SCHEDULED"), f"{run['state']}\n{_tail(log, 80)}"
            return (run["state_type"] == "RUNNING" and bool(_heartbeats(server, run_id))
                    and any(m.startswith(f"epoch 2/{CRASH_EPOCHS}:") for m in _messages(server, run_id)))

        _wait_for("the run is training and sent a heartbeat", training_and_heartbeating, timeout=240)
        epochs = [m.split(":")[0] for m in _messages(server, run_id) if m.startswith("epoch ")]
        print(f"{epochs[-1]} done, {len(_heartbeats(server, run_id))} heartbeat(s), "
              f"{time.monotonic() - started:.1f} s after the worker started")
        # The flow-run process got the frequency from the deployment (30 s: not Prefect's 180, which would outlast the
        # automation's window and get healthy runs marked Crashed).
        import psutil

        environments = [p.environ() for p in psutil.Process(worker.pid).children(recursive=True)]
        engines = [env for env in environments if env.get("PREFECT__FLOW_RUN_ID") == run_id]
        assert engines and {env.get(HEARTBEAT_FREQUENCY) for env in engines} == {frequency}, environments

        flow_run_pids = _kill_machine(worker)
        killed = time.monotonic()
        print(f"SIGKILLed the worker {worker.pid} and its flow-run processes {flow_run_pids}")
        assert flow_run_pids  # the flow-run process was killed too, not only the worker
        # Nothing told the server: the run stays Running until its heartbeats are missed for `within` seconds.
        assert server.client.get(f"/flow_runs/{run_id}").json()["state_type"] == "RUNNING"

        # Bound: the window after the last heartbeat, the server's proactive evaluation (every 5 s), slack for 2 busy
        # cores; counted from the kill, which came after the last heartbeat.
        bound = within + int(frequency) + 30
        run = _wait_for("the killed run is Crashed", lambda: (
            found if (found := server.client.get(f"/flow_runs/{run_id}").json())["state_type"] != "RUNNING" else None),
            timeout=bound)
        print(f"Crashed {time.monotonic() - killed:.1f} s after the kill; its task runs: " + ", ".join(
            f"{t['name']} {t['state_name']}" for t in _filter(server, "task_runs", {
                "flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})))
        assert run["state_type"] == "CRASHED" and run["state_name"] == "Crashed", run["state"]
        assert run["state"]["message"] == spec["actions"][0]["message"]
        last_beat = max(_heartbeats(server, run_id))
        assert (datetime.fromisoformat(run["state"]["timestamp"]) - last_beat).total_seconds() >= within

        # The next run of the deployment, on a new worker, completes: the data stages cached, training resumed from the
        # last epoch the killed run finished, and every stage's recorded result intact.
        next_id = new_run()
        _work(server, next_id, f"{FLOW}/adhoc-after-crash", base)
        messages = _messages(server, next_id)
        resumed = [m for m in messages if m.startswith("resuming from epoch ")]
        assert resumed, messages
        print(resumed[0].split(" (")[0])
        task_runs = {t["name"].rsplit("-", 1)[0]: t["state_name"]
                     for t in _filter(server, "task_runs", {"flow_runs": {"id": {"any_": [next_id]}}})}
        assert task_runs == {**dict.fromkeys(TASKS[:3], "Cached"), **dict.fromkeys(TASKS[3:], "Completed")}, task_runs
        # Nothing half-recorded: every stage result recorded (by either run) names whole files with their recorded
        # digests, and no scratch folder is left.
        from prefect.filesystems import LocalFileSystem
        from prefect.results import ResultStore
        from prefect.serializers import JSONSerializer

        cache = base / "artifacts" / "cache"
        store = ResultStore(result_storage=LocalFileSystem(basepath=str(cache)), serializer=JSONSerializer())
        records = [path.name for path in cache.iterdir() if path.is_file()]
        assert len(records) >= len(TASKS), records
        assert {name: store.read(name).result.problem() for name in records} == dict.fromkeys(records), records
        roots = [base / "data", base / "artifacts"]
        assert not [p for root in roots for p in root.rglob(".*") if p.name.startswith((".tmp-", ".trash-"))]
    finally:
        if worker is not None:
            _stop(worker)
        for run_id in created:  # the adhoc runs of other tests of this module count theirs
            server.client.delete(f"/flow_runs/{run_id}")
        server.client.delete(f"/automations/{automation['id']}")


# --- the UI in headless Chromium ------------------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol (with `websockets`, which Prefect depends on)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-port=0",
             "--window-size=1400,1000"]

    def __init__(self, executable: str, base: Path):
        from websockets.sync.client import connect

        profile = base / "profile"
        self.log = base / "chromium.log"
        self.proc = _start([executable, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"], self.log)
        self.requests: list[str] = []
        self._id = 0
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Chromium did not open its DevTools port\n{_tail(self.log)}")
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = next(t for t in targets if t["type"] == "page")
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            self.send("Network.enable")
            self.send("Page.enable")
        except BaseException:
            _stop(self.proc)
            raise

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, height: int = 1000) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=1400, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_until(self, expression: str, what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not so after {timeout} s; the page says:\n{self.text()[:3000]}")
            time.sleep(0.5)
        return value

    def wait_for_text(self, *needles: str, timeout: float = 60) -> None:
        check = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        self.wait_until(f"!!document.body && {check}", f"page shows {needles}", timeout)

    def click_tab(self, label: str) -> None:
        self.wait_until(
            f"(() => {{ const tab = [...document.querySelectorAll('[role=tablist] > *')]"
            f".find(e => e.innerText.trim() === {json.dumps(label)}); if (tab) tab.click(); return !!tab; }})()",
            f"tab {label!r} is there",
        )

    def screenshot(self, path: Path) -> Path:
        time.sleep(1)  # let the last layout and images settle
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            _stop(self.proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium from the system (Debian package `chromium`, which .ci/run installs)."""
    executable = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if executable is None:
        pytest.fail("Chromium is not installed: the UI test needs it (apt-get install chromium; .ci/run does this)")
    chromium = Chromium(executable, tmp_path_factory.mktemp("chromium"))
    try:
        yield chromium
    finally:
        chromium.close()


def _keep(shot: Path, capsys) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    kept = shutil.copy2(shot, SCREENSHOT_DIR / shot.name)
    with capsys.disabled():
        print(f"\nscreenshot: {kept}")


def test_ui_shows_the_run_its_tasks_and_the_report_with_its_figures(server, adhoc_run, browser, tmp_path, capsys):
    run_page = f"{server.ui}/runs/flow-run/{adhoc_run['id']}"
    browser.open(run_page)
    browser.wait_for_text(adhoc_run["name"], "Completed", "mnist-pipeline", "adhoc")
    browser.click_tab("Task Runs")
    browser.wait_for_text("6 Task runs", *TASKS)
    _keep(browser.screenshot(tmp_path / "flow-run.png"), capsys)
    browser.click_tab("Artifacts")
    browser.wait_for_text(*REPORT_KEYS)
    _keep(browser.screenshot(tmp_path / "flow-run-artifacts.png"), capsys)

    [report] = _filter(server, "artifacts", {"artifacts": {"key": {"any_": ["mnist-report"]},
                                                           "flow_run_id": {"any_": [adhoc_run["id"]]}}})
    assert "](data:image/png;base64," in report["data"]
    browser.open(f"{server.ui}/artifacts/artifact/{report['id']}", height=3200)
    browser.wait_for_text("mnist-report", adhoc_run["name"])
    # The report embeds its figures as data: URIs; the UI's markdown renderer shows them as images.
    figures = report["data"].count("](data:image/png;base64,")
    browser.wait_until(
        "[...document.images].filter(i => i.src.startsWith('data:image/png;base64,') && i.complete && i.naturalWidth > 0)"
        f".length === {figures}",
        f"the report's {figures} figures are shown as images",
    )
    _keep(browser.screenshot(tmp_path / "report-artifact.png"), capsys)

    # The UI's front page (V1 by default, see pyproject.toml) fetches nothing from outside hosts either.
    browser.open(server.ui + "/")
    browser.wait_for_text("Dashboard")
    time.sleep(2)
    assert not browser.evaluate("location.pathname").startswith("/v2")
    outside = [u for u in browser.requests if not u.startswith((server.ui + "/", "data:", "about:", "blob:"))]
    assert not outside, outside
