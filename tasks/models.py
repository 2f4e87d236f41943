"""The networks the train stage can fit, with each one's defaults, and a description of a built model from Keras.

Every model takes the flat rows of preprocessing (784 floats in [0, 1]) and ends in a softmax over the classes, so
evaluation, prediction and the report work the same for all of them.
"""

from __future__ import annotations

from typing import Any

from tasks.idx import IMAGE_SHAPE
from tasks.keras_runtime import import_tensorflow
from tasks.preprocess import PIXELS

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
    layers = [
        {
            "name": layer.name,
            "type": type(layer).__name__,
            "output_shape": [None if d is None else int(d) for d in layer.output.shape],
            "parameters": int(layer.count_params()),
        }
        for layer in model.layers
    ]
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {"layers": layers, "parameters": int(model.count_params()), "trainable_parameters": trainable}
