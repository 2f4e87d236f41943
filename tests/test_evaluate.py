"""The evaluate stage on real TensorFlow: the metrics.json contract, consistent counts and repeatable output."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthetic import make_split, processed_ref
from tasks.evaluate import build_metrics, overfitting_remark, per_class, score_model
from tasks.layout import HISTORY_FILE, METRICS_FILE, PREDICTIONS_FILE
from tasks.models import TrainConfig
from tasks.train import fit_model

N_TEST = 60
KEYS = {
    "schema_version", "test_loss", "test_accuracy", "train_loss", "train_accuracy", "accuracy_gap", "overfitting",
    "num_test", "first_20_predictions", "first_20_labels", "confusion_matrix", "per_class", "misclassified",
    "model_digest", "data_digest", "data_version",
}


def plain(value):
    """Return True if a value is made of plain JSON types only (no numpy scalars or arrays)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    processed = processed_ref(root / "processed", n_test=N_TEST)
    config = TrainConfig(epochs=4, batch_size=20, hidden_units=16, learning_rate=0.01, seed=7)
    model = fit_model(processed, root / "models", config)
    lines = []
    ref = score_model(model, processed, root / "evaluation", log=lines.append)
    metrics = json.loads(ref.path(METRICS_FILE).read_text())
    return model, processed, ref, metrics, lines, root


def test_writes_metrics_and_predictions(evaluated):
    _, _, ref, metrics, lines, _ = evaluated
    assert ref.stage == "evaluate" and set(ref.files) == {METRICS_FILE, PREDICTIONS_FILE} and ref.problem() is None
    assert set(metrics) == KEYS and metrics["schema_version"] == 1
    assert ref.meta == {**{k: metrics[k] for k in ("test_accuracy", "test_loss", "first_20_predictions")},
                        "seconds": ref.meta["seconds"]}
    assert ref.meta["seconds"] > 0
    assert plain(ref.meta)
    assert len(lines) == 1 and f"test accuracy {metrics['test_accuracy']:.4f}" in lines[0]


def test_metric_types_and_digests(evaluated):
    model, processed, _, m, _, _ = evaluated
    for key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy", "accuracy_gap"):
        assert isinstance(m[key], float), key
    assert isinstance(m["num_test"], int) and m["num_test"] == N_TEST
    assert isinstance(m["overfitting"], str) and m["overfitting"].endswith(".")
    assert (m["model_digest"], m["data_digest"]) == (model.digest, processed.digest)
    assert m["data_version"] == {"base": processed.digest, "batches": []}  # the holdout it scored: no batches


def test_learned_model_is_well_above_chance(evaluated):
    _, _, _, m, _, _ = evaluated
    assert m["test_accuracy"] > 0.8 and m["test_loss"] > 0


def test_train_metrics_and_gap_come_from_the_history(evaluated):
    model, _, _, m, _, _ = evaluated
    history = json.loads(model.path(HISTORY_FILE).read_text())
    assert (m["train_loss"], m["train_accuracy"]) == (history["loss"][-1], history["accuracy"][-1])
    assert m["accuracy_gap"] == pytest.approx(m["train_accuracy"] - m["test_accuracy"])


