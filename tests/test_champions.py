"""A fair champion: scored on the challenger's data before a decision; one champion per dataset, kept apart; the
commands that read the registry say which dataset they mean. Real flows, real TensorFlow, real files."""

import json
import logging
import os

import pytest

from flows.config import PipelineConfig
from flows.history import diff, evaluations, history
from flows.pipeline import mnist_pipeline
from helpers import artifact, champion_of, config_env, dataset_key, run_cli
from synthetic import make_split
from tasks.batches import add_batch
from tasks.dataset import DatasetConfig
from tasks.keys import read_records
from tasks.registry import read_champion, read_history
from tasks.sources import write_class_folders

LETTERS = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def with_batches(config, root):
    return config.model_copy(update={"batches": config.batches.model_copy(update={"root": str(root)}),
                                     "promotion": config.promotion.model_copy(update={"min_test_accuracy": 0.0,
                                                                                      "tolerance": 1.0})})


def run(config, caplog, until="evaluate"):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prefect"):
        summary = mnist_pipeline(config=config, until=until)
    return summary, [r.getMessage() for r in caplog.records if r.name.startswith("prefect")]


def test_the_champion_is_scored_on_the_challengers_data_before_the_decision(synthetic_config, tmp_path, caplog):
    root = tmp_path / "batches"
    write_class_folders(tmp_path / "week-49", {"": make_split(100, 20)})
    add_batch(tmp_path / "week-49", root, "2026-11-30")
    config = with_batches(synthetic_config, root)
    first, _ = run(config, caplog)
    champion = read_champion(config.registry_dir, dataset_key(config))
    assert first["promotion"]["promoted"] and champion.data_version == first["data_version"]

    write_class_folders(tmp_path / "week-50", {"": make_split(100, 21)})
    add_batch(tmp_path / "week-50", root, "2026-12-07")
    second, lines = run(config, caplog)

    assert second["data_version"]["batches"][0] == first["data_version"]["batches"][0]
    assert len(second["data_version"]["batches"]) == 2
    # The champion's model evaluated on the new holdout (base test split and both batches' shares): a cached stage.
    scored = {json.dumps(m["data_version"], sort_keys=True): m
              for _, m in evaluations(read_records(config.cache_dir))[champion.model_digest]}
    on_new = scored[json.dumps(second["data_version"], sort_keys=True)]
    challenger = json.loads(artifact(second, "evaluate", "metrics.json").read_text())
    assert on_new["num_test"] == challenger["num_test"] > first_holdout(first)
    (decision,) = [d for d in read_history(config.registry_dir) if d.model_digest == challenger["model_digest"]]
    assert decision.data_version == second["data_version"]
    assert decision.champion_before.model_dump() == {"model_digest": champion.model_digest,
                                                     "test_accuracy": on_new["test_accuracy"],
                                                     "test_loss": on_new["test_loss"]}
    assert any(line.startswith(f"champion {champion.model_digest[:16]} scored on data version ") for line in lines)
    # `diff` compares the two on the data version they share.
    compared = diff(config, champion.model_digest[:8], decision.model_digest[:8], dataset_key(config))
    assert not any(row["name"].startswith("evaluated on") for row in compared["params"])
    assert compared["a"]["data_version"] == compared["b"]["data_version"] == second["data_version"]
    assert compared["metrics"][0] == {"name": "test_accuracy", "a": on_new["test_accuracy"],
                                      "b": challenger["test_accuracy"],
                                      "delta": challenger["test_accuracy"] - on_new["test_accuracy"]}

    # Nothing new: the decision holds, nothing is scored again.
    third, _ = run(config, caplog)
    assert {s["state"] for s in third["stages"].values()} == {"cached"} and len(read_history(config.registry_dir)) == 2


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def first_holdout(summary):
    return json.loads(artifact(summary, "evaluate", "metrics.json").read_text())["num_test"]


