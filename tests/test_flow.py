"""The flow on the real Prefect engine: cache semantics of the data stages on synthetic data."""

from pathlib import Path

import pytest

from conftest import tree_state
from flows.pipeline import mnist_pipeline
from helpers import artifact, states
from tasks.errors import PipelineError


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def test_second_run_is_all_cached_and_rewrites_nothing(synthetic_config):
    first = mnist_pipeline(config=synthetic_config, until="preprocess")
    assert states(first) == {"download": "completed", "validate": "completed", "preprocess": "completed"}
    before = tree_state(synthetic_config.data_dir, synthetic_config.artifacts_dir)

    second = mnist_pipeline(config=synthetic_config, until="preprocess")

    assert states(second) == {"download": "cached", "validate": "cached", "preprocess": "cached"}
    assert second["stages"] == {s: {**i, "state": "cached"} for s, i in first["stages"].items()}
    assert tree_state(synthetic_config.data_dir, synthetic_config.artifacts_dir) == before
    assert first["run_id"] != second["run_id"]


def test_until_stops_after_the_named_stage(synthetic_config):
    summary = mnist_pipeline(config=synthetic_config, until="validate")
    assert list(summary["stages"]) == ["download", "validate"]
    assert not (synthetic_config.data_dir / "processed").exists()


def test_rerun_forces_one_stage_and_identical_output_is_not_rewritten(synthetic_config):
    mnist_pipeline(config=synthetic_config, until="preprocess")
    before = tree_state(synthetic_config.data_dir)

    summary = mnist_pipeline(config=synthetic_config, until="preprocess", rerun=["preprocess"])

    assert states(summary) == {"download": "cached", "validate": "cached", "preprocess": "completed"}
    assert tree_state(synthetic_config.data_dir) == before


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_cached_stage_whose_files_are_damaged_is_recomputed(synthetic_config, damage):
    first = mnist_pipeline(config=synthetic_config, until="preprocess")
    parquet = Path(next(p for p in first["stages"]["preprocess"]["artifacts"] if p.endswith("train.parquet")))
    good = parquet.read_bytes()
    if damage == "delete":
        parquet.unlink()
    else:
        parquet.chmod(0o644)
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        parquet.write_bytes(bytes(data))

    summary = mnist_pipeline(config=synthetic_config, until="preprocess")

    assert states(summary) == {"download": "cached", "validate": "cached", "preprocess": "completed"}
    assert parquet.read_bytes() == good


def test_changed_parameter_reruns_that_stage_and_its_dependants_only(synthetic_config):
    mnist_pipeline(config=synthetic_config, until="preprocess")
    changed = synthetic_config.model_copy(update={"validation": synthetic_config.validation.model_copy(update={"train_count": None})})

    summary = mnist_pipeline(config=changed, until="preprocess")

    # preprocess takes the validation report, whose content the changed check alters: it runs again too.
    assert states(summary) == {"download": "cached", "validate": "completed", "preprocess": "completed"}


def test_changed_source_files_are_downloaded_again(synthetic_config, tmp_path):
    from synthetic import payloads, write_source

    mnist_pipeline(config=synthetic_config, until="download")
    digests = write_source(Path(synthetic_config.download.source), payloads(seed=7))
    changed = synthetic_config.model_copy(update={"download": synthetic_config.download.model_copy(update={"sha256": digests})})
    assert mnist_pipeline(config=changed, until="download")["stages"]["download"]["state"] == "completed"

    # The same config with the old pins would now fail on the changed files instead of serving a stale cache.
    with pytest.raises(PipelineError, match="--sha256 digest: expected"):
        mnist_pipeline(config=synthetic_config, until="download")


def test_failed_validation_stops_before_preprocess_and_keeps_earlier_artifacts(synthetic_config):
    mnist_pipeline(config=synthetic_config, until="preprocess")
    before = tree_state(synthetic_config.data_dir, synthetic_config.artifacts_dir)
    wrong = synthetic_config.model_copy(update={"validation": synthetic_config.validation.model_copy(update={"test_count": 51})})

    with pytest.raises(PipelineError, match=r"t10k-images-idx3-ubyte.gz: count: expected 51, found 50"):
        mnist_pipeline(config=wrong, until="preprocess")

    assert tree_state(synthetic_config.data_dir, synthetic_config.artifacts_dir) == before


