"""The report's inputs: one object read from the upstream artifacts, with the values the templates derive from them."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.artifacts import TRAINING_FACTS, ArtifactRef
from tasks.dataset import BY_MNIST, BY_SUMS, BY_USER, DatasetConfig
from tasks.errors import PipelineError
from tasks.layout import CONFIG_FILE, HISTORY_FILE, METRICS_FILE, PREDICTIONS_FILE, SPLIT_FILES, VALIDATION_FILE
from tasks.preprocess import load_holdout
from tasks.storage import read_bytes

GALLERY_MAX = 30  # misclassified images shown, the first by test index
# What pinned the payloads (validation.json's source.pinned_by), in words; another value is shown as it is.
PIN_WORDS = {
    BY_MNIST: "MNIST's published SHA-256 digests",
    BY_SUMS: "the SHA256SUMS file of the source",
    BY_USER: "the SHA-256 digests given with --sha256",
}
# config.json entries with a section of their own rather than a row of the configuration table.
OWN_SECTION = ("architecture",)


@dataclass(frozen=True)
class Classes:
    """What the report calls the dataset and each of its classes (in label order)."""

    title: str
    names: tuple[str, ...]
    named: bool  # whether the names were configured (else they are the labels themselves)

    @classmethod
    def of(cls, title: str, class_names: Sequence[str] | None, num_classes: int) -> Classes:
        """Return the classes of data with `num_classes` classes: `class_names` (one per class), or the labels."""
        if class_names is None:
            return cls(title, tuple(str(c) for c in range(num_classes)), named=False)
        if len(class_names) != num_classes:
            raise PipelineError(f"dataset class_names: expected {num_classes} names (one per class the model was "
                                f"trained and evaluated on), found {len(class_names)}")
        return cls(title, tuple(class_names), named=True)

    def name(self, label: Any) -> str:
        """Return the name of a class label (an int or its string)."""
        return self.names[int(label)]


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
    dataset: DatasetConfig = field(default_factory=DatasetConfig)

    @cached_property
    def num_classes(self) -> int:
        """The number of classes the model was evaluated on (the size of the confusion matrix)."""
        return len(self.metrics["confusion_matrix"])

    @cached_property
    def is_mnist(self) -> bool:
        """Whether the raw files are MNIST's (their payload digests are MNIST's)."""
        return bool(self.source["mnist"])

    @cached_property
    def classes(self) -> Classes:
        """The dataset's title and class names."""
        # Without configured names the classes are called by their labels, whatever `dataset.num_classes` says.
        return Classes.of(self.dataset.title(self.is_mnist), self.dataset.class_names, self.num_classes)

    @cached_property
    def source(self) -> dict[str, Any]:
        """Where the raw files came from: location, payload digests, what pinned them, whether they are MNIST's."""
        return self.validation["source"]

    @cached_property
    def pinned_by(self) -> list[str]:
        """What pinned the payloads' digests, in words (empty: nothing did)."""
        return [PIN_WORDS.get(by, by) for by in self.source["pinned_by"]]

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
    def class_labels(self) -> list[str]:
        """The class labels counted in any split, in numeric order."""
        return sorted({c for s in self.splits.values() for c in s["class_counts"]}, key=int)

    @cached_property
    def pixels(self) -> int:
        """Values per image after preprocessing (the flattened image)."""
        return int(self.test_images.shape[1])

    @cached_property
    def layers(self) -> list[dict[str, Any]]:
        """The model's layers as the train stage described them: name, type, output shape, parameters."""
        return list(self.config["architecture"]["layers"])

    @cached_property
    def architecture_sketch(self) -> str:
        """The layers in order with their output shapes (batch dimension left out), e.g. `Dense (32) -> Dense (10)`."""
        return " → ".join(f"{layer['type']} ({layer_shape(layer['output_shape'])})" for layer in self.layers)

    @cached_property
    def steps_per_epoch(self) -> int:
        """Batches per training epoch: the fit keeps ceil(n * (1 - validation_split)) rows, as Keras does."""
        c = self.config
        return math.ceil(math.ceil(c["train_rows"] * (1 - c["validation_split"])) / c["batch_size"])

    @cached_property
    def config_rows(self) -> list[tuple[str, Any]]:
        """The training config as (dotted key, value) rows; non-string values as JSON."""
        return _flatten({key: value for key, value in self.config.items() if key not in OWN_SECTION})

    @cached_property
    def input_digests(self) -> list[tuple[str, str]]:
        """The digest of each input artifact, then the upstream digests recorded inside them."""
        return [*self.digests.items(), ("raw data", self.validation["raw_digest"]),
                ("evaluation model digest", self.metrics["model_digest"]),
                ("evaluation data digest", self.metrics["data_digest"])]


