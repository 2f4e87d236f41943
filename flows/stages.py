"""The stages of the pipeline, described without importing them: the task that computes each one and how its inputs
are built. The flow (flows/pipeline.py) runs the tasks; `mnist-pipeline status` computes their keys without importing
Prefect or the stage modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flows.config import STAGES, PipelineConfig, Stage
from tasks.dataset import source_fingerprint


@dataclass(frozen=True)
class Step:
    """A stage: the task that computes it, as `module:name` (the module's code is in the stage's key; the name is the
    task's), and how its inputs are built from the config and the results before it."""

    task: str
    inputs: Callable[[PipelineConfig, dict[str, Any]], dict[str, Any]]

    @property
    def module(self) -> str:
        return self.task.partition(":")[0]

    @property
    def name(self) -> str:
        return self.task.partition(":")[2]


STEPS: dict[Stage, Step] = {
    "download": Step("tasks.download:download_mnist", lambda c, r: {
        "config": c.download, "data_dir": c.data_dir, "fingerprint": source_fingerprint(c.download.source)}),
    "validate": Step("tasks.validate:validate_mnist", lambda c, r: {
        "raw": r["download"], "config": c.validation, "num_classes": c.dataset.num_classes, "artifacts_dir": c.artifacts_dir}),
    "preprocess": Step("tasks.preprocess:preprocess_mnist", lambda c, r: {
        "raw": r["download"], "validation": r["validate"], "data_dir": c.data_dir}),
    "train": Step("tasks.train:train_model", lambda c, r: {
        # Resolved: the cache key holds the chosen model's settings only, defaults filled in.
        "processed": r["preprocess"], "config": c.train.resolved(), "num_classes": c.dataset.num_classes,
        "artifacts_dir": c.artifacts_dir}),
    "evaluate": Step("tasks.evaluate:evaluate_model", lambda c, r: {
        "model": r["train"], "processed": r["preprocess"], "artifacts_dir": c.artifacts_dir}),
    "report": Step("tasks.report:report_results", lambda c, r: {
        "validation": r["validate"], "processed": r["preprocess"], "model": r["train"], "evaluation": r["evaluate"],
        "artifacts_dir": c.artifacts_dir, "decision": r["promotion"], "dataset": c.dataset}),
}
assert tuple(STEPS) == STAGES, "every stage has exactly one step, in order"
