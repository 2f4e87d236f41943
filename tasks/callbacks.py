"""Keras callbacks of the train stage: the per-epoch log line and progress, and a crash-safe backup to resume from.

Imported by the train stage when it trains (it imports Keras), never when a run is all cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from tasks.files import atomic_write, fsync_path
from tasks.layout import TRAIN_STATE_FILE

Progress = Callable[[int, int, dict[str, float]], None]


def format_metrics(values: dict[str, float]) -> str:
    """Return `loss 0.1234, accuracy 0.9876, val_loss ...`: train metrics first, then validation, in a stable order."""
    names = sorted(values, key=lambda name: (name.startswith("val_"), name.removeprefix("val_") != "loss", name))
    return ", ".join(f"{name} {values[name]:.4f}" for name in names)


class EpochRecorder(keras.callbacks.Callback):
    """Record each epoch's metrics and duration, log one line per epoch and report progress.

    Unlike Keras's History, it can start from the epochs of an interrupted run (`restore`), so the history of a
    resumed training covers all its epochs.
    """

    def __init__(self, epochs: int, log: Callable[[str], None], progress: Progress) -> None:
        super().__init__()
        self.epochs, self.log, self.progress = epochs, log, progress
        self.metrics: dict[str, list[float]] = {}
        self.epoch_seconds: list[float] = []
        self._started = 0.0

    def restore(self, metrics: dict[str, list[float]], epoch_seconds: list[float]) -> None:
        """Continue from the recorded epochs of an earlier, interrupted training."""
        self.metrics = {name: list(values) for name, values in metrics.items()}
        self.epoch_seconds = list(epoch_seconds)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        values = {name: float(value) for name, value in sorted((logs or {}).items())}
        seconds = time.perf_counter() - self._started
        self.epoch_seconds.append(seconds)
        for name, value in values.items():
            self.metrics.setdefault(name, []).append(value)
        self.log(f"epoch {epoch + 1}/{self.epochs}: {format_metrics(values)}, {seconds:.1f} s")
        self.progress(epoch + 1, self.epochs, values)


class EpochBackup(keras.callbacks.Callback):
    """Back up the training state (weights, optimizer, epoch, recorded history) in `folder` after every epoch.

    What Keras's BackupAndRestore does, made crash-safe: each epoch's weights go to a new file and a small state file
    naming it is replaced atomically afterwards, so a process killed at any instant leaves the last complete epoch
    to resume from (BackupAndRestore overwrites its weights in place and writes the epoch number after them).
    """

    def __init__(self, folder: Path, recorder: EpochRecorder, after: Callable[[Path], None] | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.recorder = recorder
        self.after = after  # called with the folder after each backup

    def restore(self, model: Any) -> int:
        """Load the last backed-up epoch into `model` (compiled) and the recorder; return the epochs done (0: none)."""
        try:
            state = json.loads((self.folder / TRAIN_STATE_FILE).read_text())
        except FileNotFoundError:
            return 0
        model.optimizer.build(model.trainable_variables)
        model.load_weights(self.folder / state["weights"])
        self.recorder.restore(state["metrics"], state["epoch_seconds"])
        return int(state["epoch"])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = f"epoch-{epoch + 1:04d}.weights.h5"
        self.model.save_weights(self.folder / weights, overwrite=True)
        fsync_path(self.folder / weights)  # on disk before the state file names it
        state = {"epoch": epoch + 1, "weights": weights, "metrics": self.recorder.metrics,
                 "epoch_seconds": self.recorder.epoch_seconds}
        atomic_write(self.folder / TRAIN_STATE_FILE, json.dumps(state))
        for old in self.folder.glob("epoch-*.weights.h5"):
            if old.name != weights:
                old.unlink()
        if self.after is not None:
            self.after(self.folder)
