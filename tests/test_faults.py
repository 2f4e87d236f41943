"""Faults around a run, on real servers: gc at the same time, Redis stopped mid-run, the object store stopped mid-run,
a full disk as the cache record is written. See RELIABILITY.md."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, stop_process, tree_state
from helpers import artifact, config_env, states
from tasks.keys import check_record

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def env_of(config, prefect_api_url, **extra) -> dict[str, str]:
    """The environment that runs a command with `config` against the test server."""
    locks = {"MNIST_PIPELINE_LOCKS": config.locks} if config.locks else {}
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, **config_env(config), **locks, **extra}


def start(code, args, env) -> subprocess.Popen:
    """Start `python -c CODE ARGS` (a command with a hook) in its own session."""
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until(done, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `done()`; fail with the process's output if it ended first or the time ran out."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            out, err = proc.communicate()
            pytest.fail(f"exit {proc.returncode} before the hook was reached:\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(0.05)


def untrusted_records(cache_dir: Path) -> dict[str, str | None]:
    """Return {record: why it is not to be trusted} for every record whose files are missing or changed."""
    found = {p.name: check_record(cache_dir, p.name)[1] for p in Path(cache_dir).iterdir() if p.is_file()}
    return {name: why for name, why in found.items() if why is not None}


def with_train(config, **values):
    return config.model_copy(update={"train": config.train.model_copy(update=values)})


# --- 1. gc and a run at the same time -----------------------------------------------------------------------------

# gc, paused once it has listed what it removes (after it looked at the stage locks), until FAULT_GO exists.
GC_PAUSED = """
import os, sys, time
from pathlib import Path
import flows.gc as gc
collect = gc.collect
def paused(config, planned):
    Path(os.environ["FAULT_SIGNAL"]).write_text("\\n".join(planned.folders))
    while not Path(os.environ["FAULT_GO"]).exists():
        time.sleep(0.05)
    collect(config, planned)
gc.collect = paused
from flows.cli import run
run()
"""

# A run that says (FAULT_SIGNAL) when one of its stages waits for gc.
RUN_SAYS_WHEN_WAITING = """
import os
from pathlib import Path
from tasks import locks
for manager in (locks.FlockLockManager, locks.RedisLockManager):
    def wait(self, key, timeout=None, _real=manager.wait_for_lock):
        if key == locks.GC_KEY and self.is_locked(key):
            Path(os.environ["FAULT_SIGNAL"]).touch()
        return _real(self, key, timeout)
    manager.wait_for_lock = wait
