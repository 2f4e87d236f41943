"""The train stage on real TensorFlow: its files, per-epoch logging, repeatable training and a model that learns,
both models, early stopping, and resuming a killed training."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from conftest import tree_state
from synthetic import processed_ref
from tasks.artifacts import intact_files
from tasks.layout import CONFIG_FILE, HISTORY_FILE, MODEL_FILE
from tasks.models import TrainConfig
from tasks.train import fit_model, state_folder

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
    assert config["model"] == "mlp" and config["jit_compile"] is True and config["num_classes"] == 10
    # Only the chosen model's knobs: a cnn knob in an mlp's config would be noise (and a cache-key change).
    assert not {"filters", "dense_units", "dropout"} & set(config)
    layers = config["architecture"]["layers"]
    assert [(layer["type"], layer["output_shape"]) for layer in layers] == [("Dense", [None, 16]), ("Dense", [None, 10])]
    assert config["architecture"]["parameters"] == 784 * 16 + 16 + 16 * 10 + 10 == sum(layer["parameters"] for layer in layers)
    assert config["processed_digest"] == processed.digest and config["train_rows"] == 200
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", config["tensorflow_version"])
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", config["keras_version"])


def test_history_has_one_entry_per_epoch_and_the_timings_are_in_the_meta(trained):
    ref, _, _ = trained
    history = json.loads(ref.path(HISTORY_FILE).read_text())
    for key in ("loss", "accuracy"):
        assert len(history[key]) == SMALL["epochs"] and all(isinstance(v, float) for v in history[key])
    assert len(ref.meta["epoch_seconds"]) == SMALL["epochs"]
    assert "val_loss" not in history and "epoch_seconds" not in history and "fit_seconds" not in history
    assert history["loss"][-1] < history["loss"][0]
    assert 0 < sum(ref.meta["epoch_seconds"]) <= ref.meta["fit_seconds"] + 0.01
    assert ref.meta["train_loss"] == history["loss"][-1] and ref.meta["train_accuracy"] == history["accuracy"][-1]
    assert ref.meta["epochs"] == SMALL["epochs"] and ref.meta["resumed_from_epoch"] is None
    assert (history["epochs_run"], history["best_epoch"], history["stopped_early"]) == (4, 4, False)


def test_logs_one_line_and_reports_progress_per_epoch(trained):
    ref, lines, calls = trained
    history = json.loads(ref.path(HISTORY_FILE).read_text())
    *epochs, done = lines
    assert len(epochs) == SMALL["epochs"]
    assert done == f"trained mlp in {ref.meta['fit_seconds']:.1f} s: loss {history['loss'][-1]:.4f}, accuracy " \
                   f"{history['accuracy'][-1]:.4f}"
    for epoch, line in enumerate(epochs, 1):
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
    assert re.fullmatch(r"epoch 2/2: loss \S+, accuracy \S+, val_loss \S+, val_accuracy \S+, \S+ s", lines[-2]), lines[-2]
    assert ref.meta["val_accuracy"] == history["val_accuracy"][-1]
    assert json.loads(ref.path(CONFIG_FILE).read_text())["train_rows"] == 200


def test_without_xla_training_is_repeatable_too_and_a_rerun_keeps_an_intact_folder_but_replaces_a_damaged_one(processed, tmp_path):
    config = TrainConfig(**{**SMALL, "epochs": 2, "jit_compile": False})
    first = fit_model(processed, tmp_path, config)
    folder = first.path(MODEL_FILE).parent
    published = tree_state(folder)
    first_history = first.path(HISTORY_FILE).read_bytes()

    again = fit_model(processed, tmp_path, config)
    assert again.digest == first.digest and again.path(MODEL_FILE) == first.path(MODEL_FILE)
    # Same digest, other timings: the intact folder stays as it was, the rerun's files are not written over it.
    assert tree_state(folder) == published and again.path(HISTORY_FILE).read_bytes() == first_history
    assert again.problem() is None
    # The same model is the same bytes (no timings, no save date): runs that publish it at once write identical files.
    elsewhere = fit_model(processed, tmp_path / "elsewhere", config)
    assert {name: elsewhere.path(name).read_bytes() for name in elsewhere.files} == {
        name: first.path(name).read_bytes() for name in first.files}
    shutil.rmtree(tmp_path / "elsewhere")

    model = bytearray(first.path(MODEL_FILE).read_bytes())
    model[len(model) // 2] ^= 0xFF
    first.path(MODEL_FILE).write_bytes(bytes(model))
    replaced = fit_model(processed, tmp_path, config)
    # Same digest, damaged folder: the rerun's files take its place, intact and matching their manifest.
    assert replaced.digest == first.digest and replaced.path(MODEL_FILE) == first.path(MODEL_FILE)
    assert replaced.problem() is None and intact_files(folder) is not None
    assert json.loads(replaced.path(HISTORY_FILE).read_text())["loss"] == json.loads(first_history)["loss"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_defaults_are_the_reference_hyperparameters():
    config = TrainConfig().resolved()
    assert config.model == "mlp"
    assert (config.epochs, config.batch_size, config.learning_rate, config.hidden_units) == (5, 128, 0.001, 512)
    assert config.validation_split == 0.0 and config.patience is None
    assert config.filters is None and config.dense_units is None


def test_each_model_has_its_own_defaults_and_only_its_knobs_resolve():
    cnn = TrainConfig(model="cnn").resolved()
    assert (cnn.filters, cnn.dense_units, cnn.dropout, cnn.hidden_units) == (32, 128, 0.5, None)
    assert cnn.jit_compile is False and cnn.epochs >= 1
    # Giving a default explicitly is the same training as leaving it out.
    assert TrainConfig(model="cnn", filters=32, epochs=cnn.epochs).resolved() == cnn
    assert TrainConfig(model="cnn", filters=16).resolved() != cnn


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
        {"model": "resnet"},
        {"patience": 0, "validation_split": 0.2},
        {"model": "cnn", "dropout": 1.0},
    ],
)
def test_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValidationError):
        TrainConfig(**bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"model": "cnn", "hidden_units": 64}, "hidden_units: a knob of model mlp, not of model cnn"),
        ({"filters": 8}, "filters: a knob of model cnn, not of model mlp"),
        ({"patience": 2}, "patience: early stopping watches the validation loss; it needs validation_split > 0"),
    ],
)
def test_config_says_which_setting_does_not_fit(bad, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        TrainConfig(**bad)


def test_importing_the_stage_does_not_import_tensorflow():
    code = "import sys, tasks.train; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


CNN = {"model": "cnn", "epochs": 3, "batch_size": 20, "filters": 4, "dense_units": 16, "dropout": 0.25, "learning_rate": 0.01, "seed": 7}


def test_cnn_trains_learns_and_is_repeatable(processed, tmp_path):
    import keras

    first = fit_model(processed, tmp_path / "a", TrainConfig(**CNN))
    again = fit_model(processed, tmp_path / "b", TrainConfig(**CNN))
    assert first.meta["model"] == "cnn" and first.meta["train_accuracy"] > 0.5  # chance: 0.1
    assert again.digest == first.digest
    assert all(np.array_equal(a, b) for a, b in zip(weights(first), weights(again), strict=True))
    config = json.loads(first.path(CONFIG_FILE).read_text())
    types = [layer["type"] for layer in config["architecture"]["layers"]]
    assert types.count("Conv2D") == 2 and types.count("MaxPooling2D") == 2 and types[-1] == "Dense"
    assert (config["filters"], config["dense_units"], config["dropout"], config["jit_compile"]) == (4, 16, 0.25, False)
    saved = keras.saving.load_model(first.path(MODEL_FILE), compile=False, safe_mode=True)
    assert config["architecture"]["parameters"] == saved.count_params()
    other = fit_model(processed, tmp_path / "c", TrainConfig(**{**CNN, "filters": 6}))
    assert other.digest != first.digest


def test_num_classes_sizes_the_output_layer(tmp_path):
    ref = fit_model(processed_ref(tmp_path / "p"), tmp_path / "m", TrainConfig(**{**SMALL, "epochs": 1}), num_classes=12)
    assert json.loads(ref.path(CONFIG_FILE).read_text())["architecture"]["layers"][-1]["output_shape"] == [None, 12]


def overfitting_ref(root: Path):
    """Synthetic splits whose last quarter (the validation rows) has shuffled labels: the validation loss rises."""
    import pyarrow.parquet as pq

    from synthetic import make_split
    from tasks.artifacts import publish
    from tasks.files import new_workdir
    from tasks.preprocess import to_table

    work = new_workdir(root)
    for split, n, seed in (("train", 200, 0), ("test", 50, 1)):
        images, labels = make_split(n, seed)
        labels[150:] = np.random.default_rng(3).permutation(labels[150:])
        pq.write_table(to_table(images, labels, {"split": split}), work / f"{split}.parquet", compression="none")
    return publish("preprocess", work)


def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path):
    import keras

    from tasks.preprocess import load_split

    processed = overfitting_ref(tmp_path / "p")
    config = TrainConfig(**{**SMALL, "epochs": 30, "validation_split": 0.25, "patience": 2})
    ref = fit_model(processed, tmp_path / "m", config)
    history = json.loads(ref.path(HISTORY_FILE).read_text())
    assert history["stopped_early"] and history["epochs_run"] < 30 == history["epochs"]
    assert len(history["val_loss"]) == history["epochs_run"] == ref.meta["epochs"]
    best = int(np.argmin(history["val_loss"])) + 1
    assert history["best_epoch"] == best == ref.meta["best_epoch"] and history["epochs_run"] == best + 2
    # The saved model is the best epoch's: its loss on the validation rows is that epoch's val_loss, not the last's.
    x, y = load_split(processed.path("train.parquet"))
    model = keras.saving.load_model(ref.path(MODEL_FILE), compile=False, safe_mode=True)
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y[150:], model(x[150:], training=False))))
    assert loss == pytest.approx(history["val_loss"][best - 1], rel=1e-4)
    assert loss != pytest.approx(history["val_loss"][-1], rel=1e-4)
    assert ref.meta["train_accuracy"] == history["accuracy"][best - 1]


KILL_AFTER_SECOND_EPOCH = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from tasks.artifacts import ArtifactRef
    from tasks.train import TrainConfig, fit_model

    def progress(done, total, logs):
        if done == 2:  # epoch 2 is recorded, its backup not yet written: the last backup is epoch 1's
            os.kill(os.getpid(), signal.SIGKILL)

    processed = ArtifactRef.model_validate_json({processed!r})
    fit_model(processed, Path({out!r}), TrainConfig(**{config!r}), progress=progress, state_dir=Path({state!r}))
""")


