"""Roots on S3-compatible object storage (moto's S3 API server on 127.0.0.1, a bucket per test): every stage, caching,
self-healing, --only/--rerun, the registry and the report on s3:// roots, and nothing left on this machine."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows import gc
from flows.cli import human_summary
from flows.history import history
from flows.pipeline import mnist_pipeline
from flows.status import UP_TO_DATE, pipeline_status
from helpers import champion_of, dataset_key, run_cli, states, synthetic_run
from synthetic import write_source
from tasks.errors import PipelineError
from tasks.layout import MANIFEST
from tasks.registry import read_history
from tasks.storage import as_root, filesystem

REPO = Path(__file__).resolve().parents[1]
ALL = ("download", "validate", "preprocess", "train", "evaluate", "report")


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


@pytest.fixture
def temp(tmp_path, monkeypatch):
    """This process's temp folder, private to the test: what the stages leave in it can be seen."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def s3_config(synthetic_config, s3_bucket, temp):
    return synthetic_config.model_copy(update={"data_dir": as_root(f"{s3_bucket}/team/data"),
                                               "artifacts_dir": as_root(f"{s3_bucket}/team/artifacts")})


def objects(bucket: str) -> dict[str, tuple[str, int]]:
    """Return {key: (ETag, size)} of every object in a bucket."""
    return {key: (info["ETag"], info["size"]) for key, info in filesystem().find(bucket, detail=True).items()}


def left_in(temp) -> list[str]:
    """Return the files under the temp folder, except the flock stage locks (this machine's run-time state)."""
    return sorted(str(p) for p in temp.rglob("*") if p.is_file() and "mnist-pipeline-locks" not in p.parts)


def artifact(summary, stage, name):
    return next(p for p in summary["stages"][stage]["artifacts"] if p.endswith("/" + name))


def test_every_stage_publishes_on_s3_roots_and_a_rerun_is_all_cached(s3_config, s3_bucket, temp, synthetic_config):
    from test_pipeline import run_artifact_keys

    first = mnist_pipeline(config=s3_config)

    assert states(first) == dict.fromkeys(ALL, "completed")
    paths = [p for info in first["stages"].values() for p in info["artifacts"]]
    assert all(p.startswith(f"{s3_bucket}/team/") for p in paths) and first["report"].startswith(s3_bucket)
    for folder in {p.rpartition("/")[0] for p in paths}:
        assert filesystem().exists(f"{folder}/{MANIFEST}")
    assert not synthetic_config.data_dir.exists() and not synthetic_config.artifacts_dir.exists()
    assert left_in(temp) == []  # inputs copied and outputs staged in the temp folder, removed after each stage
    assert human_summary(first).splitlines()[3].split() == ["train", "completed", artifact(first, "train", "model.keras")
                                                            .rpartition("/")[0]]  # s3://..., as given
    (decision,) = read_history(s3_config.registry_dir)
    assert champion_of(s3_config).model_path == artifact(first, "train", "model.keras")
    before = objects(s3_bucket)

    second = mnist_pipeline(config=s3_config)

    assert states(second) == dict.fromkeys(ALL, "cached")
    assert second["stages"] == {s: {**i, "state": "cached"} for s, i in first["stages"].items()}
    assert second["promotion"] == first["promotion"] and read_history(s3_config.registry_dir) == [decision]
    assert objects(s3_bucket) == before  # nothing written again
    expected = {"mnist-report", "mnist-metrics", "mnist-confusion-matrix", "mnist-promotion"}
    assert expected <= run_artifact_keys(second["run_id"])  # the cached report's UI artifacts, read from the bucket
    assert left_in(temp) == []

    # status, history and gc read the bucket as they read local roots.
    assert {row.state for row in pipeline_status(s3_config)} == {UP_TO_DATE}
    changed = s3_config.model_copy(update={"train": s3_config.train.model_copy(update={"epochs": 3})})
    assert next(row.why for row in pipeline_status(changed) if row.stage == "train") == ["train.epochs: 2 -> 3"]
    assert [row["model_digest"] for row in history(s3_config, dataset_key(s3_config))] == [decision.model_digest]
    planned = gc.plan(s3_config)
    assert (planned.folders, planned.records, planned.kept_folders) == ({}, [], len({p.rpartition("/")[0] for p in paths}))
    assert objects(s3_bucket) == before


