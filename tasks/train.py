"""Train stage: fit the reference two-layer dense network on the train split and save it with its history.

TensorFlow is imported inside the functions that need it: a run whose stages are all cached never pays its
import time (several seconds) nor its log noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, ConfigDict, Field

from tasks.core import ArtifactRef, Log, publish, quiet, sha256_bytes, sha256_json, workdir, write_json
from tasks.idx import NUM_CLASSES
from tasks.keras_runtime import deterministic_after, import_tensorflow
from tasks.preprocess import PIXELS, SPLIT_FILES, load_split

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"
# The loss the model is trained with; evaluate scores with the same function.
LOSS = "sparse_categorical_crossentropy"
PROGRESS_KEY = "mnist-training-progress"

Progress = Callable[[int, int, dict[str, float]], None]


class TrainConfig(BaseModel):
    """Hyperparameters of the reference model and the knobs that only change how fast it trains."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, description="training batch size")
    learning_rate: float = Field(0.001, gt=0, description="Adam learning rate")
    hidden_units: int = Field(512, ge=1, description="units of the hidden dense layer")
    # NumPy's seed range; keras.utils.set_random_seed seeds Python, NumPy and TensorFlow from it.
    seed: int = Field(42, ge=0, lt=2**32, description="random seed (same seed and data: same model)")
    validation_split: float = Field(
        0.0, ge=0, lt=1, description="fraction of the training rows held out for validation (the last rows)"
    )
    # Speed only: both are repeatable; they differ in the last bits of the weights (BENCHMARKS.md has the timings).
    jit_compile: bool = Field(True, description="XLA-compile the epoch loop (faster on CPU)")


def _no_progress(_done: int, _total: int, _logs: dict[str, float]) -> None:
    pass


