"""Stage locks in Redis (a real redis-server on 127.0.0.1): expiry renewed while the holder lives, released within the
expiry when it dies, no result recorded by a holder that lost its lock; Redis down or misnamed: one line."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from conftest import free_port
from tasks.errors import PipelineError
from tasks.locks import RedisLockManager

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import json, sys
from tasks.locks import RedisLockManager
m = RedisLockManager(sys.argv[1], namespace=sys.argv[2], expiry_s=float(sys.argv[3]))
assert m.acquire_lock("k", "them")
print("held", flush=True)
sys.stdin.readline()
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
store = ResultStore(lock_manager=m, result_storage=LocalFileSystem(basepath=sys.argv[4]))
try:
    store.write(key="k", obj="their result", holder="them")
    wrote = True
except RuntimeError:
    wrote = False
still = m.is_lock_holder("k", "them")
m.release_lock("k", "them")
print(json.dumps({"holder": still, "wrote": wrote}), flush=True)
sys.stdin.readline()
"""


def holder(redis_url: str, namespace: str, expiry_s: float, records: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url, namespace, str(expiry_s), str(records)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def lock_keys(redis_url: str, namespace: str) -> dict[str, int]:
    client = redis.Redis.from_url(redis_url)
    return {k.decode(): client.pttl(k) for k in client.keys(f"mnist-pipeline:{namespace}:lock:*")}


def test_a_held_lock_is_renewed_past_its_expiry_and_excludes_others_until_released(redis_url, tmp_path):
    ours = RedisLockManager(redis_url, namespace=tmp_path.name, expiry_s=0.6)
    theirs = RedisLockManager(redis_url, namespace=tmp_path.name, expiry_s=0.6)

    assert ours.acquire_lock("k", "us")
    time.sleep(2.0)  # more than three expiries: only the renewal keeps it

    assert ours.is_lock_holder("k", "us") and not ours.is_lock_holder("k", "them")
    assert 0 < lock_keys(redis_url, tmp_path.name)[f"mnist-pipeline:{tmp_path.name}:lock:k"] <= 600
    assert theirs.is_locked("k") and not theirs.acquire_lock("k", "them", acquire_timeout=0.3)
    ours.release_lock("k", "us")
    assert not theirs.is_locked("k") and lock_keys(redis_url, tmp_path.name) == {}
    assert theirs.acquire_lock("k", "them", acquire_timeout=1)
    with pytest.raises(ValueError):
        ours.release_lock("k", "us")  # not ours
    theirs.release_lock("k", "them")


def test_the_lock_of_a_killed_holder_expires_within_the_expiry(redis_url, tmp_path):
    proc = holder(redis_url, tmp_path.name, 1.5, tmp_path)
    ours = RedisLockManager(redis_url, namespace=tmp_path.name, expiry_s=1.5)
    assert not ours.acquire_lock("k", "us", acquire_timeout=2.0)  # alive: renewed past its expiry

    proc.kill()
    proc.wait(timeout=30)
    killed = time.monotonic()
    assert ours.is_locked("k")  # nobody deletes it: it expires
    assert ours.acquire_lock("k", "us", acquire_timeout=10)
    assert time.monotonic() - killed <= 1.5 + 0.5
    ours.release_lock("k", "us")


def test_a_paused_holder_that_lost_its_lock_does_not_record_over_the_next_holder(redis_url, tmp_path):
    proc = holder(redis_url, tmp_path.name, 1.0, tmp_path)
    ours = RedisLockManager(redis_url, namespace=tmp_path.name, expiry_s=1.0)
    os.kill(proc.pid, signal.SIGSTOP)  # stopped: it cannot renew
    try:
        assert ours.acquire_lock("k", "us", acquire_timeout=10)
    finally:
        os.kill(proc.pid, signal.SIGCONT)

    proc.stdin.write("go\n")
    proc.stdin.flush()
    seen = json.loads(proc.stdout.readline())

    # Prefect's result store asked our lock manager and refused to write under a lock that is not its holder's.
    assert seen == {"holder": False, "wrote": False}
    assert not (tmp_path / "k").exists()
    assert ours.is_lock_holder("k", "us")  # its release took nothing from us
    time.sleep(1.0)  # its renewal thread (or, if that did not wake first, its release) found the lock gone
    _, err = proc.communicate("done\n", timeout=30)
    assert "stage lock k expired before it was renewed" in err, err
    ours.release_lock("k", "us")


def test_a_lock_manager_travels_by_pickle_without_its_locks_or_connections(redis_url, tmp_path):
    ours = RedisLockManager(redis_url, namespace=tmp_path.name, expiry_s=5)
    assert ours.acquire_lock("k", "us")
    copy = pickle.loads(pickle.dumps(ours))

    assert (copy.url, copy.namespace, copy.expiry_s) == (redis_url, tmp_path.name, 5)
    assert copy.is_locked("k") and not copy.is_lock_holder("k", "us")  # held by another process's manager
    ours.release_lock("k", "us")
    assert not copy.is_locked("k")


def test_redis_that_does_not_answer_is_one_line(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        RedisLockManager(url, namespace="x").check()
    assert time.monotonic() - started < 5
    assert str(error.value).startswith(f"locks {url}: expected a Redis server answering there, found none (")
    assert "\n" not in str(error.value)


def test_cli_with_redis_down_or_a_wrong_url_exits_1_with_one_line_before_any_stage(tmp_path, prefect_api_url):
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    roots = ["--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts")]
    for locks, line in ((url, f"mnist-pipeline: error: locks {url}: expected a Redis server answering there, found none ("),
                        ("http://127.0.0.1:1/", "mnist-pipeline: error: invalid configuration: locks: expected a Redis URL")):
        result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--locks", locks, *roots], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr[-2000:]
        assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("flow", ["pipeline", "sweep", "predict"])
def test_a_flow_with_redis_down_fails_before_any_stage(synthetic_config, prefect_api_url, flow):
    from flows.pipeline import mnist_pipeline
    from flows.predict import mnist_predict
    from flows.sweep import mnist_sweep

    url = f"redis://127.0.0.1:{free_port()}/0"
    config = synthetic_config.model_copy(update={"locks": url})
    run = {"pipeline": lambda: mnist_pipeline(config=config),
           "sweep": lambda: mnist_sweep(space={"grid": {"hidden_units": [8]}}, config=config),
           "predict": lambda: mnist_predict(inputs=[str(config.data_dir)], config=config)}[flow]
    with pytest.raises(PipelineError, match=f"^locks {url}: expected a Redis server answering there"):
        run()
    assert not config.data_dir.exists() and not config.artifacts_dir.exists()
