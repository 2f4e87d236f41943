"""Evaluate stage: score the trained model on the test split and write metrics and per-image predictions.

TensorFlow is imported inside the functions that need it, so importing this module (or a fully cached run) stays
cheap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import data_version
from tasks.errors import Log, quiet
from tasks.files import workdir, write_json
from tasks.keras_runtime import import_tensorflow
from tasks.layout import HISTORY_FILE, METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE
from tasks.models import LOSS, class_probabilities, load_model
from tasks.preprocess import load_holdout

SCHEMA_VERSION = 1
FIRST = 20
MAX_MISCLASSIFIED = 25
# A judgment call: the tutorial calls its gap of about 1 point overfitting; under half a point we do not. The train
# accuracy Keras reports is a mean over the last epoch while the weights still move, so small gaps mean little.
OVERFITTING_GAP = 0.005
PREDICTIONS_SCHEMA = pa.schema([pa.field(name, kind, nullable=False) for name, kind in (
    ("index", pa.int32()), ("label", pa.uint8()), ("predicted", pa.uint8()), ("confidence", pa.float32()))])


def score_model(model: ArtifactRef, processed: ArtifactRef, out_dir: Path, batches: Sequence[ArtifactRef] = (),
                log: Log = quiet) -> ArtifactRef:
    """Evaluate the model of `model` on the holdout: `test.parquet` of `processed` and the holdout share of each
    accepted batch (tasks.batches); publish metrics (with each batch's slice) and predictions under `out_dir`."""
    started = time.perf_counter()
    _, keras = import_tensorflow()
    x, y = load_holdout(processed, batches)
    history = json.loads(model.path(HISTORY_FILE).read_text())
    probabilities = class_probabilities(load_model(model.path(MODEL_FILE)), x)
    predicted = probabilities.argmax(axis=1).astype(np.uint8)
    confidence = probabilities.max(axis=1).astype(np.float32)
    # The loss the model was trained with (Keras's own function), averaged over the images.
    losses = keras.losses.get(LOSS)(y.astype(np.int32), probabilities)
    best = history["best_epoch"] - 1  # the epoch whose weights were kept (early stopping keeps the best, not the last)
    metrics = build_metrics(y, predicted, confidence, num_classes=int(probabilities.shape[1]),
                            test_loss=float(np.mean(np.asarray(losses), dtype=np.float64)),
                            test_accuracy=float(np.mean(predicted == y)),
                            train_loss=float(history["loss"][best]), train_accuracy=float(history["accuracy"][best]))
    # The holdout's version: that of the data the challenger was trained on, so champion and challenger are judged on
    # the same images (tasks.promote).
    metrics.update(model_digest=model.digest, data_digest=processed.digest, data_version=data_version(processed, batches))
    if batches:  # each part of the holdout on its own: how the model does on the newest data
        sizes = [len(y) - sum(b.meta["holdout"] for b in batches), *(b.meta["holdout"] for b in batches)]
        bounds = np.cumsum([0, *sizes])
        names = ["base", *(b.meta["name"] for b in batches)]
        metrics["holdout_slices"] = [  # a list: metrics.json sorts the keys of objects
            {"name": name, "images": int(end - start),
             "accuracy": float(np.mean(predicted[start:end] == y[start:end])) if end > start else None}
            for name, start, end in zip(names, bounds[:-1], bounds[1:])]
    log(f"test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f} on {metrics['num_test']} "
        f"images; {metrics['misclassified']['count']} misclassified; first {FIRST} predictions "
        + " ".join(map(str, metrics["first_20_predictions"])))

    table = pa.Table.from_arrays([pa.array(np.arange(len(y), dtype=np.int32)), pa.array(y, pa.uint8()),
                                  pa.array(predicted), pa.array(confidence)], schema=PREDICTIONS_SCHEMA)
    meta = {name: metrics[name] for name in ("test_accuracy", "test_loss", "first_20_predictions")}
    # Not part of the digest (the files are): how long scoring took, for the sweep's engine overhead.
    meta["seconds"] = round(time.perf_counter() - started, 3)
    with workdir(out_dir) as work:
        write_json(work / METRICS_FILE, metrics)
        pq.write_table(table, work / PREDICTIONS_FILE, compression="none")
        return publish("evaluate", work, meta=meta)


def build_metrics(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, *, num_classes: int,
                  test_loss: float, test_accuracy: float, train_loss: float, train_accuracy: float) -> dict[str, Any]:
    """Return the metrics document (plain JSON types) from labels, predicted classes and their confidences."""
    labels = labels.astype(np.int64)
    predicted = predicted.astype(np.int64)
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)
    wrong = np.flatnonzero(labels != predicted)
    gap = train_accuracy - test_accuracy
    return {
        "schema_version": SCHEMA_VERSION,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "accuracy_gap": gap,
        "overfitting": overfitting_remark(train_accuracy, test_accuracy),
        "num_test": int(len(labels)),
        "first_20_predictions": [int(v) for v in predicted[:FIRST]],
        "first_20_labels": [int(v) for v in labels[:FIRST]],
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class(confusion),
        "misclassified": {"count": int(len(wrong)), "first": [
            {"index": int(i), "label": int(labels[i]), "predicted": int(predicted[i]),
             "confidence": float(confidence[i])} for i in wrong[:MAX_MISCLASSIFIED]]},
    }


def per_class(confusion: np.ndarray) -> dict[str, dict[str, Any]]:
    """Return precision, recall, F1 and support of each class from a confusion matrix (rows true, columns predicted)."""
    out = {}
    for c in range(len(confusion)):
        hits, support, predicted = int(confusion[c, c]), int(confusion[c].sum()), int(confusion[:, c].sum())
        # A class never predicted (or never present) scores 0.0 rather than NaN, which JSON cannot hold.
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[str(c)] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def overfitting_remark(train_accuracy: float, test_accuracy: float) -> str:
    """Return one sentence on the train/test accuracy gap, in the spirit of the tutorial's remark."""
    gap = train_accuracy - test_accuracy
    head = f"Test accuracy {test_accuracy:.2%} vs training accuracy {train_accuracy:.2%}"
    if gap > OVERFITTING_GAP:
        return (f"{head}: a gap of {gap * 100:.2f} points, an example of overfitting "
                "(models do worse on new data than on their training data).")
    if gap > 0:
        return f"{head}: a gap of only {gap * 100:.2f} points, little sign of overfitting."
    return f"{head}: no gap, no sign of overfitting."