def test_confusion_matrix_agrees_with_accuracy_and_per_class(evaluated):
    _, _, _, m, _, _ = evaluated
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == m["num_test"]
    assert np.trace(cm) / m["num_test"] == pytest.approx(m["test_accuracy"], abs=1e-6)
    _, labels = make_split(N_TEST, 1)
    assert cm.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()
    assert set(m["per_class"]) == {str(c) for c in range(10)}
    for c in range(10):
        stats = m["per_class"][str(c)]
        assert stats["support"] == cm[c].sum()
        assert stats["recall"] == pytest.approx(cm[c, c] / cm[c].sum())
        assert stats["precision"] == pytest.approx(cm[c, c] / cm[:, c].sum() if cm[:, c].sum() else 0.0)
        p, r = stats["precision"], stats["recall"]
        assert stats["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)


def test_predictions_parquet_matches_the_metrics(evaluated):
    _, _, ref, m, _, _ = evaluated
    table = pq.read_table(ref.path(PREDICTIONS_FILE))
    assert table.schema.names == ["index", "label", "predicted", "confidence"]
    assert [f.type for f in table.schema] == [pa.int32(), pa.uint8(), pa.uint8(), pa.float32()]
    p = {name: table.column(name).to_numpy() for name in table.column_names}
    _, labels = make_split(N_TEST, 1)
    assert table.num_rows == m["num_test"] and p["index"].tolist() == list(range(N_TEST))
    assert np.array_equal(p["label"], labels)
    assert np.all((p["confidence"] >= 0.1 - 1e-6) & (p["confidence"] <= 1.0 + 1e-6))
    assert np.mean(p["label"] == p["predicted"]) == pytest.approx(m["test_accuracy"], abs=1e-6)
    assert m["first_20_predictions"] == p["predicted"][:20].tolist()
    assert m["first_20_labels"] == labels[:20].tolist()
    wrong = np.flatnonzero(p["label"] != p["predicted"])
    assert m["misclassified"]["count"] == len(wrong) == m["num_test"] - np.trace(np.array(m["confusion_matrix"]))
    assert [e["index"] for e in m["misclassified"]["first"]] == wrong[:25].tolist()
    for e in m["misclassified"]["first"]:
        assert (e["label"], e["predicted"]) == (int(p["label"][e["index"]]), int(p["predicted"][e["index"]]))
        assert e["confidence"] == pytest.approx(float(p["confidence"][e["index"]]))


def test_rerun_gives_byte_identical_output_and_the_same_digest(evaluated):
    model, processed, ref, _, _, root = evaluated
    again = score_model(model, processed, root / "evaluation-again")
    assert again.digest == ref.digest
    for name in (METRICS_FILE, PREDICTIONS_FILE):
        assert again.path(name).read_bytes() == ref.path(name).read_bytes()


def test_build_metrics_returns_plain_types_and_zero_precision_for_unpredicted_classes():
    labels = np.array([0, 1, 2, 2, 3], np.uint8)
    predicted = np.array([0, 2, 2, 2, 0], np.uint8)  # classes 1 and 3 are never predicted
    confidence = np.array([0.9, 0.6, 0.8, 0.7, 0.5], np.float32)
    m = build_metrics(labels, predicted, confidence, num_classes=10, test_loss=0.5, test_accuracy=0.6,
                      train_loss=0.1, train_accuracy=0.99)
    assert plain(m)
    assert m["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["9"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["2"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert m["misclassified"] == {
        "count": 2,
        "first": [
            {"index": 1, "label": 1, "predicted": 2, "confidence": pytest.approx(0.6)},
            {"index": 4, "label": 3, "predicted": 0, "confidence": pytest.approx(0.5)},
        ],
    }
    assert m["first_20_predictions"] == [0, 2, 2, 2, 0] and m["num_test"] == 5


def test_per_class_on_a_perfect_confusion_matrix():
    stats = per_class(np.diag([3, 1, 0]))
    assert stats["0"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}
    assert stats["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_overfitting_remark_depends_on_the_gap():
    assert "overfitting" in overfitting_remark(0.989, 0.978) and "1.10 points" in overfitting_remark(0.989, 0.978)
    assert "little sign" in overfitting_remark(0.980, 0.978)
    assert "no sign" in overfitting_remark(0.97, 0.978)


def test_importing_the_stage_does_not_import_tensorflow():
    code = "import sys, tasks.evaluate; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_test_loss_and_accuracy_agree_with_keras_evaluate(evaluated):
    import keras

    from tasks.preprocess import load_split

    model, processed, _, metrics, _, _ = evaluated
    x, y = load_split(processed.path("test.parquet"))
    net = keras.saving.load_model(model.path("model.keras"), compile=False, safe_mode=True)
    net.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    expected = net.evaluate(x, y, verbose=0, return_dict=True)
    # Keras averages float32 batch means; this is one float64 mean of the same per-image losses.
    assert metrics["test_loss"] == pytest.approx(expected["loss"], rel=1e-3)
    assert metrics["test_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-7)
