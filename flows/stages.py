"""The stage table: per stage, the task that runs it, the plain function that computes it, where its output goes and
how its inputs are built. Described without importing the stages or Prefect: the runner (flows/runner.py) makes
each step a cached Prefect task; `mnist-pipeline status` computes the same keys without importing either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flows.config import STAGES, PipelineConfig, Stage
from tasks import layout
from tasks.dataset import DatasetConfig, listing_digest, source_fingerprint
from tasks.keys import check_record, key_components, key_of


@dataclass(frozen=True)
class Step:
    """One stage: its task's name (runs in the UI; the first part of its cache keys), its logic as `module:function`
    (a plain function: local input paths and `out_dir` in, an artifact reference out; the module's import closure is
    the code in its key), the root (`data_dir` or `artifacts_dir`) and folder its output is published under, and how
    its inputs are built from the config and the results before it (for a pipeline stage).

    The inputs are the task's parameters and its cache key; all but the root and `key_only` are passed to the
    function, with `out_dir` and `log`. Artifact inputs are staged on this machine's disk first: all their files, or
    those `files` names (none: the function reads only the reference).
    """

    task: str
    function: str
    root: str
    folder: str
    inputs: Callable[[PipelineConfig, dict[str, Any]], dict[str, Any]] | None = None
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    key_only: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]


def dataset(config: PipelineConfig, results: dict[str, Any]) -> DatasetConfig:
    """Return the dataset's settings with the classes that its downloaded source names (see DatasetConfig.of_source)."""
    return config.dataset.of_source(results["download"].meta.get("class_names"))


def batch_inputs(config: PipelineConfig, results: dict[str, Any], name: str, accepted: list[Any]) -> dict[str, Any]:
    """Return the inputs of the check of one landed batch: its files (by their listing), the base, the batches
    accepted before it, the checks' settings and the dataset's classes."""
    location = f"{str(config.batches.root).rstrip('/')}/{name}"
    classes = dataset(config, results)
    return {"batch": location, "name": name, "validation": results["validate"],
            "earlier": list(accepted), "config": config.batches, "class_names": classes.class_names,
            "num_classes": classes.num_classes, "data_dir": config.data_dir, "fingerprint": listing_digest(location)}


STEPS: dict[Stage, Step] = {
    "download": Step("download_mnist", "tasks.download:download_raw", "data_dir", layout.RAW_DIR, lambda c, r: {
        # The fingerprint keys the cache on a local source's files, so a changed folder is downloaded again.
        "config": c.download, "data_dir": c.data_dir, "class_names": c.dataset.class_names,
        "fingerprint": source_fingerprint(c.download.source)}, key_only=("fingerprint",)),
    "validate": Step("validate_mnist", "tasks.validate:validate_files", "artifacts_dir", layout.VALIDATION_DIR,
                     lambda c, r: {"raw": r["download"], "config": c.validation,
                                   "num_classes": dataset(c, r).num_classes, "artifacts_dir": c.artifacts_dir}),
    "preprocess": Step("preprocess_mnist", "tasks.preprocess:preprocess_files", "data_dir", layout.PROCESSED_DIR,
                       lambda c, r: {"raw": r["download"], "validation": r["validate"], "data_dir": c.data_dir},
                       files={"validation": ()}),  # its digest only
    "train": Step("train_model", "tasks.train:fit_model", "artifacts_dir", layout.MODELS_DIR, lambda c, r: {
        # Resolved: the cache key holds the chosen model's settings only, defaults filled in.
        "processed": r["preprocess"], "config": c.train.resolved(), "num_classes": dataset(c, r).num_classes,
        "batches": r["batches"] if c.batches.root else [], "artifacts_dir": c.artifacts_dir},
        files={"processed": (layout.SPLIT_FILES["train"],), "batches": (layout.SPLIT_FILES["train"],)}),
    "evaluate": Step("evaluate_model", "tasks.evaluate:score_model", "artifacts_dir", layout.EVALUATION_DIR,
                     lambda c, r: {"model": r["train"], "processed": r["preprocess"],
                                   "batches": r["batches"] if c.batches.root else [],
                                   "artifacts_dir": c.artifacts_dir},
                     files={"processed": (layout.SPLIT_FILES["test"],), "batches": (layout.HOLDOUT_FILE,)}),
    "report": Step("report_results", "tasks.report:write_report", "artifacts_dir", layout.REPORTS_DIR, lambda c, r: {
        "validation": r["validate"], "processed": r["preprocess"], "model": r["train"], "evaluation": r["evaluate"],
        "artifacts_dir": c.artifacts_dir, "decision": r["promotion"], "dataset": dataset(c, r),
        "batches": r["batches"] if c.batches.root else []}, files={"processed": (layout.SPLIT_FILES["test"],),
                                                 "model": (layout.HISTORY_FILE, layout.CONFIG_FILE),
                                                 "batches": (layout.HOLDOUT_FILE,)}),
}
assert tuple(STEPS) == STAGES, "every stage has exactly one step, in order"


def configured_dataset(config: PipelineConfig) -> DatasetConfig:
    """Return the configured dataset's settings with the classes its source names, as this configuration's recorded
    download found them (nothing runs); as configured when it was not downloaded yet."""
    step = STEPS["download"]
    ref, _ = check_record(config.cache_dir, key_of(key_components(step.task, step.module, step.inputs(config, {}))))
    return config.dataset.of_source(ref.meta.get("class_names") if ref else None)


# The steps of `mnist-pipeline predict` and the sweep's report (flows/predict.py and flows/sweep.py build their inputs).
OTHER_STEPS: dict[str, Step] = {
    "load_inputs": Step("load_inputs", "tasks.predict:decode_inputs", "artifacts_dir", layout.PREDICT_INPUTS_DIR,
                        key_only=("fingerprint",)),
    "predict_classes": Step("predict_classes", "tasks.predict:score_inputs", "artifacts_dir",
                            layout.PREDICT_SCORES_DIR),
    "write_predictions": Step("write_predictions", "tasks.predict:collect_predictions", "artifacts_dir",
                              layout.PREDICTIONS_DIR, files={"inputs": (layout.COUNTS_FILE,)}),
    "write_sweep_report": Step("write_sweep_report", "tasks.sweep:write_report", "artifacts_dir", layout.SWEEPS_DIR),
    # One per landed batch (flows/pipeline.py builds its inputs); the fingerprint keys it on the batch's files.
    "check_batch": Step("check_batch", "tasks.batches:check_batch", "data_dir", layout.BATCHES_DIR,
                        files={"validation": (layout.VALIDATION_FILE, *layout.DIGEST_FILES.values()),
                               "earlier": (layout.DIGESTS_FILE,)}, key_only=("fingerprint",)),
}
