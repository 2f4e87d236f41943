"""The whole flow on the real Prefect engine and TensorFlow, on synthetic data: the cache semantics of all six stages."""

import json
from pathlib import Path

import pytest

from conftest import tree_state
from flows.pipeline import mnist_pipeline
from helpers import artifact, champion_of, states
from tasks.errors import PipelineError

ALL = ["download", "validate", "preprocess", "train", "evaluate", "report"]


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


@pytest.fixture
def first_run(synthetic_config):
    return mnist_pipeline(config=synthetic_config)


def test_full_run_then_nothing_changed_runs_no_stage(synthetic_config, first_run):
    assert states(first_run) == dict.fromkeys(ALL, "completed")
    assert 0.0 <= first_run["metrics"]["test_accuracy"] <= 1.0
    assert len(first_run["metrics"]["first_20_predictions"]) == 20
    assert Path(first_run["report"]).name == "report.html" and Path(first_run["report"]).is_file()
    before = tree_state(synthetic_config.data_dir, synthetic_config.artifacts_dir)

    second = mnist_pipeline(config=synthetic_config)

    assert states(second) == dict.fromkeys(ALL, "cached")
    assert second["metrics"] == first_run["metrics"] and second["report"] == first_run["report"]
    assert tree_state(synthetic_config.data_dir, synthetic_config.artifacts_dir) == before


def test_changed_training_parameter_reruns_train_and_its_dependants_only(synthetic_config, first_run):
    changed = synthetic_config.model_copy(update={"train": synthetic_config.train.model_copy(update={"epochs": 3})})

    summary = mnist_pipeline(config=changed)

    assert states(summary) == {**dict.fromkeys(ALL[:3], "cached"), **dict.fromkeys(ALL[3:], "completed")}
    history = json.loads(artifact(summary, "train", "history.json").read_text())
    assert len(history["loss"]) == 3


def test_rerun_of_preprocess_with_identical_output_leaves_dependants_cached(synthetic_config, first_run):
    summary = mnist_pipeline(config=synthetic_config, rerun=["preprocess"])

    assert states(summary) == {**dict.fromkeys(ALL, "cached"), "preprocess": "completed"}


def test_retrain_that_reproduces_the_model_keeps_its_files_and_its_dependants_cached(synthetic_config, first_run):
    models = artifact(first_run, "train", "model.keras").parent
    before = tree_state(models)

    summary = mnist_pipeline(config=synthetic_config, rerun=["train"])

    # Same seed, same model digest: the new run's other timings and zip dates are not written over the artifact.
    assert states(summary) == {**dict.fromkeys(ALL, "cached"), "train": "completed"}
    assert artifact(summary, "train", "model.keras").parent == models
    assert tree_state(models) == before
    assert json.loads(artifact(summary, "train", "history.json").read_text()) == json.loads(
        artifact(first_run, "train", "history.json").read_text())


def test_deleted_model_is_retrained(synthetic_config, first_run):
    artifact(first_run, "train", "model.keras").unlink()

    summary = mnist_pipeline(config=synthetic_config)

    assert summary["stages"]["train"]["state"] == "completed"
    assert artifact(summary, "train", "model.keras").is_file()
    assert all(summary["stages"][s]["state"] == "cached" for s in ALL[:3])


def test_only_reruns_one_stage_on_the_existing_artifacts(synthetic_config, first_run):
    summary = mnist_pipeline(config=synthetic_config, only="report")

    assert states(summary) == {"report": "completed"}
    assert summary["report"] == first_run["report"]


def test_only_without_earlier_artifacts_is_a_clear_error(synthetic_config):
    with pytest.raises(PipelineError, match=r"--only evaluate: stage download: expected artifacts of an earlier run"):
        mnist_pipeline(config=synthetic_config, only="evaluate")
    assert not synthetic_config.artifacts_dir.joinpath("evaluation").exists()


def test_same_seed_gives_the_same_metrics_when_caches_are_bypassed(synthetic_config, first_run):
    again = mnist_pipeline(config=synthetic_config, rerun=["train", "evaluate"])

    assert again["stages"]["train"]["state"] == "completed"
    assert again["metrics"] == first_run["metrics"]
    first_metrics = json.loads(artifact(first_run, "evaluate", "metrics.json").read_text())
    again_metrics = json.loads(artifact(again, "evaluate", "metrics.json").read_text())
    assert again_metrics["test_loss"] == first_metrics["test_loss"]
    assert again_metrics["confusion_matrix"] == first_metrics["confusion_matrix"]


def run_artifact_keys(run_id):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)])))
    return {artifact.key for artifact in found if artifact.key}


def test_promotion_is_decided_once_and_every_run_shows_the_report(synthetic_config, first_run):
    from tasks.registry import read_history

    second = mnist_pipeline(config=synthetic_config)

    assert states(second) == dict.fromkeys(ALL, "cached")
    assert first_run["promotion"]["promoted"] and second["promotion"] == first_run["promotion"]
    # The first run's decision, the only one: the second run looked it up and recorded nothing.
    (decision,) = read_history(synthetic_config.registry_dir)
    model = artifact(first_run, "train", "model.keras")
    assert decision.promoted and decision.run_id == first_run["run_id"] and decision.model_path == str(model)
    champion = champion_of(synthetic_config)
    assert champion is not None and champion.model_digest == decision.model_digest
    assert champion.model_path == str(model) and champion.run_id == first_run["run_id"]
    expected = {"mnist-report", "mnist-metrics", "mnist-confusion-matrix", "mnist-promotion"}
    assert expected <= run_artifact_keys(first_run["run_id"])
    assert expected <= run_artifact_keys(second["run_id"])