from flows.cli import run
run()
"""


@pytest.mark.parametrize("locks", ["flock", "redis"])
def test_a_run_started_while_gc_removes_waits_and_records_nothing_that_gc_removes(synthetic_config, prefect_api_url,
                                                                                   tmp_path, locks, request):
    from flows.pipeline import mnist_pipeline

    config = synthetic_config
    if locks == "redis":
        config = config.model_copy(update={"locks": request.getfixturevalue("redis_url")})
    other = with_train(config, epochs=3)
    mnist_pipeline(config=config, until="train")
    model = artifact(mnist_pipeline(config=other, until="train"), "train", "model.keras").parent
    # The other configuration's model stays published, its record gone: gc lists the folder, and a run of that
    # configuration trains again (seeded) into the same folder: the case where a run records what gc removes.
    (record,) = [p for p in config.cache_dir.iterdir() if p.is_file() and str(model) in p.read_text()]
    record.unlink()
    gc_listed, run_waits, go = tmp_path / "gc-listed", tmp_path / "run-waits", tmp_path / "go"

    gc = start(GC_PAUSED, ["gc", "--yes", "--json"], env_of(config, prefect_api_url, FAULT_SIGNAL=str(gc_listed),
                                                             FAULT_GO=str(go)))
    try:
        wait_until(gc_listed.exists, gc, timeout=120)
        assert str(model) in gc_listed.read_text().splitlines()
        run = start(RUN_SAYS_WHEN_WAITING, ["run", "--json", "--until", "train"],
                    env_of(other, prefect_api_url, FAULT_SIGNAL=str(run_waits)))
        try:
            # Until the run has finished (without the exclusion) or waits for gc (with it); then gc removes.
            deadline = time.monotonic() + 300
            while run.poll() is None and not run_waits.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            go.touch()
            gc_out, gc_err = gc.communicate(timeout=120)
            run_out, run_err = run.communicate(timeout=300)
        finally:
            stop_process(run)
    finally:
        stop_process(gc)

    assert gc.returncode == 0, gc_err[-3000:]
    assert str(model) in json.loads(gc_out)["folders"]
    assert run.returncode == 0, run_err[-3000:]
    summary = json.loads(run_out)
    # Trained after gc removed the folder: published again (the earlier stages are cached, unless someone edited
    # their code in the meantime), recorded, and still there.
    assert states(summary)["train"] == "completed"
    assert artifact(summary, "train", "model.keras").is_file()
    assert untrusted_records(config.cache_dir) == {}
    assert run_waits.exists()  # one of its stages took its lock while gc held gc's, and waited


@pytest.mark.parametrize("locks", ["flock", "redis"])
def test_gc_of_another_configuration_between_two_stages_of_a_run_removes_nothing(synthetic_config, prefect_api_url,
                                                                                  tmp_path, locks, request):
    from tasks.storage import lock_dir

    config = synthetic_config
    if locks == "redis":
        config = config.model_copy(update={"locks": request.getfixturevalue("redis_url")})
    other = with_train(config, epochs=3)
    # Paused after train recorded its model, before evaluate's key (see PAUSED): no stage lock is held then, and only
    # the run's own lock keeps gc from removing the model (which `config` does not use) before evaluate reads it.
    run, go = paused_run(env_of(other, prefect_api_url), tmp_path, "key:evaluate_model", "--until", "evaluate")
    try:
        before = tree_state(config.data_dir, config.artifacts_dir)
        held = subprocess.run([sys.executable, "-m", "flows.cli", "gc", "--yes", "--json"], capture_output=True,
                              text=True, env=env_of(config, prefect_api_url), cwd=REPO, timeout=120)
        untouched = tree_state(config.data_dir, config.artifacts_dir) == before
    finally:
        run_out, run_err = resume(run, go)

    assert held.returncode == 1, held.stderr[-3000:]
    refused = json.loads(held.stdout)
    assert (refused["folders"], refused["records"]) == ({}, [])
    assert [key[:4] for key in refused["locks_held"]] == ["run-"]
    assert untouched
    assert run.returncode == 0, run_err[-3000:]
    summary = json.loads(run_out)
    assert states(summary) == dict.fromkeys(["download", "validate", "preprocess", "train", "evaluate"], "completed")
    assert untrusted_records(config.cache_dir) == {}
    if locks == "flock":  # a run's lock file goes with its run
        assert not list(lock_dir(config.cache_dir).glob("run-*"))


def test_a_second_gc_at_work_on_the_same_roots_is_one_line_and_removes_nothing(synthetic_config):
    from flows import gc
    from tasks.errors import PipelineError

    with gc.excluding_runs(synthetic_config), pytest.raises(PipelineError, match=(
            r"^gc of .*/artifacts: expected no other gc at work there, found its lock 'gc' held: nothing removed; run "
            r"gc again when it has finished$")), gc.excluding_runs(synthetic_config):
        pass
    with gc.excluding_runs(synthetic_config):  # released: the next gc goes ahead
        pass


# --- 2. Redis stopped in the middle of a run ------------------------------------------------------------------------

# A run that pauses (says so in FAULT_SIGNAL, goes on once FAULT_GO exists) at FAULT_AT: `publish:STAGE`, inside the
# stage with its lock held, its output written but not published; or `key:TASK`, between two stages, before that
# task's cache key (and lock).
PAUSED = """
import os, time
from pathlib import Path
import tasks.artifacts as artifacts  # patched before the stage modules import its `publish`
where, name = os.environ["FAULT_AT"].split(":")
def pause():
    Path(os.environ["FAULT_SIGNAL"]).touch()
    while not Path(os.environ["FAULT_GO"]).exists():
        time.sleep(0.05)
if where == "publish":
    publish = artifacts.publish
    def paused(stage, *args, **kwargs):
        if stage == name:
            pause()
        return publish(stage, *args, **kwargs)
    artifacts.publish = paused
else:
    import flows.runner as runner
    compute_key = runner.StageCache.compute_key
    def paused(self, task_ctx, *args, **kwargs):
        if task_ctx.task.name == name:
            pause()
        return compute_key(self, task_ctx, *args, **kwargs)
    runner.StageCache.compute_key = paused
