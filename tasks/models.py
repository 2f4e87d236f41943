"""The networks the train stage can fit, each one's defaults, the training config, a description of a built model
from Keras, and loading a saved model and scoring images with it (one way for evaluate and predict).

Every model takes the flat rows of preprocessing (784 floats in [0, 1]) and ends in a softmax over the classes, so
evaluation, prediction and the report work the same for all of them.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.errors import PipelineError
from tasks.idx import IMAGE_SHAPE, PIXELS
from tasks.keras_runtime import deterministic_after, import_tensorflow

# Per model: its training defaults and its size knobs, each with its default. The train config's fields of the same
# names override them; a knob belongs to the models that list it.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 5, "batch_size": 128, "learning_rate": 0.001, "jit_compile": True, "hidden_units": 512},
    # XLA's convolutions are about 2x slower on CPU than TensorFlow's own kernels, and XLA has no deterministic max
    # pooling gradient (TensorFlow refuses it when op determinism is on).
    "cnn": {"epochs": 8, "batch_size": 128, "learning_rate": 0.001, "jit_compile": False,
            "filters": 32, "dense_units": 128, "dropout": 0.5},
}
MODEL_HELP = {
    "mlp": "the reference network: one dense ReLU layer, then a softmax",
    "cnn": "two convolution blocks with max pooling, a dense ReLU head with dropout, then a softmax",
}

# The loss every model is trained with; evaluate scores with the same function.
LOSS = "sparse_categorical_crossentropy"
# Images per call when scoring: each call is one run of Keras's compiled predict step; memory stays bounded by it.
SCORE_BATCH = 2048

# Settings every model has; the other entries of MODEL_DEFAULTS are size knobs of one model or another.
COMMON = ("epochs", "batch_size", "learning_rate", "jit_compile")
KNOBS = sorted({name for defaults in MODEL_DEFAULTS.values() for name in defaults} - set(COMMON))


class TrainConfig(BaseModel):
    """Which model to train, its hyperparameters, and the knobs that only change how fast it trains.

    Epochs, batch size, learning rate and the size knobs default to the chosen model's (tasks.models.MODEL_DEFAULTS);
    `resolved()` fills them in, and the train stage is keyed by the resolved config only.
    """

    model_config = ConfigDict(extra="forbid")

    model: Literal["mlp", "cnn"] = Field("mlp", description="the network: " + "; ".join(f"{k}: {v}" for k, v in MODEL_HELP.items()))
    epochs: int | None = Field(None, ge=1, description="training epochs")
    batch_size: int | None = Field(None, ge=1, description="training batch size")
    learning_rate: float | None = Field(None, gt=0, description="Adam learning rate")
    hidden_units: int | None = Field(None, ge=1, description="mlp: units of the hidden dense layer")
    filters: int | None = Field(None, ge=1, description="cnn: filters of the first convolution (the second has twice as many)")
    dense_units: int | None = Field(None, ge=1, description="cnn: units of the dense head")
    dropout: float | None = Field(None, ge=0, lt=1, description="cnn: dropout rate before the output layer")
    # NumPy's seed range; keras.utils.set_random_seed seeds Python, NumPy and TensorFlow from it.
    seed: int = Field(42, ge=0, lt=2**32, description="random seed (same seed and data: same model)")
    validation_split: float = Field(0.0, ge=0, lt=1,
                                    description="fraction of the training rows held out for validation (the last rows)")
    patience: int | None = Field(None, ge=1, description="stop when the validation loss has not improved for N epochs "
                                 "and keep the best weights (needs --validation-split)")
    # Speed only: both are repeatable; they differ in the last bits of the weights (BENCHMARKS.md has the timings).
    jit_compile: bool | None = Field(None, description="XLA-compile the training step")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        foreign = [name for name in KNOBS if getattr(self, name) is not None and name not in MODEL_DEFAULTS[self.model]]
        if foreign:
            owners = [kind for kind, defaults in MODEL_DEFAULTS.items() if foreign[0] in defaults]
            raise ValueError(f"{foreign[0]}: a knob of model {' and '.join(owners)}, not of model {self.model}")
        if self.patience is not None and self.validation_split == 0:
            raise ValueError("patience: early stopping watches the validation loss; it needs validation_split > 0")
        return self

    def resolved(self) -> TrainConfig:
        """Return this config with the model's defaults filled in (what the train stage runs and is keyed by)."""
        defaults = MODEL_DEFAULTS[self.model]
        return self.model_copy(update={name: defaults[name] if getattr(self, name) is None else getattr(self, name) for name in defaults})

    def knobs(self) -> dict[str, Any]:
        """Return the size knobs of the resolved model, by name."""
        resolved = self.resolved()
        return {name: getattr(resolved, name) for name in MODEL_DEFAULTS[self.model] if name not in COMMON}


