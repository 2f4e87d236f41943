"""`history`, `diff` and `gc` against real runs on small data: what they report, what gc removes and keeps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tree_state
from flows import gc
from flows.history import diff, history
from flows.pipeline import mnist_pipeline
from flows.status import UP_TO_DATE, pipeline_status
from helpers import champion_of, config_env, dataset_key
from synthetic import payloads, write_source
from tasks.errors import PipelineError
from tasks.layout import DECISIONS_FILE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def with_train(config, **values):
    return config.model_copy(update={"train": config.train.model_copy(update=values)})


def cli(config, *args, python=False):
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **config_env(config)}
    command = list(args) if python else ["-m", "flows.cli", *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def metrics_of(summary):
    path = next(p for p in summary["stages"]["evaluate"]["artifacts"] if p.endswith("metrics.json"))
    return json.loads(Path(path).read_text())


@pytest.fixture
def two_models(synthetic_config):
    """Models A (the synthetic config) and B (3 epochs, another learning rate), B run last: the champion."""
    a = mnist_pipeline(config=synthetic_config)
    config_b = with_train(synthetic_config, epochs=3, learning_rate=0.003)
    b = mnist_pipeline(config=config_b)
    assert b["promotion"]["promoted"]
    return synthetic_config, config_b, metrics_of(a), metrics_of(b)


def test_history_lists_every_model_with_its_decision_and_the_champion(two_models):
    config, _, a, b = two_models
    rows = history(config, dataset_key(config))
    assert [r["model_digest"] for r in rows] == [a["model_digest"], b["model_digest"]]
    assert [r["champion"] for r in rows] == [False, True]
    assert rows[0]["changed"] == {"epochs": 2, "batch_size": 32, "hidden_units": 32, "jit_compile": False}
    assert rows[1]["changed"] == {"epochs": 3, "batch_size": 32, "learning_rate": 0.003, "hidden_units": 32, "jit_compile": False}
    assert [(r["test_accuracy"], r["test_loss"]) for r in rows] == [(m["test_accuracy"], m["test_loss"]) for m in (a, b)]
    assert all(r["promoted"] and r["reason"] for r in rows)

    result = cli(config, "history", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == rows
    table = cli(config, "history")
    assert table.returncode == 0, table.stderr
    champion_line = next(line for line in table.stdout.splitlines() if b["model_digest"][:16] in line)
    assert "*" in champion_line and "learning_rate=0.003" in champion_line and f"{b['test_loss']:.4f}" in champion_line

    # Reading the registry imports neither Prefect nor TensorFlow.
    code = ("import sys; from flows import cli; code = cli.main(['history', '--json']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'tensorflow', 'keras', 'pyarrow'}), "
            "file=sys.stderr)")
    probe = cli(config, "-c", code, python=True)
    assert probe.returncode == 0 and probe.stderr.strip().splitlines()[-1] == "[]", probe.stderr


def test_diff_puts_settings_and_metrics_side_by_side(two_models):
    config, _, a, b = two_models
    result = diff(config, a["model_digest"][:6], "champion", dataset_key(config))
    assert result["a"]["model_digest"] == a["model_digest"] and result["b"]["model_digest"] == b["model_digest"]
    assert result["params"] == [{"name": "epochs", "a": 2, "b": 3}, {"name": "learning_rate", "a": 0.001, "b": 0.003}]
    metrics = {row["name"]: row for row in result["metrics"]}
    assert metrics["test_loss"] == {"name": "test_loss", "a": a["test_loss"], "b": b["test_loss"],
                                    "delta": b["test_loss"] - a["test_loss"]}
    recalls = [name for name in metrics if name.startswith("recall ")]
    assert recalls == [f"recall {c}" for c in range(10)]
    assert metrics["recall 3"]["a"] == a["per_class"]["3"]["recall"]

    shown = cli(config, "diff", "champion", a["model_digest"][:8])
    assert shown.returncode == 0, shown.stderr
    assert "learning_rate" in shown.stdout and f"{a['test_loss'] - b['test_loss']:+.4f}" in shown.stdout
    as_json = cli(config, "diff", "champion", a["model_digest"][:8], "--json")
    assert json.loads(as_json.stdout)["params"][0] == {"name": "epochs", "a": 3, "b": 2}


def test_bad_model_names_and_registry_lines_are_one_line_each(two_models):
    config, _, a, _ = two_models
    registry = Path(config.registry_dir)
    # A second model folder whose name shares A's first 4 hex digits.
    models = Path(config.artifacts_dir) / "models"
    twin = models / (a["model_digest"][:4] + "0" * 12)
    shutil.copytree(models / a["model_digest"][:16], twin)
    before = tree_state(Path(config.artifacts_dir))
    for args, fragment in ((["diff", "abcd1234", "champion"], "no model with this digest"),
                           (["diff", a["model_digest"][:4], "champion"], "ambiguous prefix, matches 2 models"),
                           (["diff", "xyz", "champion"], "expected `champion`, a model digest")):
        result = cli(config, *args)
        assert result.returncode == 1 and result.stdout == "", result
        assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    with open(registry / DECISIONS_FILE, "a") as history_file:
        history_file.write('{"model_digest": 7}\n')
    for command in (["history"], ["diff", "champion", a["model_digest"][:8]]):
        result = cli(config, *command)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and f"{registry / DECISIONS_FILE}: line 3: expected a decision" in result.stderr
    after = tree_state(Path(config.artifacts_dir))
    assert {p: s for p, s in after.items() if not p.endswith(DECISIONS_FILE)} == {
        p: s for p, s in before.items() if not p.endswith(DECISIONS_FILE)}


def folders(summary, *stages):
    return {str(Path(p).parent) for stage in stages for p in summary["stages"][stage]["artifacts"]}


def test_gc_removes_what_neither_the_config_nor_the_registry_uses(synthetic_config, tmp_path):
    config_a = synthetic_config
    config_b = with_train(config_a, epochs=3)
    other = tmp_path / "other-source"
    config_d = config_a.model_copy(update={"download": config_a.download.model_copy(update={
        "source": str(other), "sha256": write_source(other, payloads(seed=9))})})
    first = mnist_pipeline(config=config_a)
    b = mnist_pipeline(config=config_b)
    d = mnist_pipeline(config=config_d, until="preprocess")
    a = mnist_pipeline(config=config_a)  # decided again against the champion B: all of A up to date, a new report
    assert set(r.state for r in pipeline_status(config_a)) == {UP_TO_DATE}
    assert folders(first, "report") != folders(a, "report")
    expected = folders(first, "report") | folders(b, "report") | folders(d, "download", "validate", "preprocess")

    before = tree_state(Path(config_a.data_dir), Path(config_a.artifacts_dir))
    planned = gc.plan(config_a)
    assert set(planned.folders) == expected
    assert planned.size == sum(s[1] for p, s in before.items() if str(Path(p).parent) in expected)
    assert len(planned.records) == 5  # A's first report, B's report and D's three stages
    listed = cli(config_a, "gc")
    assert listed.returncode == 0, listed.stderr
    assert all(folder in listed.stdout for folder in expected) and "--yes removes them" in listed.stdout
    assert tree_state(Path(config_a.data_dir), Path(config_a.artifacts_dir)) == before  # listing changes nothing

    removed = cli(config_a, "gc", "--yes", "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] is True and set(json.loads(removed.stdout)["folders"]) == expected
    assert not any(Path(f).exists() for f in expected)
    kept = folders(a, *a["stages"]) | folders(b, "train", "evaluate")  # B: a registry model, with its evaluation
    assert all(Path(f).is_dir() for f in kept)
    assert gc.plan(config_a).folders == {} and gc.plan(config_a).records == []

    again = mnist_pipeline(config=config_a)
    assert {s: i["state"] for s, i in again["stages"].items()} == dict.fromkeys(again["stages"], "cached")
    assert champion_of(config_a).model_path == next(
        p for p in a["stages"]["train"]["artifacts"] if p.endswith("model.keras"))  # A, decided last
    assert diff(config_a, "champion", b["stages"]["train"]["artifacts"][0].split("/")[-2], dataset_key(config_a))["params"] == [
        {"name": "epochs", "a": 2, "b": 3}]
    # What gc removed is computed again when asked for.
    rerun_d = mnist_pipeline(config=config_d, until="preprocess")
    assert {i["state"] for i in rerun_d["stages"].values()} == {"completed"}


HOLD = """
import sys, time
from flows.config import PipelineConfig
manager = PipelineConfig.model_validate_json(sys.argv[1]).lock_manager()
assert manager.acquire_lock(sys.argv[2], holder="a-run-in-progress")
print("held", flush=True)
time.sleep(600)
"""


def test_gc_removes_nothing_while_a_run_holds_a_stage_lock(synthetic_config, tmp_path):
    mnist_pipeline(config=synthetic_config)
    changed = with_train(synthetic_config, epochs=3)
    mnist_pipeline(config=changed)
    mnist_pipeline(config=synthetic_config)
    assert gc.plan(synthetic_config).folders  # changed's report: something to remove
    holder = subprocess.Popen([sys.executable, "-c", HOLD, synthetic_config.model_dump_json(), "train_model-inprogress"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_state(Path(synthetic_config.data_dir), Path(synthetic_config.artifacts_dir))
        result = cli(synthetic_config, "gc", "--yes")
        assert result.returncode == 1, result
        assert "a run is in progress (lock train_model-inprogress held): nothing removed" in result.stdout
        assert tree_state(Path(synthetic_config.data_dir), Path(synthetic_config.artifacts_dir)) == before
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # The holder is gone, and so is its flock: gc goes ahead.
    result = cli(synthetic_config, "gc", "--yes")
    assert result.returncode == 0, result.stderr
    assert gc.plan(synthetic_config).folders == {}


def test_gc_sees_redis_stage_locks(synthetic_config, redis_url):
    config = synthetic_config.model_copy(update={"locks": redis_url})
    manager = config.lock_manager()
    assert manager.acquire_lock("train_model-inprogress", holder="a-run")
    try:
        assert gc.plan(config).held == ["train_model-inprogress"]
    finally:
        manager.release_lock("train_model-inprogress", holder="a-run")
    deadline = time.monotonic() + 10
    while gc.plan(config).held and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gc.plan(config).held == []


def test_gc_with_a_corrupt_record_removes_nothing(synthetic_config):
    mnist_pipeline(config=synthetic_config)
    mnist_pipeline(config=with_train(synthetic_config, epochs=3))
    record = next(p for p in Path(synthetic_config.cache_dir).iterdir() if p.name.startswith("evaluate_model-"))
    record.write_text('{"result": 1}')
    before = tree_state(Path(synthetic_config.data_dir), Path(synthetic_config.artifacts_dir))
    with pytest.raises(PipelineError, match=f"{record}: expected a cache record holding an artifact reference"):
        gc.plan(synthetic_config)
    result = cli(synthetic_config, "gc", "--yes")
    assert result.returncode == 1 and result.stdout == "" and result.stderr.count("\n") == 1, result
    assert str(record) in result.stderr
    assert tree_state(Path(synthetic_config.data_dir), Path(synthetic_config.artifacts_dir)) == before


def test_records_written_before_the_reference_moved_are_still_read_by_history_and_gc(synthetic_config):
    first = mnist_pipeline(config=synthetic_config)
    mnist_pipeline(config=with_train(synthetic_config, epochs=3))
    # As the earlier layout wrote them: the same reference, under the class's former module.
    for record in (p for p in Path(synthetic_config.cache_dir).iterdir() if p.is_file()):
        data = json.loads(record.read_text())
        assert '"tasks.artifacts.ArtifactRef"' in data["result"]
        record.write_text(json.dumps({**data, "result": data["result"].replace("tasks.artifacts.", "tasks.core.")}))

    assert [row["test_accuracy"] for row in history(synthetic_config, dataset_key(synthetic_config))][0] == first["metrics"]["test_accuracy"]
    planned = gc.plan(synthetic_config)
    assert planned.folders and planned.kept_records > 0
    garbage = ["not an artifact reference", '{"__class__": "tasks.other.ArtifactRef", "data": {}}']
    record = next(p for p in Path(synthetic_config.cache_dir).iterdir() if p.name.startswith("evaluate_model-"))
    for result in garbage:
        record.write_text(json.dumps({**json.loads(record.read_text()), "result": result}))
        with pytest.raises(PipelineError, match=f"{record}: expected a cache record holding an artifact reference"):
            gc.plan(synthetic_config)
