"""The `mnist-pipeline` command in a subprocess: JSON summary, cached reruns, clean failures on bad sources."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tree_state
from synthetic import idx_bytes, make_split, payloads, write_source, write_sums

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, api_url=None):
    full_env = {**os.environ, **(env or {})}
    if api_url:
        full_env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=full_env, timeout=600,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def good(tmp_path_factory, prefect_api_url):
    """A synthetic source, its pins, and roots that already hold one successful run."""
    base = tmp_path_factory.mktemp("cli")
    # A dataset of the user's own: no pins, as most sources come (the content checks are all there is).
    write_source(base / "source")
    env = {
        "MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]",
        "MNIST_PIPELINE_DOWNLOAD__RETRIES": "0",
        "MNIST_PIPELINE_VALIDATION__TRAIN_COUNT": "200",
        "MNIST_PIPELINE_VALIDATION__TEST_COUNT": "50",
    }
    roots = ["--data-dir", str(base / "data"), "--artifacts-dir", str(base / "artifacts")]
    first = cli("run", "--until", "preprocess", "--json", "--source", str(base / "source"), *roots, env=env, api_url=prefect_api_url)
    assert first.returncode == 0, first.stderr
    return {"base": base, "env": env, "roots": roots, "api": prefect_api_url, "first": json.loads(first.stdout)}


def test_json_summary_names_every_stage_and_its_artifacts(good):
    summary = good["first"]
    assert summary["run_id"]
    assert list(summary["stages"]) == ["download", "validate", "preprocess"]
    for info in summary["stages"].values():
        assert info["state"] == "completed"
        assert info["artifacts"] and all(Path(p).is_file() for p in info["artifacts"])
    names = sorted(Path(p).name for p in summary["stages"]["preprocess"]["artifacts"])
    assert names == ["test.parquet", "train.parquet"]


def test_second_run_in_a_new_process_is_cached_and_rewrites_nothing(good):
    base = good["base"]
    before = tree_state(base / "data", base / "artifacts")

    again = cli("run", "--until", "preprocess", "--json", "--source", str(base / "source"), *good["roots"], env=good["env"], api_url=good["api"])

    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert {s: i["state"] for s, i in summary["stages"].items()} == dict.fromkeys(["download", "validate", "preprocess"], "cached")
    assert tree_state(base / "data", base / "artifacts") == before


def test_no_cache_runs_every_stage_and_identical_output_rewrites_nothing(good):
    base = good["base"]
    # Every artifact, but not Prefect's result records in artifacts/cache: those are rewritten by a forced run.
    before = tree_state(base / "data", base / "artifacts" / "validation")

    again = cli("run", "--until", "preprocess", "--no-cache", "--json", "--source", str(base / "source"), *good["roots"],
                env=good["env"], api_url=good["api"])

    assert again.returncode == 0, again.stderr
    assert {i["state"] for i in json.loads(again.stdout)["stages"].values()} == {"completed"}
    assert tree_state(base / "data", base / "artifacts" / "validation") == before


def _images(n=200, shape=(28, 28)):
    images, _ = make_split(n, 0)
    return idx_bytes(images[:, : shape[0], : shape[1]])


def _labels(n=200, last=None):
    _, labels = make_split(200, 0)
    labels = labels[:n].copy()
    if last is not None:
        labels[-1] = last
    return idx_bytes(labels)


def _flip_pixel(payload):
    data = bytearray(payload)
    data[-1] ^= 0x01
    return bytes(data)


GOOD = payloads()
MALFORMED = {
    # case: (file name, raw bytes written as <name>.gz, expected fragments of the message)
    "wrong magic": ("train-images-idx3-ubyte", gzip.compress(b"\x12\x34" + GOOD["train-images-idx3-ubyte"][2:]), "magic number"),
    "truncated gzip": ("train-images-idx3-ubyte", gzip.compress(GOOD["train-images-idx3-ubyte"])[:3000], "gzip: expected a complete gzip stream, found it truncated"),
    "label of 10": ("train-labels-idx1-ubyte", gzip.compress(_labels(last=10)), "label range: expected 0..9, found 0..10"),
    "fewer labels": ("train-labels-idx1-ubyte", gzip.compress(_labels(n=199)), "count match: expected 200 labels (one per image), found 199"),
    "28x27 images": ("train-images-idx3-ubyte", gzip.compress(_images(shape=(28, 27))), "image size: expected 28x28, found 28x27"),
    # With the good files' SHA256SUMS beside it (written by the test).
    "digest differs": ("t10k-images-idx3-ubyte", gzip.compress(_flip_pixel(GOOD["t10k-images-idx3-ubyte"])), "SHA256SUMS digest: expected"),
    "html page": ("t10k-labels-idx1-ubyte", b"<!DOCTYPE html><html><body>Moved</body></html>", "found an HTML/XML document"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_source_fails_with_one_line_and_leaves_artifacts_intact(good, case, tmp_path):
    name, data, fragment = MALFORMED[case]
    source = tmp_path / "bad"
    write_source(source)
    if case == "digest differs":
        write_sums(source)
    (source / f"{name}.gz").write_bytes(data)
    base = good["base"]
    before = tree_state(base / "data", base / "artifacts")

    result = cli("run", "--until", "preprocess", "--json", "--source", str(source), *good["roots"], env=good["env"], api_url=good["api"])

    assert result.returncode == 1
    assert result.stdout == ""
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("mnist-pipeline: error: ")
    assert name in message and fragment in message, message
    assert "Traceback" not in result.stderr
    after = tree_state(base / "data", base / "artifacts")
    assert {path: after.get(path) for path in before} == before
    # Only labels beyond the classes pass the download (which cannot know the classes) and fail in validate.
    if case != "label of 10":
        assert after == before
    assert not list((base / "data").rglob(".tmp-*"))


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--num-classes", "10", "--class-names", "a,b,c"],
         "class_names: expected 10 names (one per class, num_classes 10), found 3"),
        (["--num-classes", "3", "--class-names", "a,b"], "expected 3 names"),
        (["--class-names", "a,a,b,c,d,e,f,g,h,i"], "expected distinct names, found 'a' more than once"),
        (["--model", "cnn", "--hidden-units", "64"], "hidden_units: a knob of model mlp, not of model cnn"),
        (["--patience", "2"], "patience: early stopping watches the validation loss; it needs validation_split > 0"),
        (["--sha256", "/no/such/SHA256SUMS"], "/no/such/SHA256SUMS: read: expected a readable sha256sum file"),
    ],
)
def test_bad_settings_fail_with_one_line_before_anything_runs(good, flags, fragment):
    base = good["base"]
    before = tree_state(base / "data", base / "artifacts")
    result = cli("run", "--source", str(base / "source"), *good["roots"], *flags, env=good["env"], api_url=good["api"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert result.stderr.startswith("mnist-pipeline: error: ") and fragment in result.stderr, result.stderr
    assert tree_state(base / "data", base / "artifacts") == before


def test_sha256_file_pins_the_source(good, tmp_path):
    from synthetic import sums_text

    sums = tmp_path / "pins.txt"
    sums.write_text(sums_text({name: "0" * 64 for name in payloads()}))
    result = cli("run", "--until", "download", "--source", str(good["base"] / "source"), "--sha256", str(sums),
                 *good["roots"], env=good["env"], api_url=good["api"])
    assert result.returncode == 1
    assert "--sha256 digest: expected " + "0" * 64 in result.stderr.strip().splitlines()[-1]


def test_unknown_stage_is_a_usage_error():
    result = cli("run", "--until", "deploy")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_help_lists_the_options():
    result = cli("run", "--help")
    assert result.returncode == 0
    for option in ("--until", "--rerun", "--source", "--data-dir", "--artifacts-dir", "--json"):
        assert option in result.stdout


def test_serve_creates_a_scheduled_deployment_and_stops_by_pid(prefect_api_url, tmp_path):
    import time

    from prefect.client.orchestration import get_client

    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    # No --cron: the weekly-retrain deployment's, read from prefect.yaml; --timezone overrides its timezone.
    args = ["serve", "--name", "served-test", "--timezone", "UTC", "--data-dir", str(tmp_path / "d")]
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deployment = None
        deadline = time.monotonic() + 120
        while deployment is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            with get_client(sync_client=True) as client:
                try:
                    deployment = client.read_deployment_by_name("mnist-pipeline/served-test")
                except Exception:  # not created yet
                    deployment = None
        assert deployment is not None, f"no deployment (serve exited with {process.poll()})"
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"
        assert deployment.parameters == {"config": {"data_dir": str(tmp_path / "d")}}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_serve_without_a_server_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "serve"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "serve needs a Prefect server" in result.stderr and "Traceback" not in result.stderr


def test_only_serve_reads_prefect_yaml(tmp_path):
    # On a copy of the package without prefect.yaml: building the parser, the helps and `status` never open it.
    import shutil

    copy = tmp_path / "copy"
    for package in ("flows", "tasks"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    roots = ["--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts")]
    for args, code in ((["--help"], 0), (["status", "--help"], 0), (["serve", "--help"], 0), (["status", *roots], 1)):
        result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=copy, capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.split()[:2] == ["download", "missing"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()


def test_prefect_sees_the_cli_defaults_set_before_it_is_imported():
    # Prefect reads its settings when imported: defaults set later (in main) would silently not apply.
    code = (
        "import os, flows.cli; from prefect.settings import get_current_settings as s; "
        "print(s().server.ephemeral.startup_timeout_seconds, os.environ['DO_NOT_TRACK'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["120", "1"]


def test_a_run_killed_mid_training_resumes_from_its_last_epoch(tmp_path, prefect_api_url):
    import signal
    import time

    write_source(tmp_path / "source", n_train=2000, n_test=50)
    args = ["run", "--source", str(tmp_path / "source"), "--data-dir", str(tmp_path / "data"), "--artifacts-dir",
            str(tmp_path / "artifacts"), "--epochs", "40", "--hidden-units", "256", "--batch-size", "16", "--json"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "artifacts").glob("train-state/*/state.json")) and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before its first epoch was backed up"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    (state,) = (tmp_path / "artifacts").glob("train-state/*/state.json")
    done = json.loads(state.read_text())["epoch"]
    assert 1 <= done < 40

    result = cli(*args, api_url=prefect_api_url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from epoch {done}/40 of an interrupted training" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["stages"]["train"]["state"] == "completed"
    history = json.loads(next(Path(p) for p in summary["stages"]["train"]["artifacts"] if p.endswith("history.json")).read_text())
    assert summary["stages"]["train"]["resumed_from_epoch"] == done and len(history["loss"]) == 40
    assert summary["metrics"]["test_accuracy"] > 0.9
    assert not state.parent.exists()


def test_class_names_alone_set_the_number_of_classes(monkeypatch):
    from flows.cli import build_parser, config_overrides, pipeline_config

    assert pipeline_config(config_overrides(build_parser().parse_args(
        ["run", "--class-names", "circle,square,triangle"]))).dataset.model_dump(exclude={"name"}) == {
        "num_classes": 3, "class_names": ["circle", "square", "triangle"]}
    monkeypatch.setenv("MNIST_PIPELINE_DATASET__CLASS_NAMES", "a,b")
    assert pipeline_config({}).dataset.num_classes == 2
