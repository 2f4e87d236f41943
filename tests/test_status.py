"""`status` after real runs on small data: up to date, stale with the why of each kind of change, or missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import mnist_pipeline
from flows.status import MISSING, STALE, UP_TO_DATE, pipeline_status
from helpers import config_env
from synthetic import payloads, write_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def states(rows):
    return {row.stage: row.state for row in rows}


def why(rows):
    return {row.stage: row.why for row in rows}


def status_cli(config, *args, code=None):
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **config_env(config)}
    command = ["-c", code] if code else ["-m", "flows.cli", "status"]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.fixture
def ran(synthetic_config):
    mnist_pipeline(config=synthetic_config)
    return synthetic_config


def test_before_any_run_every_stage_is_missing(synthetic_config):
    rows = pipeline_status(synthetic_config)
    assert states(rows) == dict.fromkeys(states(rows), MISSING) and len(rows) == 6
    assert why(rows)["download"] == ["no result for this stage yet"]
    assert why(rows)["train"] == ["after preprocess, which is missing"]


def test_after_a_run_every_stage_is_up_to_date_with_its_artifacts(ran):
    rows = pipeline_status(ran)
    assert set(states(rows).values()) == {UP_TO_DATE}
    for row in rows:
        assert row.why == [] and row.artifacts and all(Path(p).is_file() for p in row.artifacts)
    summary = mnist_pipeline(config=ran)  # the flow agrees: all cached, and under the same folders
    assert {s: i["state"] for s, i in summary["stages"].items()} == dict.fromkeys(states(rows), "cached")
    assert {r.stage: sorted(r.artifacts) for r in rows} == {s: sorted(i["artifacts"]) for s, i in summary["stages"].items()}


def test_a_changed_parameter_is_named_with_both_values(ran):
    changed = ran.model_copy(update={"train": ran.train.model_copy(update={"epochs": 3})})
    rows = pipeline_status(changed)
    assert states(rows) == {"download": UP_TO_DATE, "validate": UP_TO_DATE, "preprocess": UP_TO_DATE,
                            "train": STALE, "evaluate": STALE, "report": STALE}
    assert why(rows)["train"] == ["train.epochs: 2 -> 3"]
    assert why(rows)["evaluate"] == ["after train, which is stale"]
    mnist_pipeline(config=changed)
    assert set(states(pipeline_status(changed)).values()) == {UP_TO_DATE}
    # The earlier results are still there, but the new model became the champion: the old one's report would judge
    # it against another champion, so it waits for a new decision.
    rows = pipeline_status(ran)
    assert states(rows) == {**dict.fromkeys(states(rows), UP_TO_DATE), "report": STALE}
    assert why(rows)["report"] == ["no promotion decision for this model against the current champion (a run decides it)"]


def test_a_changed_upstream_output_is_named_by_its_digests(ran, tmp_path):
    other = tmp_path / "other-source"
    digests = write_source(other, payloads(seed=7))
    changed = ran.model_copy(update={"download": ran.download.model_copy(update={"source": str(other), "sha256": digests})})
    reasons = why(pipeline_status(changed))["download"]
    assert any(line.startswith("download.source: ") for line in reasons), reasons
    mnist_pipeline(config=changed, until="preprocess")
    rows = pipeline_status(changed)
    assert states(rows)["preprocess"] == UP_TO_DATE and states(rows)["train"] == STALE
    before = pipeline_status(ran)[2].artifacts[0].split("/")[-2]
    after = rows[2].artifacts[0].split("/")[-2]
    assert why(rows)["train"] == [f"the output of preprocess changed: {before} -> {after}"]


def test_an_altered_or_deleted_file_is_named(ran):
    rows = {row.stage: row for row in pipeline_status(ran)}
    metrics = next(Path(p) for p in rows["evaluate"].artifacts if p.endswith("metrics.json"))
    metrics.write_text(metrics.read_text() + " ")
    model = next(Path(p) for p in rows["train"].artifacts if p.endswith("model.keras"))
    model.unlink()
    after = {row.stage: row for row in pipeline_status(ran)}
    assert after["train"].state == STALE and str(model) in after["train"].why[0]
    assert after["evaluate"].why == ["after train, which is stale"]
    assert [row.stage for row in pipeline_status(ran, until="train")] == ["download", "validate", "preprocess", "train"]
    mnist_pipeline(config=ran)  # the flow heals what status said
    assert set(states(pipeline_status(ran)).values()) == {UP_TO_DATE}
    metrics.write_text(metrics.read_text() + " ")
    stale = why(pipeline_status(ran))["evaluate"]
    assert len(stale) == 1 and str(metrics) in stale[0] and "size" in stale[0]


def test_a_corrupt_cache_record_is_named_and_left_as_it_is(ran):
    rows = {row.stage: row for row in pipeline_status(ran)}
    record = Path(ran.cache_dir) / rows["validate"].key
    record.write_text("{not json")
    reason = why(pipeline_status(ran))["validate"]
    assert len(reason) == 1 and reason[0].startswith(f"unreadable cache record {record}")
    assert record.read_text() == "{not json"


def test_report_waits_for_a_promotion_decision(ran):
    (Path(ran.registry_dir) / "history.jsonl").unlink()
    assert why(pipeline_status(ran))["report"] == ["no promotion decision for this model against the current champion (a run decides it)"]


def test_a_code_change_names_the_file(ran, tmp_path):
    """On a copy of the package: editing tasks/train.py makes train stale because of that file, and nothing above."""
    import shutil

    copy = tmp_path / "copy"
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import json, sys; from flows.config import PipelineConfig; from flows.status import pipeline_status, "
             "status_json; print(json.dumps(status_json(pipeline_status(PipelineConfig.model_validate_json(sys.argv[1])))))")
    read = lambda: json.loads(subprocess.run([sys.executable, "-c", probe, ran.model_dump_json()], cwd=copy,  # noqa: E731
                                             capture_output=True, text=True, check=True).stdout)["stages"]
    assert {s: v["state"] for s, v in read().items()} == dict.fromkeys(read(), UP_TO_DATE)
    train = copy / "tasks" / "train.py"
    train.write_text(train.read_text() + "\n# edited\n")
    stages = read()
    assert [stages[s]["state"] for s in ("download", "validate", "preprocess")] == [UP_TO_DATE] * 3
    assert stages["train"] == {**stages["train"], "state": STALE, "why": ["tasks/train.py changed"]}
    assert stages["evaluate"]["why"] == ["after train, which is stale"]


def test_cli_exit_codes_json_and_no_heavy_imports(ran):
    result = status_cli(ran)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["download", "validate", "preprocess", "train", "evaluate", "report"]
    assert all("up to date" in line for line in lines)

    result = status_cli(ran, "--epochs", "3", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["up_to_date"] is False
    assert report["stages"]["train"]["state"] == STALE and report["stages"]["train"]["why"] == ["train.epochs: 2 -> 3"]
    assert report["stages"]["preprocess"]["state"] == UP_TO_DATE

    # Nothing of Prefect, TensorFlow or the data libraries is imported to answer.
    code = ("import sys; from flows import cli; sys.argv = ['mnist-pipeline', 'status', *sys.argv[1:]]\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'tensorflow', 'keras', 'pyarrow', 'pandas'})\n"
            "print(heavy, file=sys.stderr)")
    probe = status_cli(ran, code=code)
    assert probe.stderr.strip().splitlines()[-1] == "[]", probe.stderr


def test_cli_bad_config_and_corrupt_key_records_are_one_line(ran):
    result = status_cli(ran, "--epochs", "0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "epochs" in result.stderr

    keys = Path(ran.cache_dir) / "keys"
    damaged = next(p for p in keys.iterdir() if p.name.startswith("train_model-"))
    damaged.write_text("[1, 2")
    result = status_cli(ran, "--epochs", "3")  # needs the recorded components to say why
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(damaged) in result.stderr and "expected" in result.stderr
    assert damaged.read_text() == "[1, 2"
