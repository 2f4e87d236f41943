"""The train stage on real TensorFlow: its files, per-epoch logging, repeatable training and a model that learns."""

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from pydantic import ValidationError
from synthetic import processed_ref

from tasks.train import CONFIG_FILE, HISTORY_FILE, MODEL_FILE, TrainConfig, fit_model

# Small enough for a few seconds per fit, large enough to learn the synthetic bars well above chance.
SMALL = {"epochs": 4, "batch_size": 20, "hidden_units": 16, "learning_rate": 0.01, "seed": 7}


def weights(ref):
    import keras

    # Without compiling: Keras would warn that it cannot honour the saved jit_compile under op determinism.
    return keras.saving.load_model(ref.path(MODEL_FILE), compile=False, safe_mode=True).get_weights()


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    return processed_ref(tmp_path_factory.mktemp("processed"))


@pytest.fixture(scope="module")
def trained(processed, tmp_path_factory):
    """One small training run, with what it logged and reported, shared by the read-only tests."""
    lines, calls = [], []
    ref = fit_model(
        processed,
        tmp_path_factory.mktemp("models"),
        TrainConfig(**SMALL),
        log=lines.append,
        progress=lambda done, total, logs: calls.append((done, total, logs)),
    )
    return ref, lines, calls


def test_writes_model_history_and_config(trained, processed):
    ref, _, _ = trained
    assert ref.stage == "train" and set(ref.files) == {MODEL_FILE, HISTORY_FILE, CONFIG_FILE}
    assert ref.problem() is None
    config = json.loads(ref.path(CONFIG_FILE).read_text())
    assert {k: config[k] for k in SMALL} == SMALL
    assert config["jit_compile"] is True and "steps_per_execution" not in config
    assert config["processed_digest"] == processed.digest and config["train_rows"] == 200
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", config["tensorflow_version"])
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", config["keras_version"])


def test_history_has_one_entry_per_epoch_and_the_timings(trained):
    ref, _, _ = trained
    history = json.loads(ref.path(HISTORY_FILE).read_text())
    for key in ("loss", "accuracy", "epoch_seconds"):
        assert len(history[key]) == SMALL["epochs"] and all(isinstance(v, float) for v in history[key])
    assert "val_loss" not in history
    assert history["loss"][-1] < history["loss"][0]
    assert 0 < sum(history["epoch_seconds"]) <= history["fit_seconds"]
    assert ref.meta["train_loss"] == history["loss"][-1] and ref.meta["train_accuracy"] == history["accuracy"][-1]
    assert ref.meta["fit_seconds"] > 0 and ref.meta["epochs"] == SMALL["epochs"]


def test_logs_one_line_and_reports_progress_per_epoch(trained):
    ref, lines, calls = trained
    history = json.loads(ref.path(HISTORY_FILE).read_text())
    assert len(lines) == SMALL["epochs"]
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch {epoch}/4: loss \d+\.\d{{4}}, accuracy \d\.\d{{4}}, \d+\.\d s", line), line
        assert f"loss {history['loss'][epoch - 1]:.4f}," in line
    assert [(done, total) for done, total, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert calls[-1][2] == {"loss": history["loss"][-1], "accuracy": history["accuracy"][-1]}


def test_learns_the_synthetic_classes_well_above_chance(trained):
    ref, _, _ = trained
    assert ref.meta["train_accuracy"] > 0.8


def test_same_seed_gives_identical_history_and_weights(trained, processed, tmp_path):
    first, _, _ = trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Op determinism is on by now: XLA must still be used, or this run would differ from the first in the last bits.
        again = fit_model(processed, tmp_path, TrainConfig(**SMALL))
    assert not [w for w in caught if "jit_compile" in str(w.message)]
    metrics = ("loss", "accuracy")
    h1, h2 = (json.loads(r.path(HISTORY_FILE).read_text()) for r in (first, again))
    assert [h1[k] for k in metrics] == [h2[k] for k in metrics]
    assert all(np.array_equal(a, b) for a, b in zip(weights(first), weights(again), strict=True))
    # The digest leaves out timings and the save date, so a repeatable rerun keeps downstream stages cached.
    assert again.digest == first.digest


def test_another_seed_gives_other_weights(trained, processed, tmp_path):
    first, _, _ = trained
    other = fit_model(processed, tmp_path, TrainConfig(**{**SMALL, "seed": 8}))
    assert json.loads(other.path(HISTORY_FILE).read_text())["loss"] != json.loads(first.path(HISTORY_FILE).read_text())["loss"]
    assert not np.array_equal(weights(other)[0], weights(first)[0])
    assert other.digest != first.digest


def test_validation_split_adds_val_metrics_to_history_and_log(processed, tmp_path):
    lines = []
    ref = fit_model(processed, tmp_path, TrainConfig(**{**SMALL, "epochs": 2, "validation_split": 0.25}), log=lines.append)
    history = json.loads(ref.path(HISTORY_FILE).read_text())
    assert len(history["val_loss"]) == len(history["val_accuracy"]) == 2
    assert re.fullmatch(r"epoch 2/2: loss \S+, accuracy \S+, val_loss \S+, val_accuracy \S+, \S+ s", lines[-1]), lines[-1]
    assert ref.meta["val_accuracy"] == history["val_accuracy"][-1]
    assert json.loads(ref.path(CONFIG_FILE).read_text())["train_rows"] == 200


def test_without_xla_training_is_repeatable_too_and_a_rerun_replaces_the_folder(processed, tmp_path):
    config = TrainConfig(**{**SMALL, "epochs": 2, "jit_compile": False})
    first = fit_model(processed, tmp_path, config)
    first_history = json.loads(first.path(HISTORY_FILE).read_text())
    again = fit_model(processed, tmp_path, config)
    assert again.digest == first.digest and again.path(MODEL_FILE) == first.path(MODEL_FILE)
    # Same digest, new timings: the folder now holds the rerun's files, and its reference describes them.
    assert again.problem() is None
    assert json.loads(again.path(HISTORY_FILE).read_text())["loss"] == first_history["loss"]
    assert [p.name for p in tmp_path.iterdir()] == [first.path(MODEL_FILE).parent.name]


def test_defaults_are_the_reference_hyperparameters():
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.learning_rate, config.hidden_units) == (5, 128, 0.001, 512)
    assert config.validation_split == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": 0},
        {"hidden_units": 0},
        {"seed": -1},
        {"validation_split": 1.0},
        {"validation_split": -0.1},
        {"epoch": 3},  # a typo must not be silently ignored
    ],
)
def test_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValidationError):
        TrainConfig(**bad)


def test_importing_the_stage_does_not_import_tensorflow():
    code = "import sys, tasks.train; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_epoch_matches_keras_train_on_batch_including_the_short_last_batch(processed, tmp_path):
    import keras

    from tasks.preprocess import load_split
    from tasks.train import build_model

    # 200 rows in batches of 64: three full batches and a short one of 8, whose padding must not count.
    config = TrainConfig(epochs=1, batch_size=64, hidden_units=16, learning_rate=0.01, seed=7, jit_compile=False)
    ours = weights(fit_model(processed, tmp_path, config))

    x, y = load_split(processed.path("train.parquet"))
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.hidden_units)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss="sparse_categorical_crossentropy")
    order = np.random.default_rng(config.seed).permutation(len(x))
    for start in range(0, len(x), config.batch_size):
        batch = order[start : start + config.batch_size]
        model.train_on_batch(x[batch], y[batch])
    for a, b in zip(ours, model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