from flows.cli import run
run()
"""


def redis_server(port: int, log: Path) -> subprocess.Popen:
    """Start a redis-server of this test's own on `port` (no persistence: a restart starts empty)."""
    import redis

    with open(log, "ab") as out:
        proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a server the test started, by its PID, and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def paused_run(env, tmp_path, at, *args) -> tuple[subprocess.Popen, Path]:
    """Start `run --json ARGS` paused at `at` (see PAUSED); return it, once paused, and the file that resumes it."""
    paused, go = tmp_path / f"paused-{at}", tmp_path / f"go-{at}"
    run = start(PAUSED, ["run", "--json", *args], {**env, "FAULT_AT": at, "FAULT_SIGNAL": str(paused),
                                                    "FAULT_GO": str(go)})
    wait_until(paused.exists, run)
    return run, go


def resume(run: subprocess.Popen, go: Path) -> tuple[str, str]:
    go.touch()
    try:
        return run.communicate(timeout=300)
    finally:
        stop_process(run)


def records(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(cache_dir).iterdir() if p.is_file()}


@pytest.mark.parametrize("at", ["publish:preprocess", "key:train_model"])
def test_redis_stopped_mid_run_fails_it_with_one_line_and_the_next_run_recovers(synthetic_config, prefect_api_url,
                                                                                tmp_path, at):
    import redis

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = redis_server(port, tmp_path / "redis.log")
    config = synthetic_config.model_copy(update={"locks": url})
    env = env_of(config, prefect_api_url)
    try:
        run, go = paused_run(env, tmp_path, at, "--until", "train")
        kill(server)  # inside preprocess (its lock held) or before train's cache key; it stays down
        _, err = resume(run, go)

        assert run.returncode == 1, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            f"mnist-pipeline: error: locks {url}: expected a Redis server answering there, found none ("), err[-3000:]
        assert "Traceback" not in err, err
        stopped = "preprocess_mnist" if at.startswith("publish") else "train_model"
        assert not [name for name in records(config.cache_dir) if name.startswith(stopped)]  # nothing recorded unlocked
        assert list(config.artifacts_dir.glob("models/*")) == []  # and no stage ran after the server went

        server = redis_server(port, tmp_path / "redis.log")  # back, empty
        again = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--json", "--until", "train"], env=env,
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert states(json.loads(again.stdout))[stopped.split("_")[0]] == "completed"
        assert untrusted_records(config.cache_dir) == {}
        assert redis.Redis(port=port).keys() == []  # every lock released
    finally:
        stop_process(server)


def test_a_run_whose_redis_restarted_empty_mid_stage_records_nothing_over_the_next_holder(synthetic_config,
                                                                                      prefect_api_url, tmp_path):
    port = free_port()
    server = redis_server(port, tmp_path / "redis.log")
    config = synthetic_config.model_copy(update={"locks": f"redis://127.0.0.1:{port}/0"})
    env = env_of(config, prefect_api_url)
    try:
        first, go = paused_run(env, tmp_path, "publish:train", "--until", "train")  # it holds the train lock
        kill(server)
        server = redis_server(port, tmp_path / "redis.log")  # back, empty: the train lock is free
        other = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--json", "--until", "train"], env=env,
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert other.returncode == 0, other.stderr[-3000:]
        assert states(json.loads(other.stdout))["train"] == "completed"  # it took the lock and recorded
        recorded = records(config.cache_dir)

        _, err = resume(first, go)

        # The first run finished its stage but recorded nothing: its lock was no longer its own.
        assert first.returncode == 0, err[-3000:]
        assert "expired before it was renewed" in err and "locked by another holder" in err, err[-3000:]
        assert records(config.cache_dir) == recorded
        assert untrusted_records(config.cache_dir) == {}
    finally:
        stop_process(server)


# --- 3. the object store stopped in the middle of a no-op rerun ------------------------------------------------------