def layer_shape(shape: list[int | None]) -> str:
    """Return a layer's output shape without its batch dimension, e.g. `26 x 26 x 4`."""
    return " x ".join("?" if d is None else str(d) for d in shape[1:])


def load_context(validation: ArtifactRef, processed: ArtifactRef, model: ArtifactRef, evaluation: ArtifactRef,
                 dataset: DatasetConfig | None = None, batches: Sequence[ArtifactRef] = ()) -> ReportContext:
    """Read the report's inputs from the upstream artifacts and check that they describe the same test set (the
    holdout: the base test split and the accepted batches' holdout shares)."""
    test_path = processed.path(SPLIT_FILES["test"])
    images, labels = load_holdout(processed, batches)
    columns = ["index", "label", "predicted", "confidence"]
    ctx = ReportContext(
        validation=read_json(validation.path(VALIDATION_FILE)),
        # With this run's training facts, which the model's reference carries (tasks.train.fit_model).
        history={**read_json(model.path(HISTORY_FILE)),
                 **{key: model.meta[key] for key in TRAINING_FACTS if key in model.meta}},
        config=read_json(model.path(CONFIG_FILE)),
        metrics=read_json(evaluation.path(METRICS_FILE)),
        test_images=images,
        predictions=pd.read_parquet(evaluation.path(PREDICTIONS_FILE), columns=columns),
        digests={"validation": validation.digest, "processed": processed.digest, "model": model.digest,
                 "evaluation": evaluation.digest},
        dataset=dataset or DatasetConfig(),
    )
    # The figures pair images from the processed split with labels from the evaluation: a mix-up of artifacts would
    # draw images under the wrong labels without any error, so refuse it here.
    first, expected = [int(v) for v in ctx.metrics["first_20_labels"]], [int(v) for v in labels[:20]]
    if first != expected:
        raise PipelineError(f"{evaluation.path(METRICS_FILE)}: first_20_labels {first} do not match the labels of "
                            f"{test_path} {expected}; the evaluation was made on other data")
    index, label = ctx.predictions["index"].to_numpy(), ctx.predictions["label"].to_numpy()
    if len(index) and (index.max() >= len(labels) or not np.array_equal(labels[index], label)):
        raise PipelineError(f"{evaluation.path(PREDICTIONS_FILE)}: labels do not match {test_path}")
    for path, document in ((model.path(CONFIG_FILE), ctx.config), (validation.path(VALIDATION_FILE), ctx.validation)):
        if document["num_classes"] != ctx.num_classes:
            raise PipelineError(f"{path}: num_classes {document['num_classes']}, but {evaluation.path(METRICS_FILE)} "
                                f"has a confusion matrix of {ctx.num_classes} classes; the artifacts are of other runs")
    ctx.classes  # noqa: B018 (a name count that does not fit the data fails here, before anything is drawn)
    return ctx


def per_class_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """Return precision, recall, F1 (float) and support (int) of each class of a metrics document, by class."""
    columns = ["precision", "recall", "f1", "support"]
    frame = pd.DataFrame.from_dict(metrics["per_class"], orient="index", columns=columns)
    frame.index = frame.index.astype(int).rename("class")
    return frame.sort_index().astype({"precision": float, "recall": float, "f1": float, "support": int})


def read_json(path: Path) -> Any:
    """Return the JSON document in a file (or an object on object storage)."""
    return json.loads(read_bytes(path))


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    return [(prefix, value if isinstance(value, str) else json.dumps(value))]
