"""Fault injection: hostile input, damaged artifacts and cache records, crashes mid-stage. See RELIABILITY.md."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from conftest import tree_state
from helpers import artifact, run_cli, states, synthetic_run
from synthetic import make_split, write_source
from tasks.download import FILES, download_files
from tasks.errors import PipelineError
from tasks.files import pid_alive, remove_stale_workdirs
from tasks.idx import MAX_PAYLOAD_BYTES, Checks, check_images, decode_payload

REPO = Path(__file__).resolve().parents[1]


def result_store(cache_dir: Path):
    """Prefect's own reader of the stage results under `cache_dir` (JSON records): what several cases here attack."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    return ResultStore(result_storage=LocalFileSystem(basepath=str(cache_dir)), serializer=JSONSerializer())


def scratch(*roots: Path) -> list[Path]:
    """Every temporary or trash folder under the roots."""
    return [p for root in roots if Path(root).exists() for p in Path(root).rglob(".*") if p.name.startswith((".tmp-", ".trash-"))]


def peak_bytes(fn) -> tuple[int, BaseException | None]:
    """Run `fn`; return the peak of Python-traced allocations during it and the exception it raised, if any."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as exc:  # noqa: BLE001 (returned to the test)
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


# --- 1. hostile input (pure functions) ----------------------------------------------------------------------------


def test_idx_header_claiming_2_31_images_fails_fast_without_allocating_them():
    images, _ = make_split(2, 0)
    lying = bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes()
    checks = Checks()

    started = time.perf_counter()
    peak, error = peak_bytes(lambda: check_images(lying, "train-images-idx3-ubyte.gz", checks))

    assert error is None and time.perf_counter() - started < 1
    assert peak < 1 << 20  # the header claims 1.7 TB
    with pytest.raises(PipelineError, match=r"train-images-idx3-ubyte.gz: payload size: expected 1683627180032 bytes "
                                            r"for shape \(2147483648, 28, 28\), found 1568 bytes"):
        checks.raise_first()


def gzip_bomb(expanded_mib: int) -> bytes:
    """Return a ~1 MB gzip of `expanded_mib` MiB of zeros, built without holding the expansion in memory."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join(deflate.compress(chunk) for _ in range(expanded_mib)) + deflate.flush()


def test_gzip_bomb_is_cut_off_at_the_payload_limit():
    bomb = gzip_bomb(1024)  # 1 GiB expanded, 16x the largest MNIST payload

    peak, error = peak_bytes(lambda: decode_payload(bomb, "train-images-idx3-ubyte.gz"))

    assert isinstance(error, PipelineError)
    assert str(error) == f"train-images-idx3-ubyte.gz: size: expected a payload of at most {MAX_PAYLOAD_BYTES} bytes, found more"
    # Decompression stops one byte past the limit: about 2 x 64 MiB (buffer + copy), never the 1 GiB the bomb holds.
    assert peak < 3 * MAX_PAYLOAD_BYTES


def test_gzip_bomb_with_a_small_limit_allocates_little():
    peak, error = peak_bytes(lambda: decode_payload(gzip_bomb(64), "x.gz", limit=1 << 20))
    assert isinstance(error, PipelineError) and "at most 1048576 bytes" in str(error)
    assert peak < 4 << 20


def test_gzip_bomb_in_a_source_folder_fails_and_writes_nothing(tmp_path):
    source = tmp_path / "src"
    write_source(source)
    (source / "train-images-idx3-ubyte.gz").write_bytes(gzip_bomb(256))

    with pytest.raises(PipelineError, match=r"^train-images-idx3-ubyte.gz: size: expected a payload of at most"):
        download_files(str(source), tmp_path / "raw", expected_sha256=None)

    assert not (tmp_path / "raw").exists()


