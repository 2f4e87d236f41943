"""The report's inputs: one object read from the upstream artifacts, with the values the templates derive from them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core import ArtifactRef, PipelineError
from tasks.evaluate import METRICS_FILE, PREDICTIONS_FILE
from tasks.preprocess import SPLIT_FILES, load_split
from tasks.train import CONFIG_FILE, HISTORY_FILE
from tasks.validate import VALIDATION_FILE

GALLERY_MAX = 30  # misclassified digits shown, the first by test index


@dataclass(frozen=True)
class ReportContext:
    """Everything the report shows, as the upstream stages wrote it, and what is derived from it."""

    validation: dict[str, Any]
    history: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    test_images: np.ndarray  # (n, 784) float32 in [0, 1]
    predictions: pd.DataFrame  # predictions.parquet: index, label, predicted, confidence
    digests: dict[str, str]  # input artifact -> content digest

    @cached_property
    def per_class(self) -> pd.DataFrame:
        """Per-class precision, recall, F1 and support, by class."""
        return per_class_frame(self.metrics)

    @cached_property
    def gallery(self) -> pd.DataFrame:
        """The misclassified predictions shown in the gallery."""
        p = self.predictions
        return p[p["label"] != p["predicted"]].sort_values("index", kind="stable").head(GALLERY_MAX)

    @cached_property
    def splits(self) -> dict[str, dict[str, Any]]:
        """The validation summary of each split, train first as in the tutorial (validation.json sorts its keys)."""
        splits = self.validation["splits"]
        return {name: splits[name] for name in sorted(splits, key=lambda s: (s != "train", s != "test", s))}

    @cached_property
    def classes(self) -> list[str]:
        """The class labels counted in any split, in numeric order."""
        return sorted({c for s in self.splits.values() for c in s["class_counts"]}, key=lambda c: (len(c), c))

    @cached_property
    def hidden_layers(self) -> list[int]:
        """The units of each hidden layer."""
        return [self.config["hidden_units"]]

    @cached_property
    def steps_per_epoch(self) -> int:
        """Batches per training epoch: the fit keeps ceil(n * (1 - validation_split)) rows, as Keras does."""
        c = self.config
        return math.ceil(math.ceil(c["train_rows"] * (1 - c["validation_split"])) / c["batch_size"])

    @cached_property
    def config_rows(self) -> list[tuple[str, Any]]:
        """The training config as (dotted key, value) rows; non-string values as JSON."""
        return _flatten(self.config)

    @cached_property
    def input_digests(self) -> list[tuple[str, str]]:
        """The digest of each input artifact, then the upstream digests recorded inside them."""
        return [*self.digests.items(), ("raw data", self.validation["raw_digest"]),
                ("evaluation model digest", self.metrics["model_digest"]),
                ("evaluation data digest", self.metrics["data_digest"])]


def load_context(validation: ArtifactRef, processed: ArtifactRef, model: ArtifactRef, evaluation: ArtifactRef) -> ReportContext:
    """Read the report's inputs from the upstream artifacts and check that they describe the same test set."""
    test_path = processed.path(SPLIT_FILES["test"])
    images, labels = load_split(test_path)
    columns = ["index", "label", "predicted", "confidence"]
    ctx = ReportContext(
        validation=read_json(validation.path(VALIDATION_FILE)),
        history=read_json(model.path(HISTORY_FILE)),
        config=read_json(model.path(CONFIG_FILE)),
        metrics=read_json(evaluation.path(METRICS_FILE)),
        test_images=images,
        predictions=pd.read_parquet(evaluation.path(PREDICTIONS_FILE), columns=columns),
        digests={"validation": validation.digest, "processed": processed.digest, "model": model.digest,
                 "evaluation": evaluation.digest},
    )
    # The figures pair images from the processed split with labels from the evaluation: a mix-up of artifacts would
    # draw digits under the wrong labels without any error, so refuse it here.
    first, expected = [int(v) for v in ctx.metrics["first_20_labels"]], [int(v) for v in labels[:20]]
    if first != expected:
        raise PipelineError(f"{evaluation.path(METRICS_FILE)}: first_20_labels {first} do not match the labels of "
                            f"{test_path} {expected}; the evaluation was made on other data")
    index, label = ctx.predictions["index"].to_numpy(), ctx.predictions["label"].to_numpy()
    if len(index) and (index.max() >= len(labels) or not np.array_equal(labels[index], label)):
        raise PipelineError(f"{evaluation.path(PREDICTIONS_FILE)}: labels do not match {test_path}")
    return ctx


def per_class_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """Return precision, recall, F1 (float) and support (int) of each class of a metrics document, by class."""
    columns = ["precision", "recall", "f1", "support"]
    frame = pd.DataFrame.from_dict(metrics["per_class"], orient="index", columns=columns)
    frame.index = frame.index.astype(int).rename("class")
    return frame.sort_index().astype({"precision": float, "recall": float, "f1": float, "support": int})


def read_json(path: Path) -> Any:
    """Return the JSON document in a file."""
    return json.loads(Path(path).read_text())


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    return [(prefix, value if isinstance(value, str) else json.dumps(value))]
