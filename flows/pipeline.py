"""The mnist-pipeline flow: chain the six stages, each cached by the content of its inputs."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State
from prefect.tasks import Task

from flows.config import STAGES, PipelineConfig, Stage
from flows.stages import STEPS
from tasks import keras_runtime, promote, report, storage
from tasks.caching import cached, record_components, stage_key, trusted_result
from tasks.core import ArtifactRef, PipelineError


# The task of each stage, imported.
TASKS: dict[Stage, Task] = {name: getattr(importlib.import_module(step.module), step.name) for name, step in STEPS.items()}
assert all(TASKS[s].name == step.name and TASKS[s].fn.__module__ == step.module for s, step in STEPS.items())


@flow(name="mnist-pipeline")
def mnist_pipeline(
    config: PipelineConfig | None = None,
    until: Stage = "report",
    rerun: list[Stage] | None = None,
    only: Stage | None = None,
) -> dict[str, Any]:
    """Run the stages up to `until` (or just `only`), reusing every cached stage except those named in `rerun`."""
    config = config or PipelineConfig()
    config.check_services(log=get_run_logger().warning)
    last = only or until
    stages = STAGES[: STAGES.index(last) + 1]
    summary: dict[str, Any] = {"run_id": str(flow_run.get_id()), "stages": {}}
    results: dict[str, Any] = {}
    for name in stages:
        step = STEPS[name]
        inputs = step.inputs(config, results)
        if only and name != only:
            results[name] = _existing_artifact(name, TASKS[name], inputs, config.cache_dir, only)
        else:
            refresh = name in (rerun or ()) or name == only
            results[name], computed = run_stage(TASKS[name], inputs, config, refresh)
            summary["stages"][name] = {
                "state": "completed" if computed else "cached",
                "artifacts": [f.path for f in results[name].files.values()],
            }
            if computed and "train" in stages[stages.index(name) + 1 :]:
                _warm_up_tensorflow()
            if name == "report" and not computed:
                _republish_report(results)
        if name == "evaluate":
            results["promotion"] = _decide_promotion(config, results, summary)
    if "report" in results:
        summary["report"] = str(results["report"].path(report.REPORT_HTML))
    return summary


def run_stage(stage_task: Task, inputs: dict[str, Any], config: PipelineConfig, refresh: bool = False) -> tuple[ArtifactRef, bool]:
    """Run a stage through its cache; return its artifact and whether it was computed (not found in the cache)."""
    state = cached(stage_task, config.cache_dir, refresh, config.lock_manager())(**inputs, return_state=True)
    if state.is_failed():
        discard_failure_record(state, config.cache_dir)
    result = state.result()  # re-raises the stage's error
    record_components(stage_task, inputs, config.cache_dir)
    return result, state.name != "Cached"


def _existing_artifact(name: str, stage_task: Task, inputs: dict[str, Any], cache_dir: Path, only: str) -> ArtifactRef:
    """Return the cached artifact of a stage before `--only`'s, which is used as it is, not run."""
    ref = trusted_result(cache_dir, stage_key(stage_task, inputs))
    if ref is None:
        raise PipelineError(
            f"--only {only}: stage {name}: expected artifacts of an earlier run with this configuration, "
            f"found none; run `mnist-pipeline run --until {name}` first"
        )
    return ref


def _warm_up_tensorflow() -> None:
    """Start importing TensorFlow in the background: a stage before training was computed, so training likely
    follows (unless that stage's output is unchanged), and the import overlaps the data stages."""
    keras_runtime.warm_up()


def _decide_promotion(config: PipelineConfig, results: dict[str, Any], summary: dict[str, Any]) -> promote.Decision:
    """Decide (or look up) whether the evaluated model becomes the champion; record the headline in the summary.

    Not a stage: the decision depends on the registry's current champion, so it is made (or looked up) every run.
    """
    evaluation = results["evaluate"]
    summary["metrics"] = {key: evaluation.meta[key] for key in ("test_accuracy", "test_loss", "first_20_predictions")}
    decision = promote.decide_promotion(results["train"], evaluation, config.registry_dir, config.promotion,
                                        run_id=summary["run_id"], log=get_run_logger().info,
                                        class_names=config.dataset.class_names, locks=config.lock_manager())
    summary["promotion"] = {"promoted": decision.promoted, "reason": decision.reason}
    return decision


def _republish_report(results: dict[str, Any]) -> None:
    """Publish the UI artifacts of a cached report again: a cached stage publishes nothing, and the run's page in the
    UI should still show its report."""
    report.publish_ui_artifacts(results["report"], results["evaluate"], results["promotion"])


def discard_failure_record(state: State, cache_dir: Path) -> None:
    """Delete the exception record Prefect persists for a failed task, so a failed stage leaves no file behind."""
    key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    path = f"{cache_dir}/{key}" if key and "/" not in key else key  # a bare key: one in the cache's storage block
    if path and path.rpartition("/")[0] == str(cache_dir):
        storage.remove(path)