@pytest.mark.parametrize("damage", ["delete", "flip", "no-manifest"])
def test_a_missing_or_altered_object_is_noticed_and_recomputed(s3_config, damage):
    first = mnist_pipeline(config=s3_config, until="train")
    parquet = artifact(first, "preprocess", "train.parquet")
    fs = filesystem()
    good = fs.cat_file(parquet)
    if damage == "delete":
        fs.rm_file(parquet)
    elif damage == "flip":  # same size: only the ETag (then the digest) tells
        fs.pipe_file(parquet, good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    else:  # as an upload that died before its manifest
        fs.rm_file(f"{parquet.rpartition('/')[0]}/{MANIFEST}")

    again = mnist_pipeline(config=s3_config, until="train")

    assert states(again) == {**dict.fromkeys(ALL[:3], "cached"), "preprocess": "completed", "train": "cached"}
    assert fs.cat_file(parquet) == good and fs.exists(f"{parquet.rpartition('/')[0]}/{MANIFEST}")


def test_only_and_rerun_on_s3_roots_and_identical_output_leaves_dependants_cached(s3_config, s3_bucket):
    first = mnist_pipeline(config=s3_config)

    rerun = mnist_pipeline(config=s3_config, rerun=["preprocess", "report"])
    only = mnist_pipeline(config=s3_config, only="evaluate")

    assert states(rerun) == {**dict.fromkeys(ALL, "cached"), "preprocess": "completed", "report": "completed"}
    assert rerun["stages"]["preprocess"] == {**first["stages"]["preprocess"], "state": "completed"}
    assert states(only) == {"evaluate": "completed"}
    assert only["stages"]["evaluate"]["artifacts"] == first["stages"]["evaluate"]["artifacts"]


def test_an_upload_cut_off_before_its_manifest_is_not_trusted_and_the_next_run_publishes_it(s3_config, monkeypatch):
    import botocore.exceptions

    fs = filesystem()
    real = fs.put_file

    def cut_off(lpath, rpath, *args, **kwargs):  # the connection drops as the model's manifest is uploaded
        if "/models/" in rpath and rpath.endswith(MANIFEST):
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return real(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", cut_off)
    with pytest.raises(PipelineError, match=r"^object storage at http://127\.0\.0\.1:\d+: Could not connect"):
        mnist_pipeline(config=s3_config, until="evaluate")
    models = f"{s3_config.artifacts_dir}/models"
    (folder,) = fs.ls(models)
    assert fs.exists(f"{folder}/model.keras") and not fs.exists(f"{folder}/{MANIFEST}")  # the objects, no manifest
    records = {info["name"].rpartition("/")[2].split("-")[0] for info in fs.ls(f"{s3_config.cache_dir}", detail=True)
               if info["type"] == "file"}
    assert records == {"download_mnist", "validate_mnist", "preprocess_mnist"}  # none for train, not even its failure
    monkeypatch.undo()

    again = mnist_pipeline(config=s3_config, until="evaluate")

    assert states(again) == {**dict.fromkeys(ALL[:3], "cached"), "train": "completed", "evaluate": "completed"}
    assert fs.exists(f"{folder}/{MANIFEST}") and fs.ls(models) == [folder]


# --- two machines: processes that share no local disk, only the bucket, the Prefect server and Redis ---------------


@pytest.fixture
def machines(tmp_path, prefect_api_url, s3_bucket):
    """Return (environment per machine, `run` arguments on the bucket's roots): separate HOME, TMPDIR, PREFECT_HOME.

    The synthetic source is an input both reach (as a URL would be); the roots exist only in the bucket.
    """
    digests = write_source(tmp_path / "source")
    run_env, args = synthetic_run(tmp_path / "source", digests, f"{s3_bucket}/team/data", f"{s3_bucket}/team/artifacts")
    envs = {}
    for name in ("a", "b"):
        for folder in ("home", "tmp", "prefect"):
            (tmp_path / name / folder).mkdir(parents=True)
        envs[name] = {
            **os.environ, "HOME": str(tmp_path / name / "home"), "TMPDIR": str(tmp_path / name / "tmp"),
            "PREFECT_HOME": str(tmp_path / name / "prefect"), "PREFECT_API_URL": prefect_api_url, **run_env,
        }
    return envs, args


def test_a_run_on_one_machine_is_all_cached_on_another(machines, tmp_path, s3_bucket):
    envs, args = machines

    first = run_cli(envs["a"], args)
    second = run_cli(envs["b"], args)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert states(json.loads(first.stdout)) == dict.fromkeys(ALL, "completed")
    assert states(json.loads(second.stdout)) == dict.fromkeys(ALL, "cached")
    # One warning line each: no lock service was given for roots that other machines share.
    assert first.stderr.count("roots on object storage without --locks") == 1
    for name in ("a", "b"):
        assert left_in(tmp_path / name / "tmp") == []


def test_two_concurrent_cold_runs_with_redis_locks_compute_each_stage_once(machines, redis_url, s3_bucket):
    envs, args = machines
    args = [*args, "--locks", redis_url]

    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=envs[name], cwd=REPO) for name in ("a", "b")]
    outs = [proc.communicate(timeout=300) for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
    a, b = (states(json.loads(out)) for out, _ in outs)
    for stage in ALL:
        assert sorted([a[stage], b[stage]]) == ["cached", "completed"], (stage, a, b)
    assert len(filesystem().ls(f"{s3_bucket}/team/artifacts/models")) == 1
    assert "without --locks" not in outs[0][1] + outs[1][1]


def test_a_killed_lock_holder_on_one_machine_lets_the_other_train_once_after_the_expiry(machines, redis_url, s3_bucket):
    import redis
    from test_reliability import KILLER

    envs, args = machines
    args = [*args, "--locks", redis_url, "--until", "train"]
    env = {**envs["a"], "MNIST_PIPELINE_LOCK_EXPIRY_S": "3"}
    client = redis.Redis.from_url(redis_url)
    before = set(client.keys())

    killed = run_cli({**env, "KILL_IN_STAGE": "train"}, args, code=KILLER)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(k for k in client.keys() if k not in before)  # the killed run's own lock and its train lock
    assert [key.split(b":lock:")[1].split(b"-")[0] for key in left] == [b"run", b"train_model"]
    other = run_cli({**envs["b"], "MNIST_PIPELINE_LOCK_EXPIRY_S": "3"}, args)

    assert other.returncode == 0, other.stderr
    assert states(json.loads(other.stdout)) == {**dict.fromkeys(ALL[:3], "cached"), "train": "completed"}
    assert len(filesystem().ls(f"{s3_bucket}/team/artifacts/models")) == 1
    assert set(client.keys()) == before


def test_a_training_killed_on_one_machine_resumes_on_another_from_the_state_kept_in_the_bucket(machines, tmp_path,
                                                                                               s3_bucket):
    import time

    envs, args = machines
    args = [*args, "--epochs", "60", "--batch-size", "8", "--until", "train"]
    kept = f"{s3_bucket}/team/artifacts/train-state"
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=envs["a"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # machine a dies once an epoch's state is in the bucket
        deadline = time.monotonic() + 300
        while not filesystem().glob(f"{kept}/*/state.json") and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before its first epoch was kept"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    (state_file,) = filesystem().glob(f"{kept}/*/state.json")
    state = json.loads(filesystem().cat_file(state_file))
    assert 1 <= state["epoch"] < 60
    # The weights it names are there, and no later ones; earlier ones are deleted as each epoch is kept.
    weights = [name for name in filesystem().ls(state_file.rpartition("/")[0]) if name.endswith(".weights.h5")]
    assert state_file.replace("state.json", state["weights"]) in weights
    assert all(name.rpartition("/")[2] <= state["weights"] for name in weights)

    other = run_cli(envs["b"], args)  # another temp folder: only the bucket holds the state

    assert other.returncode == 0, other.stderr
    assert f"resuming from epoch {state['epoch']}/60 of an interrupted training" in other.stderr
    summary = json.loads(other.stdout)
    assert states(summary) == {**dict.fromkeys(ALL[:3], "cached"), "train": "completed"}
    assert summary["stages"]["train"]["resumed_from_epoch"] == state["epoch"]
    history = json.loads(filesystem().cat_file(artifact(summary, "train", "history.json")))
    assert len(history["loss"]) == 60 and history["loss"][:state["epoch"]] == state["metrics"]["loss"]
    assert not filesystem().glob(f"{kept}/**")  # removed once the model is published
    assert left_in(tmp_path / "b" / "tmp") == []


def test_a_kept_training_state_that_this_project_did_not_write_is_refused(s3_bucket, tmp_path):
    import keras

    from flows.runner import fetch_state, keep_state
    from tasks.callbacks import EpochBackup, EpochRecorder

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    backup = EpochBackup(tmp_path / "ours", EpochRecorder(5, print, lambda *_: None))
    backup.set_model(model)
    for epoch in range(2):
        backup.on_epoch_end(epoch)
        keep_state(tmp_path / "ours", f"{s3_bucket}/kept")
    assert sorted(name.rpartition("/")[2] for name in filesystem().ls(f"{s3_bucket}/kept")) == [
        "epoch-0002.weights.h5", "state.json"]
    assert fetch_state(f"{s3_bucket}/kept", tmp_path / "fetched") is None
    assert {p.name: p.read_bytes() for p in (tmp_path / "fetched").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()}
    assert fetch_state(f"{s3_bucket}/none", tmp_path / "none") is None and not (tmp_path / "none").exists()

    state = json.loads((tmp_path / "ours" / "state.json").read_text())
    where = f"{s3_bucket}/kept/state.json"
    for content, problem in [
        (b"{not json", f"{where} is not a state file this project wrote (Expecting property name"),
        (json.dumps({**state, "weights": "../../elsewhere.weights.h5"}).encode(),
         f"{where} is not a state file this project wrote"),
        (json.dumps({**state, "metrics": {"loss": [0.0] * 300_000}}).encode(),
         f"{where}: expected a state file of at most 1,048,576 bytes, found 1,5"),
        (json.dumps({**state, "weights": "epoch-0009.weights.h5"}).encode(),
         f"{where} names epoch-0009.weights.h5, which is not there"),
    ]:
        filesystem().pipe_file(where, content)
        folder = tmp_path / f"refused-{len(content)}"
        assert fetch_state(f"{s3_bucket}/kept", folder).startswith(problem)
        assert not (folder / "state.json").exists()


def test_an_endpoint_that_does_not_answer_is_one_line_before_anything_runs(machines, s3_bucket):
    from conftest import free_port

    envs, args = machines
    down = f"http://127.0.0.1:{free_port()}"

    result = run_cli({**envs["a"], "AWS_ENDPOINT_URL": down}, args)

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"mnist-pipeline: error: data-dir {s3_bucket}/team/data: expected an S3 API answering at "
                           f"{down}, found none (Could not connect to the endpoint URL"), line


def test_a_sweep_on_dask_workers_that_share_no_disk_trains_each_distinct_trial_once(tmp_path, prefect_api_url, s3_bucket,
                                                                                      redis_url):
    from distributed import Client
    from test_sweep import DASK, start, sweep_config, worker_env

    from conftest import free_port, stop_process
    from flows.sweep import mnist_sweep

    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [start([DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rpartition(":")[2], "--no-dashboard"],
                   tmp_path / "scheduler.log", worker_env(prefect_api_url, tmp_path))]
    machines = [tmp_path / f"worker-{i}" for i in range(2)]
    for i, machine in enumerate(machines):
        for folder in ("home", "tmp"):
            (machine / folder).mkdir(parents=True)
        env = {**worker_env(prefect_api_url, machine), "HOME": str(machine / "home"), "TMPDIR": str(machine / "tmp")}
        procs.append(start([DASK, "worker", address, "--nthreads", "1", "--nworkers", "1", "--name", f"w{i}",
                            "--no-dashboard", "--host", "127.0.0.1"], machine / "worker.log", env))
    try:
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
        config = sweep_config(tmp_path, address).model_copy(update={
            "data_dir": as_root(f"{s3_bucket}/team/data"), "artifacts_dir": as_root(f"{s3_bucket}/team/artifacts"),
            "locks": redis_url})
        space = {"grid": {"hidden_units": [16, 24, 32, 32]}}

        first = mnist_sweep(space=space, config=config)
        again = mnist_sweep(space=space, config=config)
    finally:
        for proc in reversed(procs):
            stop_process(proc)

    assert [row["state"] for row in first["trials"]] == ["trained"] * 4, first["trials"]
    assert len({row["model_digest"] for row in first["trials"]}) == 3
    models = filesystem().ls(f"{s3_bucket}/team/artifacts/models")
    assert sorted(m.rpartition("/")[2] for m in models) == sorted({r["model_digest"][:16] for r in first["trials"]})
    assert champion_of(config).model_digest == first["best"]["model_digest"]
    assert first["report"].startswith(f"{s3_bucket}/team/artifacts/sweeps/")
    assert "data:image/png;base64," in filesystem().cat_file(first["report"]).decode()
    assert [row["state"] for row in again["trials"]] == ["cached"] * 4
    for machine in machines:  # each trial's inputs and outputs went through the worker's own temp folder, and left
        assert [p for p in left_in(machine / "tmp") if "/dask-scratch-space/" not in p] == []


def test_predict_scores_with_the_champion_on_s3_roots_and_caches_by_content(s3_config, temp, tmp_path):
    from flows.predict import mnist_predict
    from tasks.predict import read_table

    run = mnist_pipeline(config=s3_config)
    images = [f"{s3_config.download.source}/t10k-images-idx3-ubyte.gz"]

    first = mnist_predict(inputs=images, output=str(tmp_path / "out.csv"), config=s3_config)
    again = mnist_predict(inputs=images, model=champion_of(s3_config).model_digest[:8], config=s3_config)

    steps = ["load_inputs", "predict_classes", "write_predictions"]
    assert first["stages"] == dict.fromkeys(steps, "completed") and again["stages"] == dict.fromkeys(steps, "cached")
    assert first["predictions"].startswith(f"{s3_config.artifacts_dir}/predictions/")
    table = read_table(first["predictions"])
    assert len(table) == 50 and list(table["predicted"][:20]) == run["metrics"]["first_20_predictions"]
    assert (tmp_path / "out.csv").is_file()
    assert left_in(temp) == []
