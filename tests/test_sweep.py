"""Sweeps: spaces, and trials on a real Dask cluster (`dask scheduler` + two `dask worker` processes on 127.0.0.1)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, stop_process
from synthetic import write_source
from tasks import sweep
from tasks.artifacts import intact_files
from tasks.errors import PipelineError
from tasks.files import take_flock

REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).with_name("dask"))


# --- spaces ---

def test_grid_flags_give_every_combination_and_a_knob_applies_to_its_models():
    grid = sweep.parse_grid(["model=mlp,cnn", "hidden-units=128,512", "learning_rate=0.001,0.003"])
    trials = sweep.expand(sweep.build_space({"grid": grid}, "--grid"), {"epochs": 2}, "--grid")
    mlp = [(t.hidden_units, t.learning_rate) for t in trials if t.model == "mlp"]
    assert mlp == [(128, 0.001), (128, 0.003), (512, 0.001), (512, 0.003)]
    cnn = [t for t in trials if t.model == "cnn"]
    assert len(cnn) == 4 and {t.hidden_units for t in cnn} == {None} and {t.filters for t in cnn} == {32}
    assert len({sweep.trial_id(t) for t in trials}) == 6  # the cnn trials differ only in learning rate
    assert {t.epochs for t in trials} == {2}


def test_random_draws_are_repeatable_and_within_their_ranges(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "grid:\n  hidden_units: [64, 128]\nsamples: 5\nseed: 3\n"
        "random:\n  learning_rate: {low: 0.0001, high: 0.01, log: true}\n  batch_size: [64, 128]\n  epochs: {low: 1, high: 4}\n")
    space = sweep.build_space(sweep.load_space(tmp_path / "space.yaml"), "space.yaml")
    first, again = (sweep.expand(space, {}, "space.yaml") for _ in range(2))
    assert len(first) == 10 and [t.model_dump() for t in first] == [t.model_dump() for t in again]
    assert all(1e-4 <= t.learning_rate <= 1e-2 and t.batch_size in (64, 128) and 1 <= t.epochs <= 4 for t in first)
    assert all(isinstance(t.epochs, int) for t in first)
    (tmp_path / "space.json").write_text(json.dumps({"samples": 5, "seed": 4, "random": space.model_dump()["random"]}))
    other = sweep.expand(sweep.build_space(sweep.load_space(tmp_path / "space.json"), "s"), {}, "s")
    assert [t.learning_rate for t in other] != [t.learning_rate for t in first[:5]]


@pytest.mark.parametrize("document, fragment", [
    ({"grid": {"hidden_unit": [1]}}, "unknown parameter 'hidden_unit'"),
    ({"grid": {"learning_rate": []}}, "learning_rate: expected at least one value, found an empty list"),
    ({"grid": {"epochs": [0, 1]}}, "trial epochs=0: epochs: Input should be greater than or equal to 1"),
    ({"grid": {"filters": [8]}}, "filters: a knob of model cnn, not of model mlp"),
    ({"samples": 3}, "samples: expected random"),
    ({}, "expected a grid or random draws"),
    ({"samples": 2, "random": {"learning_rate": {"low": 0.1, "high": 0.01}}}, "expected low < high"),
])
def test_an_invalid_space_is_one_line(document, fragment):
    with pytest.raises(PipelineError) as error:
        sweep.expand(sweep.build_space(document, "space.yaml"), {}, "space.yaml")
    assert fragment in str(error.value) and str(error.value).startswith("space.yaml: ")
    assert "\n" not in str(error.value)


def test_an_invalid_space_on_the_command_line_stops_before_anything_starts(tmp_path):
    result = cli("sweep", "--grid", "hidden_units=0", "--data-dir", str(tmp_path / "data"),
                 "--artifacts-dir", str(tmp_path / "artifacts"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("mnist-pipeline: error: --grid: trial hidden_units=0:")
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()  # nothing started


# --- a real Dask cluster ---

def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO, start_new_session=True)


def worker_env(prefect_api_url: str, base: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_HOME": str(base / "worker-home"),
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore", "MNIST_PIPELINE_LOCAL_SERVER": "false"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_api_url):
    """A `dask scheduler` and two single-threaded `dask worker` processes (with nannies) on free local ports."""
    from distributed import Client

    base = tmp_path_factory.mktemp("dask")
    env = worker_env(prefect_api_url, base)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                      base / "scheduler.log", env)
    # w0 as the README starts workers (TensorFlow preloaded), w1 without the preload: both ways must size TensorFlow.
    preload = [["--preload", "tasks.keras_runtime"], []]
    workers = [start([DASK, "worker", address, "--nthreads", "1", "--nworkers", "1", "--name", f"w{i}", *preload[i],
                      "--no-dashboard", "--host", "127.0.0.1"], base / f"worker-{i}.log", env) for i in range(2)]
    try:
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
        yield {"address": address, "workers": workers, "base": base, "logs": base}
    finally:
        for proc in [*workers, scheduler]:
            stop_process(proc)


def sweep_config(base: Path, address: str | None, epochs: int = 2, n_train: int = 200):
    from flows.config import PipelineConfig

    if not (base / "source").exists():
        write_source(base / "source", n_train=n_train, n_test=50)
    return PipelineConfig(
        data_dir=base / "data", artifacts_dir=base / "artifacts",
        download={"source": str(base / "source"), "mirrors": [], "retries": 0},
        validation={"train_count": n_train, "test_count": 50},
        train={"epochs": epochs, "batch_size": 32, "jit_compile": False},
        promotion={"min_test_accuracy": 0.0},
        sweep={"dask_address": address, "dask_timeout_s": 20},
    )


def scheduler_transitions(address: str) -> int:
    """Return how many task state transitions the Dask scheduler has made so far, once it holds no task (the tasks of
    a sweep that returned are forgotten a moment later, each with transitions of its own)."""
    from distributed import Client

    with Client(address, timeout=60) as client:
        deadline = time.monotonic() + 60
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
            assert time.monotonic() < deadline, "the Dask scheduler still holds tasks after 60 s"
            time.sleep(0.1)
        return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def flow_run_logs(run_id: str) -> list[tuple[str | None, str]]:
    """Return (task run id or None, message) of every log line of a flow run on the Prefect server."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))
    return [(str(log.task_run_id) if log.task_run_id else None, log.message) for log in logs]