def moto_server(port: int, tmp_path: Path) -> subprocess.Popen:
    """Start an S3 API server of this test's own (moto) on `port` that records every request in a file, so that a
    new server there can replay them: moto keeps its objects in memory, this is its way to keep them across a restart."""
    import urllib.request

    env = {**os.environ, "MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(tmp_path / "moto-requests")}
    with open(tmp_path / "moto.log", "ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=5).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
            time.sleep(0.1)


def replay(port: int) -> None:
    """Have a restarted server replay the requests recorded by the one before: its objects are back."""
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/recorder/replay-recording", method="POST")
    urllib.request.urlopen(request, timeout=300).close()


def bucket_objects(fs, bucket: str) -> dict[str, tuple[str, int]]:
    """Return {key: (ETag, size)} of every object in a bucket."""
    return {key: (info["ETag"], info["size"]) for key, info in fs.find(bucket, detail=True).items()}


def left_in(temp: Path) -> list[str]:
    """The files under a machine's temp folder, except the flock stage locks (its run-time state)."""
    return sorted(str(p) for p in temp.rglob("*") if p.is_file() and "mnist-pipeline-locks" not in p.parts)


def test_the_object_store_stopped_mid_no_op_rerun_fails_it_with_one_line_and_damages_nothing(prefect_api_url,
                                                                                             tmp_path):
    import s3fs

    from conftest import S3_ENV
    from helpers import synthetic_run
    from synthetic import write_source

    port, bucket = free_port(), "s3://faults"
    server = moto_server(port, tmp_path)
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True, use_listings_cache=False,
                           client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
    try:
        fs.call_s3("create_bucket", Bucket=bucket.removeprefix("s3://"))
        run_env, args = synthetic_run(tmp_path / "source", write_source(tmp_path / "source"), f"{bucket}/team/data",
                                      f"{bucket}/team/artifacts")
        (tmp_path / "tmp").mkdir()
        env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "TMPDIR": str(tmp_path / "tmp"),
               "PREFECT_API_URL": prefect_api_url, **run_env}
        command = [sys.executable, "-m", "flows.cli", *args, "--until", "train"]
        cold = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert cold.returncode == 0, cold.stderr[-3000:]
        stored = bucket_objects(fs, bucket)

        # A no-op rerun: download's record checked, then the store stops before validate's.
        run, go = paused_run(env, tmp_path, "key:validate_mnist", *args[1:], "--until", "train")
        kill(server)
        _, err = resume(run, go)

        assert run.returncode == 1, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            f"mnist-pipeline: error: object storage at {endpoint}: Could not connect to the endpoint URL: "), err[-3000:]
        assert err.strip().splitlines()[-1].endswith("(after retries); nothing half-written is trusted: run again "
                                                     "when it answers"), err[-3000:]
        assert "Traceback" not in err, err
        assert "Error encountered when computing cache key" not in err, err  # no stage ran uncached and unlocked
        assert left_in(tmp_path / "tmp") == []

        server = moto_server(port, tmp_path)
        replay(port)
        assert bucket_objects(fs, bucket) == stored  # what the store held, and nothing more: nothing was written

        again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert states(json.loads(again.stdout)) == dict.fromkeys(("download", "validate", "preprocess", "train"),
                                                                 "cached")
        assert bucket_objects(fs, bucket) == stored
    finally:
        stop_process(server)


# --- 4. a full disk as Prefect writes a cache record -----------------------------------------------------------------


@pytest.fixture
def full_cache_disk(synthetic_config):
    """The configuration's cache folder on a 64 KB tmpfs filled to the last byte (root only, skipped otherwise); yield
    the filler file that takes the room."""
    cache = synthetic_config.cache_dir
    cache.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    filler = cache / ".filler"
    try:
        with open(filler, "wb") as out:
            while True:
                out.write(bytes(4096))
                out.flush()
    except OSError:
        pass
    yield filler
    subprocess.run(["umount", str(cache)], check=True)


def test_a_full_disk_as_the_cache_record_is_written_fails_the_run_with_one_line_and_the_next_run_records_it(
        synthetic_config, prefect_api_url, full_cache_disk):
    config = synthetic_config
    command = [sys.executable, "-m", "flows.cli", "run", "--json", "--until", "validate"]
    env = env_of(config, prefect_api_url)

    full = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    # Download ran and published its files; Prefect could not write its record (it logs that and goes on).
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.strip().splitlines()[-1] == (
        f"mnist-pipeline: error: {config.cache_dir}: disk space: expected room for the cache records, found the disk "
        "full (No space left on device); the stage's output is published, and the next run with room records it")
    assert "Traceback" not in full.stderr, full.stderr
    assert "No space left on device" in full.stderr.split("An error was encountered while committing transaction")[1]
    assert records(config.cache_dir) == {".filler": full_cache_disk.read_bytes()}  # no record, whole or half
    (raw,) = (config.data_dir / "raw").iterdir()
    published = tree_state(raw)

    full_cache_disk.unlink()
    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stderr[-3000:]
    assert states(json.loads(again.stdout)) == {"download": "completed", "validate": "completed"}
    assert tree_state(raw) == published and list((config.data_dir / "raw").iterdir()) == [raw]  # kept as it was
    assert untrusted_records(config.cache_dir) == {} and len(records(config.cache_dir)) == 2