def test_symlink_out_of_the_source_folder_is_refused_naming_the_file(tmp_path):
    source = tmp_path / "src"
    write_source(source)
    outside = tmp_path / "elsewhere" / "secret.gz"
    outside.parent.mkdir()
    # A valid file, so only the location check can stop it.
    outside.write_bytes((source / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    (source / "t10k-labels-idx1-ubyte.gz").symlink_to(outside)

    with pytest.raises(PipelineError) as info:
        download_files(str(source), tmp_path / "raw", expected_sha256=None)

    message = str(info.value)
    assert "\n" not in message
    assert message == (f"{source / 't10k-labels-idx1-ubyte.gz'}: location: expected a file inside the source folder "
                       f"{source}, found a link to {outside}")
    assert not (tmp_path / "raw").exists()


def test_symlink_inside_the_source_folder_is_followed(tmp_path):
    source = tmp_path / "src"
    write_source(source)
    (source / "labels.gz").write_bytes((source / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    (source / "t10k-labels-idx1-ubyte.gz").symlink_to("labels.gz")

    assert download_files(str(source), tmp_path / "raw", expected_sha256=None).problem() is None


@pytest.mark.parametrize("source", ["ftp://example.org/mnist/", "gs://bucket/mnist/", "gopher://example.org/", "sftp://host/x"])
def test_url_scheme_other_than_http_https_file_s3_is_refused(tmp_path, source):
    with pytest.raises(PipelineError, match=r"expected auto, an http://, https://, file:// or s3:// URL, a folder or an .npz file, found scheme"):
        download_files(source, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_extra_files_in_a_source_folder_are_ignored(tmp_path):
    source = tmp_path / "src"
    digests = write_source(source)
    (source / "README").write_text("not MNIST")
    (source / "train-images-idx3-ubyte.gz.part").write_bytes(b"\x1f\x8b partial")
    (source / "nested").mkdir()
    (source / "nested" / "train-images-idx3-ubyte.gz").write_bytes(b"junk")

    ref = download_files(str(source), tmp_path / "raw", expected_sha256=digests)

    assert sorted(ref.files) == sorted(f"{name}.gz" for name in FILES)
    assert ref.problem() is None


def test_missing_file_in_a_source_folder_is_named_and_nothing_is_written(tmp_path):
    source = tmp_path / "src"
    write_source(source)
    (source / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(PipelineError, match=r"^source .*: missing file: expected t10k-labels-idx1-ubyte.gz "
                                            r"\(or t10k-labels-idx1-ubyte\), found neither$"):
        download_files(str(source), tmp_path / "raw", expected_sha256=None)

    assert not (tmp_path / "raw").exists()


# --- 2. corrupt or missing artifacts and cache records, through the real flow ------------------------------------


@pytest.fixture
def flow_run(prefect_api_url, caplog):
    """Run the flow and return (summary, warnings logged by its task runs)."""
    from flows.pipeline import mnist_pipeline

    def run(config, until):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prefect"):
            summary = mnist_pipeline(config=config, until=until)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("prefect")]
        return summary, warnings

    return run


def record(config, task_name) -> Path:
    (path,) = config.cache_dir.glob(f"{task_name}-*")
    return path


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_parquet_are_detected_and_preprocess_recomputed(synthetic_config, flow_run):
    first, _ = flow_run(synthetic_config, "preprocess")
    parquet = artifact(first, "preprocess", "train.parquet")
    good = parquet.read_bytes()
    flip(parquet)

    summary, warnings = flow_run(synthetic_config, "preprocess")

    assert states(summary) == {"download": "cached", "validate": "cached", "preprocess": "completed"}
    assert parquet.read_bytes() == good
    assert warnings == [f"Cached result of preprocess_mnist not trusted: {parquet}: content digest differs from the "
                        "recorded one; recomputing"]


def test_deleted_raw_file_is_detected_and_download_recomputed(synthetic_config, flow_run):
    first, _ = flow_run(synthetic_config, "preprocess")
    raw = artifact(first, "download", "t10k-images-idx3-ubyte.gz")
    good = raw.read_bytes()
    raw.unlink()

    summary, warnings = flow_run(synthetic_config, "preprocess")

    # Same payloads, same digest: the rest stays cached (early cutoff).
    assert states(summary) == {"download": "completed", "validate": "cached", "preprocess": "cached"}
    assert raw.read_bytes() == good
    assert warnings == [f"Cached result of download_mnist not trusted: {raw}: missing; recomputing"]


def test_truncated_model_is_detected_and_train_recomputed(synthetic_config, flow_run):
    first, _ = flow_run(synthetic_config, "train")
    model = artifact(first, "train", "model.keras")
    size = model.stat().st_size
    model.chmod(0o644)
    with open(model, "r+b") as fh:
        fh.truncate(size // 2)

    summary, warnings = flow_run(synthetic_config, "train")

    assert states(summary) == {"download": "cached", "validate": "cached", "preprocess": "cached", "train": "completed"}
    assert model.stat().st_size == size  # seeded: same weights, same folder, whole file again
    assert warnings == [f"Cached result of train_model not trusted: {model}: size {size // 2}, expected {size}; recomputing"]


def hostile_record(tmp_path, case) -> bytes:
    """A result record that would run `touch <tmp_path>/pwned` if Prefect's decoder (or pickle) were let at it."""
    from prefect.serializers import JSONSerializer, PickleSerializer

    run = {"__class__": "subprocess.getoutput", "data": [f"touch {tmp_path / 'pwned'}"]}
    json_meta = {"serializer": JSONSerializer().model_dump(mode="json")}
    if case == "calls-a-function":
        return json.dumps({"metadata": json_meta, "result": json.dumps(run)}).encode()
    if case == "nested-call":
        ref = {"stage": "validate", "digest": "0" * 64, "files": {}, "meta": {"note": run}}
        return json.dumps({"metadata": json_meta, "result": json.dumps({"__class__": "tasks.artifacts.ArtifactRef", "data": ref})}).encode()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    pickled = PickleSerializer(picklelib="pickle").dumps(Payload())
    meta = {"serializer": PickleSerializer(picklelib="pickle").model_dump(mode="json")}
    return json.dumps({"metadata": meta, "result": pickled.decode()}).encode()


GARBAGE = {
    "broken": lambda _: b"{not json",
    "empty": lambda _: b"",
    "no-result": lambda _: json.dumps({"metadata": {"serializer": {"type": "json"}}, "result": "null"}).encode(),
    "calls-a-function": lambda tmp_path: hostile_record(tmp_path, "calls-a-function"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_or_hostile_cache_record_is_discarded_never_decoded(synthetic_config, flow_run, case, tmp_path):
    flow_run(synthetic_config, "preprocess")
    bad = record(synthetic_config, "validate_mnist")
    bad.write_bytes(GARBAGE[case](tmp_path))

    summary, warnings = flow_run(synthetic_config, "preprocess")

    assert states(summary) == {"download": "cached", "validate": "completed", "preprocess": "cached"}
    assert len(warnings) == 1
    assert warnings[0].startswith(f"Cached result of validate_mnist not trusted: unreadable cache record {bad} (")
    assert not (tmp_path / "pwned").exists()
    assert result_store(synthetic_config.cache_dir).read(bad.name).result.problem() is None


@pytest.mark.parametrize("case", ["calls-a-function", "nested-call", "pickle"])
def test_hostile_cache_record_is_refused_without_running_it(tmp_path, case):
    from tasks.keys import read_record

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "validate_mnist-x").write_bytes(hostile_record(tmp_path, case))

    with pytest.raises(ValueError, match="^expected "):
        read_record(cache / "validate_mnist-x")
    assert not (tmp_path / "pwned").exists()
    # The same record read by Prefect runs the command: the reason records are checked as plain JSON first.
    try:
        result_store(cache).read("validate_mnist-x")
    except Exception:  # noqa: BLE001 (it may fail after running the command)
        pass
    assert (tmp_path / "pwned").exists()


def test_cache_record_pointing_at_nothing_is_discarded_and_the_stage_recomputed(synthetic_config, flow_run):
    first, _ = flow_run(synthetic_config, "preprocess")
    report = artifact(first, "validate", "")  # the validation report
    import shutil

    shutil.rmtree(report.parent)

    summary, warnings = flow_run(synthetic_config, "preprocess")

    assert states(summary) == {"download": "cached", "validate": "completed", "preprocess": "cached"}
    assert warnings == [f"Cached result of validate_mnist not trusted: {report}: missing; recomputing"]
    assert report.is_file()


# --- 3. crash mid-stage: SIGKILL, then rerun ---------------------------------------------------------------------

# Runs the real CLI, but SIGKILLs the process inside stage $KILL_IN_STAGE, when its work folder is written but not yet
# published, with its last file cut in half as if the kill came while writing it: the worst moment to die.
KILLER = """
import os, signal
import tasks.artifacts as artifacts
stage, real = os.environ["KILL_IN_STAGE"], artifacts.publish
def publish(name, work, *args, **kwargs):
    if name == stage:
        last = sorted(p for p in work.iterdir() if p.is_file())[-1]
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(name, work, *args, **kwargs)
artifacts.publish = publish
from flows.cli import run
run()
"""


@pytest.fixture
def cli_env(tmp_path, prefect_api_url):
    """Environment and arguments for `mnist-pipeline run` on a synthetic source with tiny training."""
    digests = write_source(tmp_path / "source")
    env, args = synthetic_run(tmp_path / "source", digests, tmp_path / "data", tmp_path / "artifacts")
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, **env}, args


def records(cache_dir: Path) -> set[str]:
    return {p.name.split("-")[0] for p in cache_dir.iterdir() if p.is_file()} if cache_dir.exists() else set()


def test_sigkill_inside_download_preprocess_and_train_then_the_next_run_completes(tmp_path, cli_env):
    env, args = cli_env
    data, artifacts = tmp_path / "data", tmp_path / "artifacts"
    parents = {"download": data / "raw", "preprocess": data / "processed", "train": artifacts / "models"}
    finished_before = {"download": set(), "preprocess": {"download_mnist", "validate_mnist"},
                       "train": {"download_mnist", "validate_mnist", "preprocess_mnist"}}

    for stage in ("download", "preprocess", "train"):
        killed = run_cli({**env, "KILL_IN_STAGE": stage}, [*args, "--until", "train"], code=KILLER)

        assert killed.returncode == -signal.SIGKILL, killed.stderr
        # The kill left a work folder with a half-written file, and no cache record for the stage it hit.
        (left,) = scratch(data, artifacts)
        assert left.parent == parents[stage] and left.name.startswith(".tmp-")
        assert left.name.startswith(f".tmp-{socket.gethostname()}-")
        assert not pid_alive(int(left.name.rsplit("-", 2)[1]))
        assert records(artifacts / "cache") == finished_before[stage]

    final = run_cli(env, [*args, "--until", "train"])

    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert states(summary) == {"download": "cached", "validate": "cached", "preprocess": "cached", "train": "completed"}
    assert scratch(data, artifacts) == []
    # Every recorded result points at whole files with the recorded digests: nothing half-written is served.
    store = result_store(artifacts / "cache")
    for path in (artifacts / "cache").iterdir():
        if path.is_file():
            assert store.read(path.name).result.problem() is None


def test_stale_scratch_of_dead_processes_is_removed_and_that_of_live_ones_or_other_hosts_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid, host = int(dead.stdout), os.getpid(), socket.gethostname()
    ours_dead = [f".tmp-{host}-{dead_pid}-0123abcd", f".trash-{host}-{dead_pid}-89abcdef", f".tmp-{dead_pid}-0123abcd"]
    kept = [f".tmp-{host}-{live_pid}-0123abcd", f".trash-{live_pid}-89abcdef",
            f".tmp-other-host-{dead_pid}-0123abcd",  # another machine's, on shared roots: its pids are not ours to check
            "0123456789abcdef", ".tmp-notapid"]
    for name in ours_dead + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_bytes(b"x")

    removed = remove_stale_workdirs(tmp_path)

    assert sorted(p.name for p in removed) == sorted(ours_dead)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


# --- 4. concurrent runs on the same roots ------------------------------------------------------------------------


@pytest.mark.parametrize("locks", ["flock", "redis"])
def test_two_runs_started_at_once_both_complete_and_do_each_stage_once(tmp_path, cli_env, locks, request):
    env, args = cli_env
    if locks == "redis":
        args = [*args, "--locks", request.getfixturevalue("redis_url")]
    command = [sys.executable, "-m", "flows.cli", *args, "--until", "train"]
    runs = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    summaries = [json.loads(out) for out, _ in outputs]
    for stage in ("download", "validate", "preprocess", "train"):
        # One run did the work, the other waited for it and took the result.
        assert sorted(s["stages"][stage]["state"] for s in summaries) == ["cached", "completed"], stage
        assert summaries[0]["stages"][stage]["artifacts"] == summaries[1]["stages"][stage]["artifacts"]
    assert scratch(tmp_path / "data", tmp_path / "artifacts") == []
    store = result_store(tmp_path / "artifacts" / "cache")
    for path in (tmp_path / "artifacts" / "cache").iterdir():
        if path.is_file():
            assert store.read(path.name).result.problem() is None


def test_the_redis_lock_of_a_run_killed_in_train_expires_and_the_next_run_trains_once(tmp_path, cli_env, redis_url):
    import redis

    env, args = cli_env
    env = {**env, "MNIST_PIPELINE_LOCK_EXPIRY_S": "3"}
    args = [*args, "--locks", redis_url, "--until", "train"]
    client = redis.Redis.from_url(redis_url)
    before = set(client.keys())

    killed = run_cli({**env, "KILL_IN_STAGE": "train"}, args, code=KILLER)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(k for k in client.keys() if k not in before)  # the run's own lock and its train lock, held by
    assert [key.split(b":lock:")[1].split(b"-")[0] for key in left] == [b"run", b"train_model"]  # nobody alive
    assert all(0 < client.pttl(key) <= 3000 for key in left)
    final = run_cli(env, args)

    assert final.returncode == 0, final.stderr
    assert states(json.loads(final.stdout))["train"] == "completed"
    assert len(list((tmp_path / "artifacts" / "models").glob("*/model.keras"))) == 1
    assert set(client.keys()) == before  # every lock released
    assert scratch(tmp_path / "data", tmp_path / "artifacts") == []


# --- 5. full disk -------------------------------------------------------------------------------------------------


def test_disk_full_while_writing_is_one_clear_error_and_leaves_no_scratch(tmp_path, monkeypatch):
    import errno

    import tasks.preprocess as preprocess
    from tasks.validate import ValidateConfig, validate_files

    source = tmp_path / "src"
    raw = download_files(str(source), tmp_path / "raw", expected_sha256=write_source(source))
    checked = validate_files(raw, tmp_path / "validation", ValidateConfig(train_count=200, test_count=50))

    def write_half_then_fail(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1" + bytes(1000))
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(preprocess.pq, "write_table", write_half_then_fail)
    with pytest.raises(PipelineError) as info:
        preprocess.preprocess_files(raw, checked, tmp_path / "processed")

    assert str(info.value) == (f"{tmp_path / 'processed'}: disk space: expected room for the new artifact, found the "
                               "disk full (Error writing bytes to file. Detail: [errno 28] No space left on device)")
    assert list((tmp_path / "processed").iterdir()) == []
    assert raw.problem() is None and checked.problem() is None


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KB tmpfs: room for the synthetic raw files (140 KB), not for the parquet splits (about 800 KB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk_fails_preprocess_cleanly_then_recovers(synthetic_config, small_disk, flow_run):
    from flows.pipeline import mnist_pipeline

    config = synthetic_config.model_copy(update={"data_dir": small_disk / "data"})
    flow_run(config, "validate")
    cache = {p: p.read_bytes() for p in config.cache_dir.iterdir() if p.is_file()}
    before = tree_state(config.data_dir, config.artifacts_dir / "validation")

    with pytest.raises(PipelineError) as info:
        mnist_pipeline(config=config, until="preprocess")

    assert str(info.value).startswith(f"{config.data_dir / 'processed'}: disk space: expected room for the new artifact, "
                                      "found the disk full (")
    assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
    assert tree_state(config.data_dir, config.artifacts_dir / "validation") == before
    assert {p: p.read_bytes() for p in config.cache_dir.iterdir() if p.is_file()} == cache
    assert scratch(config.data_dir) == []

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    summary, _ = flow_run(config, "preprocess")
    assert states(summary) == {"download": "cached", "validate": "cached", "preprocess": "completed"}


def test_stage_lock_of_a_killed_run_is_free_and_that_of_a_live_one_is_not(tmp_path):
    from tasks.locks import FlockLockManager

    hold = ("import os, signal, sys; from pathlib import Path; from tasks.locks import FlockLockManager; "
            "m = FlockLockManager(Path(sys.argv[1])); m.acquire_lock('k', 'them'); print('held', flush=True); "
            "sys.stdin.readline(); os.kill(os.getpid(), signal.SIGKILL)")
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "held\n"
    locks = FlockLockManager(tmp_path)

    assert locks.is_locked("k")
    assert not locks.acquire_lock("k", "us", acquire_timeout=0.3)  # a live run's lock is respected

    other.stdin.write("die\n")
    other.stdin.flush()
    other.wait(timeout=30)
    assert other.returncode == -signal.SIGKILL
    # Prefect's FileSystemLockManager would keep this lock file forever: the next run would wait for ever.
    assert locks.acquire_lock("k", "us", acquire_timeout=5)
    assert locks.is_lock_holder("k", "us") and not locks.is_lock_holder("k", "them")
    locks.release_lock("k", "us")
    assert not locks.is_locked("k")
