"""Train stage: fit a model (the reference dense network or a small CNN) with Keras's fit; save it with its history.

TensorFlow is imported inside the functions that need it: a run whose stages are all cached never pays its
import time (several seconds) nor its log noise.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import data_version
from tasks.errors import Log, quiet
from tasks.files import sha256_bytes, sha256_json, workdir, write_json
from tasks.idx import NUM_CLASSES
from tasks.keras_runtime import deterministic_after, import_tensorflow
from tasks.layout import CONFIG_FILE, HISTORY_FILE, MODEL_FILE, SPLIT_FILES, TRAIN_STATE_DIR
from tasks.models import KNOBS, LOSS, TrainConfig, build_model, describe_model, save_model
from tasks.preprocess import load_parts

# Called after each epoch with (epochs done, epochs, that epoch's metrics).
Progress = Callable[[int, int, dict[str, float]], None]


def fit_model(processed: ArtifactRef, out_dir: Path, config: TrainConfig, num_classes: int = NUM_CLASSES,
              batches: Sequence[ArtifactRef] = (), log: Log = quiet,
              progress: Progress = lambda done, epochs, logs: None, state_dir: Path | None = None,
              on_backup: Callable[[Path], None] | None = None) -> ArtifactRef:
    """Fit the configured model on `train.parquet` of `processed` and of each accepted batch (tasks.batches), in that
    order, and publish the model, history and config (with the data version: the base and the batches) under `out_dir`.

    Training is Keras's `fit` with callbacks: `log` gets one line per epoch, `progress(epochs_done, epochs, logs)` is
    called after each epoch, `config.patience` adds early stopping, and with `state_dir` every epoch is backed up
    there, so a training killed mid-way resumes from its last finished epoch (the folder is removed once the model is
    published; `on_backup(state_dir)` is called after each epoch's backup). The artifact's digest covers the weights, the architecture, the per-epoch metrics and the config but
    nothing else: the timings and whether it resumed are in the reference's meta, and `model.keras` is saved without
    its save date (tasks.models.save_model), so the same model is the same bytes and a repeatable rerun keeps
    downstream stages cached.
    """
    from tasks.callbacks import EpochBackup, EpochRecorder

    tf, keras = import_tensorflow()
    config = config.resolved()
    x, y = load_parts([ref.path(SPLIT_FILES["train"]) for ref in (processed, *batches)])
    train_rows = len(x)
    # Keras's validation_split: the last rows, before any shuffling.
    split = int(np.ceil(train_rows * (1.0 - config.validation_split)))
    if config.patience is not None and split == train_rows:
        raise ValueError(f"patience: needs validation rows; validation_split {config.validation_split} of {train_rows} rows leaves none")
    steps = -(-split // config.batch_size)

    # A fresh session gives the same layer names on every call in one process; then seed everything.
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.model, num_classes, **config.knobs())
    with deterministic_after(tf):
        # One compiled call per epoch: no per-batch Python work between the XLA-compiled steps (BENCHMARKS.md).
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss=LOSS,
                      metrics=["accuracy"], jit_compile=config.jit_compile, steps_per_execution=steps)

    recorder = EpochRecorder(config.epochs, log, progress)
    callbacks: list[Any] = [recorder]
    stopper = None
    if config.patience is not None:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
        callbacks.append(stopper)
    done = 0
    if state_dir is not None:
        backup = EpochBackup(state_dir, recorder, on_backup)
        done = backup.restore(model)
        if done:
            log(f"resuming from epoch {done}/{config.epochs} of an interrupted training (state in {state_dir})")
        callbacks.append(backup)

    x_train, y_train = _as_tensor(tf, x[:split]), tf.constant(y[:split].astype(np.int32))
    validation = (_as_tensor(tf, x[split:]), tf.constant(y[split:].astype(np.int32))) if split < train_rows else None
    del x  # the tensors hold the only copy of the pixels from here on
    fit_started = time.perf_counter()
    model.fit(x_train, y_train, batch_size=config.batch_size, epochs=config.epochs, initial_epoch=done, shuffle=True,
              validation_data=validation, callbacks=callbacks, verbose=0)
    fit_seconds = time.perf_counter() - fit_started

    metrics = dict(sorted(recorder.metrics.items()))
    epochs_run = len(recorder.epoch_seconds)
    # EarlyStopping keeps the weights of the best epoch (0-based); without it, the last epoch's.
    best_epoch = stopper.best_epoch + 1 if stopper is not None and stopper.best_weights is not None else epochs_run
    # The files hold what the digest covers and nothing else, so two runs that train the same model publish the same
    # bytes (on shared object storage they may upload into its folder at once); this run's own facts go in the meta.
    history = {
        "schema_version": 3,
        "epochs": config.epochs,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "stopped_early": epochs_run < config.epochs,
        **metrics,
    }
    resolved = {
        "schema_version": 2,
        **config.model_dump(mode="json", exclude={name for name in KNOBS if getattr(config, name) is None}),
        # What compile() was given besides the config, so config.json alone describes the run.
        "optimizer": "adam",
        "loss": LOSS,
        "metrics": ["accuracy"],
        "num_classes": num_classes,
        "architecture": describe_model(model),
        "processed_digest": processed.digest,
        "train_rows": train_rows,
        **({"data_version": data_version(processed, batches)} if batches else {}),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
    digest = sha256_json({"weights": weights_digest(model), "architecture": model.get_config(),
                          "metrics": metrics, "config": resolved, "best_epoch": best_epoch})
    at_best = {name: values[best_epoch - 1] for name, values in metrics.items()}
    meta = {"model": config.model, "train_loss": at_best["loss"], "train_accuracy": at_best["accuracy"],
            **{name: value for name, value in at_best.items() if name.startswith("val_")},
            "epochs": epochs_run, "best_epoch": best_epoch, "fit_seconds": round(fit_seconds, 3),
            "epoch_seconds": [round(s, 3) for s in recorder.epoch_seconds], "resumed_from_epoch": done or None}

    with workdir(out_dir) as work:
        save_model(model, work / MODEL_FILE)
        write_json(work / HISTORY_FILE, history)
        write_json(work / CONFIG_FILE, resolved)
        ref = publish("train", work, digest=digest, meta=meta)
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    stopped = f", stopped early after {epochs_run} epochs (best: {best_epoch})" if epochs_run < config.epochs else ""
    log(f"trained {config.model} in {fit_seconds:.1f} s{stopped}: loss {meta['train_loss']:.4f}, accuracy "
        f"{meta['train_accuracy']:.4f}")
    return ref


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


def weights_digest(model: Any) -> str:
    """Return the SHA-256 of a model's weights (shapes, dtypes and bytes, in layer order)."""
    parts = [f"{w.dtype}{w.shape}:{sha256_bytes(np.ascontiguousarray(w).tobytes())}" for w in model.get_weights()]
    return sha256_json(parts)


def state_folder(artifacts_dir: Path, processed: ArtifactRef, config: TrainConfig, num_classes: int,
                 batches: Sequence[ArtifactRef] = ()) -> Path:
    """Return where the training of `config` on `processed` (and `batches`) keeps its resume state: one folder per
    training."""
    data = data_version(processed, batches) if batches else processed.digest
    identity = sha256_json({"data": data, "config": config.resolved().model_dump(mode="json"), "classes": num_classes})
    return Path(artifacts_dir) / TRAIN_STATE_DIR / identity[:32]