def fit_model(
    processed: ArtifactRef,
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    log: Log = quiet,
    progress: Progress = _no_progress,
) -> ArtifactRef:
    """Fit the reference model on `train.parquet` of `processed` and publish the model, history and config under `out_dir`.

    `log` gets one line per epoch; `progress(epochs_done, epochs, logs)` is called after each epoch.
    The artifact's digest covers the weights, the architecture, the per-epoch metrics and the config but not the
    timings or the save date inside `model.keras`, so a repeatable rerun keeps downstream stages cached.
    """
    tf, keras = import_tensorflow()
    x, y = load_split(processed.path(SPLIT_FILES["train"]))
    train_rows = len(x)
    # Keras's validation_split: the last rows, before any shuffling.
    split = int(np.ceil(train_rows * (1.0 - config.validation_split)))

    # A fresh session gives the same layer names on every call in one process; then seed everything.
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.hidden_units)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    with deterministic_after(tf):
        # Compiled for the saved model's training config only: the epochs run in `_epoch_runner` below.
        model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    optimizer.build(model.trainable_variables)
    shuffle = np.random.default_rng(config.seed)

    fit_started = time.perf_counter()
    x_train, y_train = _as_tensor(tf, x[:split]), tf.constant(y[:split].astype(np.int32))
    validation = (_as_tensor(tf, x[split:]), tf.constant(y[split:].astype(np.int32))) if split < train_rows else None
    del x  # the tensors hold the only copy of the pixels from here on
    run_epoch = _epoch_runner(tf, model, optimizer, x_train, y_train, config.batch_size, config.jit_compile)
    score = _scorer(tf, model, config.jit_compile)
    metrics: dict[str, list[float]] = {"loss": [], "accuracy": []}
    epoch_seconds: list[float] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        # Shuffled every epoch, as Keras's fit does; the order comes from the seed.
        loss, accuracy = run_epoch(tf.constant(shuffle.permutation(split).astype(np.int32)))
        values = {"loss": float(loss), "accuracy": float(accuracy)}
        if validation is not None:
            val_loss, val_accuracy = score(*validation)
            values.update(val_loss=float(val_loss), val_accuracy=float(val_accuracy))
        seconds = time.perf_counter() - started
        epoch_seconds.append(seconds)
        for name, value in values.items():
            metrics.setdefault(name, []).append(value)
        log(f"epoch {epoch + 1}/{config.epochs}: {_format_metrics(values)}, {seconds:.1f} s")
        progress(epoch + 1, config.epochs, values)
    fit_seconds = time.perf_counter() - fit_started

    metrics = dict(sorted(metrics.items()))
    history = {"schema_version": 1, "epochs": config.epochs, **metrics, "epoch_seconds": epoch_seconds, "fit_seconds": fit_seconds}
    resolved = {
        "schema_version": 1,
        **config.model_dump(mode="json"),
        # What compile() was given besides the config, so config.json alone describes the run.
        "optimizer": "adam",
        "loss": LOSS,
        "metrics": ["accuracy"],
        "processed_digest": processed.digest,
        "train_rows": train_rows,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
    digest = sha256_json(
        {"weights": weights_digest(model), "architecture": model.get_config(), "metrics": metrics, "config": resolved}
    )
    meta = {"train_loss": metrics["loss"][-1], "train_accuracy": metrics["accuracy"][-1]}
    meta.update({name: values[-1] for name, values in metrics.items() if name.startswith("val_")})
    meta.update(epochs=config.epochs, fit_seconds=round(fit_seconds, 3))

    with workdir(out_dir) as work:
        model.save(work / MODEL_FILE)
        write_json(work / HISTORY_FILE, history)
        write_json(work / CONFIG_FILE, resolved)
        return publish("train", work, digest=digest, meta=meta)


def _as_tensor(tf: Any, array: np.ndarray) -> Any:
    """Return a float32 tensor of `array` in row order, built from one copy (188 MB for the MNIST train split).

    `tf.constant` would make two: the pixels come column-major from parquet, TensorFlow copies them row-major and
    then once more into its own buffer. Here numpy writes them row-major into a buffer aligned as TensorFlow needs
    (64 bytes) and the tensor shares it through DLPack.
    """
    align = 64
    size = array.size * np.dtype(np.float32).itemsize
    raw = np.empty(size + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    rows = raw[start : start + size].view(np.float32).reshape(array.shape)
    rows[...] = array
    return tf.experimental.dlpack.from_dlpack(rows.__dlpack__())


def _epoch_runner(tf: Any, model: Any, optimizer: Any, x: Any, y: Any, batch_size: int, jit_compile: bool) -> Callable[[Any], Any]:
    """Return `run_epoch(order) -> (mean loss, accuracy)`: one pass over `x`, `y` in batches taken in `order`.

    The whole epoch is one compiled TensorFlow function (a while loop over the batches, XLA-compiled when
    `jit_compile`): no per-batch Python, data pipeline or callback work. Each step is Keras's: the model's forward
    pass, sparse categorical cross-entropy averaged over the batch, gradients, one Adam update. The last, short
    batch is padded to the batch size and its padding weighted 0, so its loss is the mean over its real rows (as
    in Keras) while every step keeps one shape and XLA compiles once.
    """
    import keras

    rows = int(x.shape[0])
    steps = -(-rows // batch_size)
    padding = steps * batch_size - rows
    variables = model.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def run_epoch(order: Any) -> Any:
        order = tf.concat([order, tf.zeros([padding], tf.int32)], axis=0)

        def step(i: Any, loss_sum: Any, hits: Any) -> Any:
            batch = tf.slice(order, [i * batch_size], [batch_size])
            xb, yb = tf.gather(x, batch), tf.gather(y, batch)
            real = tf.cast(tf.range(batch_size) < rows - i * batch_size, tf.float32)
            with tf.GradientTape() as tape:
                probabilities = model(xb, training=True)
                losses = keras.losses.get(LOSS)(yb, probabilities) * real
                loss = tf.reduce_sum(losses) / tf.reduce_sum(real)
            optimizer.apply(tape.gradient(loss, variables), variables)
            correct = tf.cast(tf.equal(tf.argmax(probabilities, axis=1, output_type=tf.int32), yb), tf.float32) * real
            return i + 1, loss_sum + tf.reduce_sum(losses), hits + tf.reduce_sum(correct)

        _, loss_sum, hits = tf.while_loop(lambda i, *_: i < steps, step, [tf.constant(0), tf.constant(0.0), tf.constant(0.0)])
        return loss_sum / rows, hits / rows

    return run_epoch


def _scorer(tf: Any, model: Any, jit_compile: bool) -> Callable[[Any, Any], Any]:
    """Return `score(x, y) -> (mean loss, accuracy)` of the model in inference mode, for the validation rows."""
    import keras

    @tf.function(jit_compile=jit_compile)
    def score(x: Any, y: Any) -> Any:
        probabilities = model(x, training=False)
        loss = tf.reduce_mean(keras.losses.get(LOSS)(y, probabilities))
        correct = tf.cast(tf.equal(tf.argmax(probabilities, axis=1, output_type=tf.int32), y), tf.float32)
        return loss, tf.reduce_mean(correct)

    return score


def build_model(hidden_units: int = 512) -> Any:
    """Return the reference network: 784 inputs, one ReLU layer, a 10-way softmax."""
    _, keras = import_tensorflow()
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((PIXELS,)),
            layers.Dense(hidden_units, activation="relu"),
            layers.Dense(NUM_CLASSES, activation="softmax"),
        ]
    )


def weights_digest(model: Any) -> str:
    """Return the SHA-256 of a model's weights (shapes, dtypes and bytes, in layer order)."""
    parts = [f"{w.dtype}{w.shape}:{sha256_bytes(np.ascontiguousarray(w).tobytes())}" for w in model.get_weights()]
    return sha256_json(parts)


def _format_metrics(values: dict[str, float]) -> str:
    # Train metrics first, validation metrics after, in a stable order.
    names = sorted(values, key=lambda name: (name.startswith("val_"), name.removeprefix("val_") != "loss", name))
    return ", ".join(f"{name} {values[name]:.4f}" for name in names)


@task(name="train_model")
def train_model(processed: ArtifactRef, config: TrainConfig, artifacts_dir: Path) -> ArtifactRef:
    """Train the model and write it with its history under `artifacts_dir/models`, reporting progress per epoch."""
    logger = get_run_logger()
    artifact_id = create_progress_artifact(progress=0.0, key=PROGRESS_KEY, description=f"Training: 0/{config.epochs} epochs")

    def report(done: int, total: int, logs: dict[str, float]) -> None:
        try:
            update_progress_artifact(
                artifact_id, progress=100.0 * done / total, description=f"Training: {done}/{total} epochs, {_format_metrics(logs)}"
            )
        except Exception as exc:  # a lost progress update must not abort a long training run
            logger.warning("could not update the progress artifact: %s", exc)

    ref = fit_model(processed, Path(artifacts_dir) / "models", config, log=logger.info, progress=report)
    logger.info(
        "trained in %.1f s: loss %.4f, accuracy %.4f; model %s",
        ref.meta["fit_seconds"],
        ref.meta["train_loss"],
        ref.meta["train_accuracy"],
        ref.path(MODEL_FILE),
    )
    return ref
