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

from tasks.core import ArtifactRef, publish, sha256_bytes, sha256_json, workdir, write_json
from tasks.keras_runtime import deterministic_after, import_tensorflow
from tasks.preprocess import PIXELS, load_split

MODULES = ("tasks.core", "tasks.preprocess", "tasks.keras_runtime", "tasks.train")
NUM_CLASSES = 10
MODEL = "model.keras"
HISTORY = "history.json"
CONFIG = "config.json"
PROGRESS_KEY = "mnist-training-progress"

Log = Callable[[str], None]
Progress = Callable[[int, int, dict[str, float]], None]


class TrainConfig(BaseModel):
    """Hyperparameters of the reference model and the knobs that only change how fast it trains."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(0.001, gt=0)
    hidden_units: int = Field(512, ge=1)
    # NumPy's seed range; keras.utils.set_random_seed seeds Python, NumPy and TensorFlow from it.
    seed: int = Field(42, ge=0, lt=2**32)
    validation_split: float = Field(0.0, ge=0, lt=1, description="Fraction of the train split held out (the last rows).")
    # Speed only. On 2 CPU cores (full MNIST) XLA with 16 steps per execution takes an epoch from about 2.5 s to 1.3 s;
    # the first epoch also compiles (about 2 s more). 8 steps gave about 1.5 s, 32 and 64 were within noise of 16.
    # With XLA on, the weights are the same for any steps_per_execution; XLA off differs in the last bits only.
    jit_compile: bool = True
    steps_per_execution: int = Field(16, ge=1)


def _quiet(_: str) -> None:
    pass


def _no_progress(_done: int, _total: int, _logs: dict[str, float]) -> None:
    pass


def fit_model(
    processed: ArtifactRef,
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    log: Log = _quiet,
    progress: Progress = _no_progress,
) -> ArtifactRef:
    """Fit the reference model on `train.parquet` of `processed` and publish the model, history and config under `out_dir`.

    `log` gets one line per epoch; `progress(epochs_done, epochs, logs)` is called after each epoch.
    The artifact's digest covers the weights, the architecture, the per-epoch metrics and the config but not the
    timings or the save date inside `model.keras`, so a repeatable rerun keeps downstream stages cached.
    """
    tf, keras = import_tensorflow()
    x, y = load_split(processed.path("train.parquet"))

    # A fresh session gives the same layer names on every call in one process; then seed everything.
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.hidden_units)
    with deterministic_after(tf):
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=config.jit_compile,
            steps_per_execution=config.steps_per_execution,
        )

    epoch_seconds: list[float] = []
    started: list[float] = []

    def on_epoch_end(epoch: int, logs: dict[str, Any] | None) -> None:
        seconds = time.perf_counter() - started[-1]
        epoch_seconds.append(seconds)
        values = {name: float(value) for name, value in (logs or {}).items()}
        log(f"epoch {epoch + 1}/{config.epochs}: {_format_metrics(values)}, {seconds:.1f} s")
        progress(epoch + 1, config.epochs, values)

    callback = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: started.append(time.perf_counter()), on_epoch_end=on_epoch_end
    )
    fit_started = time.perf_counter()
    # verbose=0: Keras progress bars write to stdout and bypass the run logger; the callback logs instead.
    fitted = model.fit(
        x,
        y,
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_split=config.validation_split,
        callbacks=[callback],
        verbose=0,
    )
    fit_seconds = time.perf_counter() - fit_started

    metrics = {name: [float(v) for v in values] for name, values in sorted(fitted.history.items())}
    history = {"schema_version": 1, "epochs": config.epochs, **metrics, "epoch_seconds": epoch_seconds, "fit_seconds": fit_seconds}
    resolved = {
        "schema_version": 1,
        **config.model_dump(mode="json"),
        # What compile() was given besides the config, so config.json alone describes the run.
        "optimizer": "adam",
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "processed_digest": processed.digest,
        "train_rows": int(len(x)),
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
        model.save(work / MODEL)
        write_json(work / HISTORY, history)
        write_json(work / CONFIG, resolved)
        return publish("train", work, digest=digest, meta=meta)


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
        ref.path(MODEL),
    )
    return ref