def test_a_training_killed_after_its_first_epoch_resumes_from_it(processed, tmp_path):
    config = {**SMALL, "epochs": 3}
    state = state_folder(tmp_path / "artifacts", processed, TrainConfig(**config), 10)
    code = KILL_AFTER_SECOND_EPOCH.format(tests=str(Path(__file__).parent), processed=processed.model_dump_json(),
                                          out=str(tmp_path / "models"), config=config, state=str(state))
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((state / "state.json").read_text())["epoch"] == 1
    assert not list((tmp_path / "models").glob("[!.]*")), "nothing published by the killed run"

    lines = []
    ref = fit_model(processed, tmp_path / "models", TrainConfig(**config), log=lines.append, state_dir=state)
    assert lines[0] == f"resuming from epoch 1/3 of an interrupted training (state in {state})"
    assert [line.split(":")[0] for line in lines[1:3]] == ["epoch 2/3", "epoch 3/3"]
    assert lines[3].startswith("trained mlp in ") and len(lines) == 4
    history = json.loads(ref.path(HISTORY_FILE).read_text())
    assert ref.meta["resumed_from_epoch"] == 1 and history["epochs_run"] == 3
    assert len(history["loss"]) == len(ref.meta["epoch_seconds"]) == 3
    assert ref.meta["train_accuracy"] > 0.8
    assert not state.exists(), "the resume state is removed once the model is published"