def build_model(kind: str, num_classes: int, **knobs: Any) -> Any:
    """Return the uncompiled Keras model `kind` ('mlp' or 'cnn') with its size knobs, for `num_classes` classes."""
    _, keras = import_tensorflow()
    from keras import layers

    if kind == "mlp":
        body = [layers.Dense(knobs["hidden_units"], activation="relu")]
    elif kind == "cnn":
        filters = knobs["filters"]
        body = [
            layers.Reshape((*IMAGE_SHAPE, 1)),
            layers.Conv2D(filters, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(2 * filters, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(knobs["dense_units"], activation="relu"),
            layers.Dropout(knobs["dropout"]),
        ]
    else:
        raise ValueError(f"model: expected one of {', '.join(MODEL_DEFAULTS)}, found {kind!r}")
    return keras.Sequential([keras.Input((PIXELS,)), *body, layers.Dense(num_classes, activation="softmax")], name=kind)


def describe_model(model: Any) -> dict[str, Any]:
    """Return a built model's layers (name, type, output shape, parameters) and its parameter counts, from Keras."""
    layers = [{"name": layer.name, "type": type(layer).__name__,
               "output_shape": [None if d is None else int(d) for d in layer.output.shape],
               "parameters": int(layer.count_params())} for layer in model.layers]
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {"layers": layers, "parameters": int(model.count_params()), "trainable_parameters": trainable}


def save_model(model: Any, path: Path) -> None:
    """Save a model as Keras does, without what differs from one save of it to the next (the save date, the
    archive's file times, the process's object ids that link shared objects, numbered in order instead): the same
    weights give the same bytes, so two runs that train the same model publish identical files under its digest."""
    model.save(path)
    with zipfile.ZipFile(path) as saved:
        entries = [(info, saved.read(info)) for info in saved.infolist()]
    with zipfile.ZipFile(path, "w") as fixed:
        for info, data in entries:
            if info.filename == "metadata.json":
                data = json.dumps({**json.loads(data), "date_saved": None}).encode()
            elif info.filename == "config.json":
                data = json.dumps(_numbered(json.loads(data), {})).encode()
            info.date_time = (1980, 1, 1, 0, 0, 0)
            fixed.writestr(info, data)


def _numbered(value: Any, ids: dict[int, int]) -> Any:
    """Return a saved model's config with each `shared_object_id` replaced by its number in order of appearance."""
    if isinstance(value, dict):
        return {key: ids.setdefault(item, len(ids)) if key == "shared_object_id" else _numbered(item, ids)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_numbered(item, ids) for item in value]
    return value


def load_model(path: Path) -> Any:
    """Load a saved `model.keras` for scoring (safe mode: no code from the file is run)."""
    tf, keras = import_tensorflow()
    try:
        # The same code path whatever ran before in this process (see tasks.keras_runtime.deterministic_after), so
        # scores are byte-identical across reruns and the stages after evaluate stay cached.
        with deterministic_after(tf):
            return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises several kinds for a file that is not a model
        raise PipelineError(f"{path}: model: expected a Keras model file (.keras), could not load it ({exc})") from None


def class_probabilities(net: Any, pixels: np.ndarray) -> np.ndarray:
    """Return the class probabilities of images (n, 784) in [0, 1]: what evaluate and predict both score with."""
    return np.concatenate([np.asarray(net.predict_on_batch(pixels[start : start + SCORE_BATCH]))
                           for start in range(0, len(pixels), SCORE_BATCH)])