def test_tensorflow_import_starts_early_only_when_training_will_follow(synthetic_config, monkeypatch):
    from tasks import keras_runtime

    calls = []
    monkeypatch.setattr(keras_runtime, "warm_up", lambda: calls.append("warm_up"))

    mnist_pipeline(config=synthetic_config, until="preprocess")
    assert calls == []  # no training in this run: nothing to warm up

    mnist_pipeline(config=synthetic_config, until="train", rerun=["preprocess"])
    # The recomputed stage before training started the import; cached stages did not.
    assert calls == ["warm_up"]

    calls.clear()
    mnist_pipeline(config=synthetic_config, until="train")
    assert calls == []  # all cached


def test_warm_up_imports_tensorflow_in_the_background():
    import subprocess
    import sys

    code = (
        "import sys, threading; from tasks import keras_runtime as k; k.warm_up(); "
        "assert any(t.name == 'import-tensorflow' for t in threading.enumerate()); "
        "k._warming.join(); assert 'tensorflow' in sys.modules and 'keras' in sys.modules; "
        "tf, keras = k.import_tensorflow(); print(tf.__name__, keras.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == ["tensorflow", "keras"]


def own_dataset_config(tmp_path, source, **dataset):
    from flows.config import PipelineConfig

    return PipelineConfig(
        data_dir=tmp_path / "data",
        artifacts_dir=tmp_path / "artifacts",
        download={"source": str(source), "mirrors": [], "retries": 0},
        dataset=dataset,
        train={"epochs": 3, "hidden_units": 16, "batch_size": 16, "learning_rate": 0.01, "jit_compile": False},
    )


def test_a_dataset_of_its_own_with_other_counts_and_three_named_classes_runs_end_to_end(tmp_path):
    import json

    from synthetic import write_source

    source = tmp_path / "shapes"
    write_source(source, n_train=90, n_test=30, num_classes=3)  # no SHA256SUMS, no pins, no flag but the source
    config = own_dataset_config(tmp_path, source, name="Shapes", num_classes=3, class_names=["circle", "square", "triangle"])
    summary = mnist_pipeline(config=config)
    assert set(states(summary).values()) == {"completed"}
    validation = json.loads(artifact(summary, "validate", "validation.json").read_text())
    assert validation["num_classes"] == 3 and validation["source"]["pinned_by"] == []
    assert {s: v["count"] for s, v in validation["splits"].items()} == {"train": 90, "test": 30}
    metrics = json.loads(next(Path(p) for p in summary["stages"]["evaluate"]["artifacts"] if p.endswith("metrics.json")).read_text())
    assert len(metrics["confusion_matrix"]) == 3 and metrics["num_test"] == 30
    report = Path(summary["report"]).with_suffix(".md").read_text()
    assert "Shapes" in report and "MNIST" not in report
    assert all(name in report for name in ("circle", "square", "triangle"))


def test_a_ten_class_dataset_that_is_not_mnist_is_titled_dataset(tmp_path):
    from synthetic import write_source

    source = tmp_path / "digits"
    write_source(source, n_train=120, n_test=40)
    summary = mnist_pipeline(config=own_dataset_config(tmp_path, source))
    report = Path(summary["report"]).with_suffix(".md").read_text()
    assert "MNIST digits" not in report and "dataset" in report


def test_the_same_files_from_another_folder_keep_training_cached(tmp_path):
    import shutil

    from synthetic import write_source

    write_source(tmp_path / "a", n_train=90, n_test=30)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    mnist_pipeline(config=own_dataset_config(tmp_path, tmp_path / "a"), until="train")
    moved = mnist_pipeline(config=own_dataset_config(tmp_path, tmp_path / "b"), until="train")
    # The raw artifact is named by the payloads' digests: the same content, so nothing after the download reruns.
    assert states(moved) == {"download": "completed", "validate": "cached", "preprocess": "cached", "train": "cached"}