def task_run_names(run_id: str) -> list[str]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])))
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs]


def held_locks(config) -> list[Path]:
    from tasks.storage import lock_dir

    held = []
    for path in lock_dir(config.cache_dir).glob("*.lock"):
        fd = take_flock(path, timeout=0)
        if fd is None:
            held.append(path)
        else:
            os.close(fd)
    return held


def test_tensorflow_in_a_worker_is_sized_to_the_worker_threads(cluster):
    from distributed import Client

    def tensorflow_threads() -> tuple[str, str, bool, int]:  # nested: pickled by value, the workers cannot import tests
        import os

        from tasks import keras_runtime

        preloaded = keras_runtime._warming is not None  # the preload started the import when the worker started
        tf, _ = keras_runtime.import_tensorflow()
        tf.constant(1.0) + 1.0  # start TensorFlow's runtime, which reads the variables
        return os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_NUM_INTEROP_THREADS"], preloaded, os.getpid()

    with Client(cluster["address"], timeout=60) as client:
        by_name = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
        found = {name: client.submit(tensorflow_threads, pure=False, workers=[by_name[name]]).result(timeout=300)
                 for name in ("w0", "w1")}
    assert [found[name][:3] for name in ("w0", "w1")] == [("1", "1", True), ("1", "1", False)]
    assert os.getpid() not in {found[name][3] for name in found}
    assert "TF_NUM_INTRAOP_THREADS" not in os.environ  # set in the workers only


def test_a_sweep_on_the_cluster_trains_each_distinct_trial_once_and_reruns_cached(tmp_path, cluster):
    from flows.sweep import mnist_sweep
    from helpers import champion_of

    from tasks.registry import read_history

    config = sweep_config(tmp_path, cluster["address"])
    space = {"grid": {"hidden_units": [16, 24, 32, 32]}}

    first = mnist_sweep(space=space, config=config)

    assert [row["hidden_units"] for row in first["trials"]] == [16, 24, 32, 32]
    assert [row["state"] for row in first["trials"]] == ["trained"] * 4
    assert first["trials"][2]["model_digest"] == first["trials"][3]["model_digest"]
    assert len({row["model_digest"] for row in first["trials"]}) == 3
    names = task_run_names(first["run_id"])
    assert sorted(n for n, _ in names if n == "train_model") == ["train_model"] * 3
    # What the UI shows of the flow run: each train task run that ran on a worker has its own log lines there
    # (workers send them in batches, every 2 s by default).
    deadline = time.monotonic() + 30
    while True:
        logs = flow_run_logs(first["run_id"])
        trained = {task_run for task_run, message in logs if message.startswith("trained mlp in ")}
        if len(trained) == 3 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(trained) == 3 and None not in trained
    assert all(any(t == run and m.startswith("epoch 2/2: ") for t, m in logs) for run in trained)
    assert len(list((config.artifacts_dir / "models").glob("*/model.keras"))) == 3
    best = max(first["trials"], key=lambda r: (r["test_accuracy"], -r["test_loss"]))
    assert first["best"]["model_digest"] == best["model_digest"]
    assert champion_of(config).model_digest == best["model_digest"]
    assert len(read_history(config.registry_dir)) == 1
    report = Path(first["report"])
    assert report.is_file() and "data:image/png;base64," in report.read_text()
    assert "| 32 |" in report.with_name("sweep.md").read_text()
    for row in first["trials"]:  # each trial's metrics evaluate that trial's model
        assert intact_files(next((config.artifacts_dir / "models").glob(row["model_digest"][:16]))) is not None
    assert held_locks(config) == []

    from test_predict import run_artifacts

    artifacts = run_artifacts(first["run_id"])
    assert len(artifacts["mnist-sweep"]) == 4 and "data:image/png;base64," in artifacts["mnist-sweep-figure"]

    started = time.monotonic()
    transitions = scheduler_transitions(cluster["address"])
    again = mnist_sweep(space=space, config=config)
    assert [row["state"] for row in again["trials"]] == ["cached"] * 4
    assert scheduler_transitions(cluster["address"]) == transitions  # looked up here: nothing went to Dask
    assert [r["model_digest"] for r in again["trials"]] == [r["model_digest"] for r in first["trials"]]
    assert len(read_history(config.registry_dir)) == 1  # the decision of the first sweep still holds
    assert Path(again["report"]).with_name("sweep.md").read_text().count("| cached |") == 4
    print(f"cached sweep rerun: {time.monotonic() - started:.1f} s")