def test_a_deleted_batch_changes_the_data_version_and_the_log_says_so(synthetic_config, tmp_path, caplog):
    root = tmp_path / "batches"
    for name, seed in (("2026-11-30", 30), ("2026-12-07", 31)):
        write_class_folders(tmp_path / name, {"": make_split(100, seed)})
        add_batch(tmp_path / name, root, name)
    config = with_batches(synthetic_config, root)
    first, _ = run(config, caplog)

    for path in sorted((root / "2026-11-30").rglob("*"), reverse=True):  # deleted by someone
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "2026-11-30").rmdir()
    second, lines = run(config, caplog)

    assert second["data_version"]["batches"] == first["data_version"]["batches"][1:]
    assert second["stages"]["train"]["state"] == "completed"
    (warning,) = [line for line in lines if "not in this run's data" in line]
    model = artifact(first, "train", "model.keras").parent.name
    assert warning.startswith(f"batches that model {model} was trained on are not in this run's data")
    assert "2026-11-30" in warning and "2026-12-07" not in warning
    assert warning.endswith(f"data version {second['data_version']['base'][:8]}+1, was "
                            f"{first['data_version']['base'][:8]}+2")


def test_a_model_of_another_dataset_never_competes_and_each_command_names_the_dataset(synthetic_config, tmp_path):
    digits = synthetic_config.model_copy(update={"promotion": synthetic_config.promotion.model_copy(
        update={"min_test_accuracy": 0.0})})
    mnist_pipeline(config=digits, until="evaluate")
    digits_champion = champion_of(digits)
    # Letters in class folders, judged in the same registry.
    write_class_folders(tmp_path / "letters", {split: make_split(n, seed, 3) for split, n, seed in
                                                (("train", 150, 1), ("test", 30, 2))}, LETTERS)
    letters = PipelineConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                             download={"source": str(tmp_path / "letters"), "mirrors": [], "retries": 0},
                             dataset={"name": "Letters"}, promotion={"min_test_accuracy": 0.0},
                             train={"epochs": 1, "hidden_units": 16, "batch_size": 32, "jit_compile": False})
    summary = mnist_pipeline(config=letters, until="evaluate")

    key = DatasetConfig(name="Letters", num_classes=3, class_names=LETTERS).key()
    assert dataset_key(letters) == key == summary["promotion"]["dataset"] and key.startswith("letters-")
    assert summary["promotion"]["reason"].startswith("first model: no champion yet")  # the digits' is not its
    assert champion_of(digits) == digits_champion and champion_of(letters).class_names == LETTERS
    assert [row["model_digest"] for row in history(digits, dataset_key(digits))] == [digits_champion.model_digest]
    assert [row["model_digest"] for row in history(letters, key)] == [champion_of(letters).model_digest]

    # The commands mean the configured dataset's champion, and say so; --dataset names another.
    env = {**os.environ, **config_env(letters)}
    listed = ok(run_cli(env, ["history"]))
    assert f"models of dataset {key}" in listed and champion_of(letters).model_digest[:16] in listed
    assert digits_champion.model_digest[:16] not in listed
    other = ok(run_cli(env, ["history", "--dataset", dataset_key(digits), "--json"]))
    assert [row["model_digest"] for row in json.loads(other)] == [digits_champion.model_digest]
    images, labels = make_split(6, 9, 3)
    write_class_folders(tmp_path / "score", {"": (images, labels)}, LETTERS)
    result = json.loads(ok(run_cli(env, ["predict", str(tmp_path / "score"), "--json"])))
    assert result["dataset"] == key and result["model"] == champion_of(letters).model_digest
    assert set(result["counts"]) <= set(LETTERS)
    missing = run_cli(env, ["predict", str(tmp_path / "score"), "--dataset", "unknown-00000000"])
    (error,) = [line for line in missing.stderr.splitlines() if line.startswith("mnist-pipeline: error:")]
    assert missing.returncode == 1 and "dataset unknown-00000000 has no champion yet" in error
    assert key in error and dataset_key(digits) in error  # the datasets that have one
