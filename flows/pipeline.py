"""The mnist-pipeline flow: chain the six stages, each cached by the content of its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State
from prefect.tasks import Task

from flows.config import STAGES, PipelineConfig, Stage
from tasks import download, evaluate, keras_runtime, preprocess, promote, report, train, validate
from tasks.caching import cached, lookup
from tasks.core import ArtifactRef, PipelineError


def _discard_failure_record(state: State, cache_dir: Path) -> None:
    """Delete the exception record Prefect persists for a failed task, so a failed stage leaves no file behind."""
    key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if key and Path(key).parent == cache_dir:
        Path(key).unlink(missing_ok=True)


class _Stages:
    """Run or look up stages in order, recording what happened to each for the run summary."""

    def __init__(self, config: PipelineConfig, rerun: set[str], only: str | None, last: int):
        self.config, self.rerun, self.only, self.last = config, rerun, only, last
        self.summary: dict[str, Any] = {"run_id": str(flow_run.get_id()), "stages": {}}

    def __call__(self, stage: str, stage_task: Task, modules: tuple[str, ...], **inputs: Any) -> ArtifactRef:
        cache_dir = self.config.cache_dir
        if self.only and stage != self.only:
            # --only: the stages before it are not run, their current artifacts are used as they are.
            ref = lookup(stage_task.name, cache_dir, modules, inputs)
            if ref is None:
                raise PipelineError(
                    f"--only {self.only}: stage {stage}: expected artifacts of an earlier run with this configuration, "
                    f"found none; run `mnist-pipeline run --until {stage}` first"
                )
            return ref
        refresh = stage in self.rerun or stage == self.only
        state = cached(stage_task, cache_dir, modules, refresh=refresh)(**inputs, return_state=True)
        if state.is_failed():
            _discard_failure_record(state, cache_dir)
        ref = state.result()  # re-raises the stage's error
        if state.name != "Cached" and STAGES.index(stage) < STAGES.index("train") <= self.last:
            # A stage before training was computed, so training will most likely follow (unless that stage's output is
            # unchanged): load TensorFlow in the background while the data stages run.
            keras_runtime.warm_up()
        self.summary["stages"][stage] = {
            "state": "cached" if state.name == "Cached" else "completed",
            "artifacts": [f.path for f in ref.files.values()],
        }
        return ref


@flow(name="mnist-pipeline")
def mnist_pipeline(
    config: PipelineConfig | None = None,
    until: Stage = "report",
    rerun: list[Stage] | None = None,
    only: Stage | None = None,
) -> dict[str, Any]:
    """Run the stages up to `until` (or just `only`), reusing every cached stage except those named in `rerun`."""
    config = config or PipelineConfig()
    last = STAGES.index(only or until)
    run = _Stages(config, set(rerun or ()), only, last)
    summary = run.summary
    data_dir, artifacts_dir = config.data_dir, config.artifacts_dir

    fingerprint = download.source_fingerprint(config.download.source)
    raw = run("download", download.download_mnist, download.MODULES, config=config.download, data_dir=data_dir, fingerprint=fingerprint)
    if last < 1:
        return summary
    checked = run("validate", validate.validate_mnist, validate.MODULES, raw=raw, config=config.validation, artifacts_dir=artifacts_dir)
    if last < 2:
        return summary
    processed = run("preprocess", preprocess.preprocess_mnist, preprocess.MODULES, raw=raw, validation=checked, data_dir=data_dir)
    if last < 3:
        return summary
    model = run("train", train.train_model, train.MODULES, processed=processed, config=config.train, artifacts_dir=artifacts_dir)
    if last < 4:
        return summary
    evaluation = run("evaluate", evaluate.evaluate_model, evaluate.MODULES, model=model, processed=processed, artifacts_dir=artifacts_dir)
    summary["metrics"] = {key: evaluation.meta[key] for key in ("test_accuracy", "test_loss", "first_20_predictions")}
    # Not a stage: the decision depends on the registry's current champion, so it is made (or looked up) every run.
    decision = promote.decide_promotion(
        model, evaluation, config.registry_dir, config.promotion, run_id=summary["run_id"], log=get_run_logger().info
    )
    summary["promotion"] = {key: decision[key] for key in ("promoted", "reason")}
    if last < 5:
        return summary
    reported = run(
        "report",
        report.report_results,
        report.MODULES,
        validation=checked,
        processed=processed,
        model=model,
        evaluation=evaluation,
        artifacts_dir=artifacts_dir,
        decision=decision,
    )
    if summary["stages"]["report"]["state"] == "cached":
        # A cached stage publishes nothing; the run's page in the UI should still show the report.
        report.publish_ui_artifacts(reported, evaluation, decision)
    summary["report"] = str(reported.path(report.REPORT_HTML))
    return summary