def test_a_worker_killed_mid_trial_is_rescheduled_and_nothing_partial_is_trusted(tmp_path, cluster):
    import threading

    import psutil

    from flows.sweep import mnist_sweep

    # Long enough to be caught in the middle: 2,000 images, 30 epochs.
    config = sweep_config(tmp_path, cluster["address"], epochs=30, n_train=2000)
    killed = []

    def kill_a_training_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            states = list((config.artifacts_dir / "train-state").glob("*/state.json"))
            if states:
                # The worker processes are the nannies' children; kill one that is training (both are, or one).
                for nanny in cluster["workers"]:
                    for child in psutil.Process(nanny.pid).children(recursive=True):
                        if child.cpu_percent(interval=0.2) > 20:
                            child.send_signal(signal.SIGKILL)
                            killed.append(child.pid)
                            return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_training_worker, daemon=True)
    killer.start()
    result = mnist_sweep(space={"grid": {"hidden_units": [16, 32]}}, config=config)
    killer.join(timeout=5)

    assert killed, "no worker was caught training"
    assert [row["state"] for row in result["trials"]] == ["trained", "trained"]
    for row in result["trials"]:
        folder = config.artifacts_dir / "models" / row["model_digest"][:16]
        assert intact_files(folder) is not None
        assert 0.0 <= row["test_accuracy"] <= 1.0
    assert held_locks(config) == []
    assert not list((config.artifacts_dir / "train-state").glob("*/state.json"))  # removed once published
    from flows.sweep import mnist_sweep as again

    assert [row["state"] for row in again(space={"grid": {"hidden_units": [16, 32]}}, config=config)["trials"]] == ["cached"] * 2


# --- the command line ---

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def test_cli_sweep_on_a_local_cluster_prints_json_and_trains_on_the_accepted_batches(tmp_path, prefect_api_url):
    from synthetic import make_split
    from tasks.batches import add_batch
    from tasks.sources import write_class_folders

    write_source(tmp_path / "source")
    write_class_folders(tmp_path / "landed", {"": make_split(100, 30)})
    add_batch(tmp_path / "landed", tmp_path / "batches", "2026-12-07")
    env = {"PREFECT_API_URL": prefect_api_url, "MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]",
           "MNIST_PIPELINE_DOWNLOAD__RETRIES": "0", "MNIST_PIPELINE_VALIDATION__TRAIN_COUNT": "200",
           "MNIST_PIPELINE_VALIDATION__TEST_COUNT": "50", "MNIST_PIPELINE_PROMOTION__MIN_TEST_ACCURACY": "0"}
    (tmp_path / "space.yaml").write_text("grid:\n  learning_rate: [0.001, 0.003]\n")
    result = cli("sweep", "--space", str(tmp_path / "space.yaml"), "--grid", "hidden_units=16", "--epochs", "1",
                 "--batch-size", "32", "--no-jit-compile", "--dask-workers", "2", "--json", "--source", str(tmp_path / "source"),
                 "--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts"),
                 "--batches", str(tmp_path / "batches"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert [(r["learning_rate"], r["hidden_units"], r["state"]) for r in summary["trials"]] == [
        (0.001, 16, "trained"), (0.003, 16, "trained")]
    assert summary["promotion"]["promoted"] and Path(summary["report"]).is_file()
    # As in `run`: the batch checked and accepted, and every trial trained on the base and the batch.
    assert summary["batches"]["2026-12-07"]["verdict"] == "accepted"
    assert len(summary["data_version"]["batches"]) == 1
    for row in summary["trials"]:
        (config,) = (tmp_path / "artifacts" / "models").glob(f"{row['model_digest'][:16]}/config.json")
        assert json.loads(config.read_text())["data_version"] == summary["data_version"]


def test_a_scheduler_that_does_not_answer_is_one_line_within_the_timeout(tmp_path, prefect_api_url):
    write_source(tmp_path / "source")
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = cli("sweep", "--grid", "hidden_units=16,32", "--dask-address", address, "--source", str(tmp_path / "source"),
                 "--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts"),
                 env={"PREFECT_API_URL": prefect_api_url, "MNIST_PIPELINE_SWEEP__DASK_TIMEOUT_S": "3", "MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]",
                      "MNIST_PIPELINE_VALIDATION__TRAIN_COUNT": "200", "MNIST_PIPELINE_VALIDATION__TEST_COUNT": "50"})
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mnist-pipeline: error:")]
    assert len(errors) == 1 and f"dask scheduler {address}: expected a Dask scheduler answering there" in errors[0]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 120
