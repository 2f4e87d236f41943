"""The mnist-pipeline flow: chain the six stages, each cached by the content of its inputs (flows/runner.py)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import ui
from flows.config import STAGES, PipelineConfig, Stage
from flows.runner import TASKS, recorded, run_stage
from flows.stages import STEPS, batch_inputs, dataset
from tasks import keras_runtime, promote, storage
from tasks.artifacts import ArtifactRef
from tasks.dataset import data_version, landed
from tasks.errors import PipelineError
from tasks.layout import BATCH_FILE, QUARANTINE_DIR, REPORT_HTML, SUCCESS_MARKER


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
            results[name] = _existing_artifact(name, inputs, config, only)
        else:
            refresh = name in (rerun or ()) or name == only
            results[name], computed = run_stage(TASKS[name], inputs, config, refresh)
            summary["stages"][name] = {
                "state": "completed" if computed else "cached",
                "artifacts": [f.path for f in results[name].files.values()],
            }
            if computed and "train" in stages[stages.index(name) + 1 :]:
                # Training likely follows (unless this stage's output is unchanged): import TensorFlow meanwhile.
                keras_runtime.warm_up()
            if name == "report" and not computed:
                # A cached stage publishes nothing; the run's page in the UI should still show its report.
                ui.publish_report(results["report"], results["evaluate"], results["promotion"])
        if name == "preprocess" and config.batches.root:
            results["batches"] = _check_batches(config, results, summary)
        if name == "evaluate":
            results["promotion"] = _decide_promotion(config, results, summary)
    if "report" in results:
        summary["report"] = str(results["report"].path(REPORT_HTML))
    return summary


def _check_batches(config: PipelineConfig, results: dict[str, Any], summary: dict[str, Any]) -> list[ArtifactRef]:
    """Check every landed batch in name order (each a cached stage, keyed by its files); record the quarantined ones
    in artifacts/quarantine/; return the accepted ones."""
    logger = get_run_logger()
    complete, incomplete = landed(str(config.batches.root).rstrip("/"))
    for name in incomplete:
        logger.warning("batch %s has no %s marker (still being copied, or abandoned): skipped", name, SUCCESS_MARKER)
    accepted: list[ArtifactRef] = []
    summary["batches"] = {}
    for name in complete:
        ref, computed = run_stage(TASKS["check_batch"], batch_inputs(config, results, name, accepted), config)
        verdict = ref.meta["verdict"]
        summary["batches"][name] = {"state": "completed" if computed else "cached", "verdict": verdict,
                                    "reasons": ref.meta["reasons"], "images": ref.meta["images"], "digest": ref.digest}
        record = f"{config.artifacts_dir}/{QUARANTINE_DIR}/{name}.json"
        if verdict == "accepted":
            accepted.append(ref)
            storage.remove(record)
        else:
            storage.write_text(record, ref.path(BATCH_FILE).read_text())
    summary["data_version"] = data_version(results["preprocess"], accepted)
    return accepted


def _existing_artifact(name: Stage, inputs: dict[str, Any], config: PipelineConfig, only: str) -> ArtifactRef:
    """Return the cached artifact of a stage before `--only`'s, which is used as it is, not run."""
    ref = recorded(STEPS[name], inputs, config)
    if ref is None:
        raise PipelineError(
            f"--only {only}: stage {name}: expected artifacts of an earlier run with this configuration, "
            f"found none; run `mnist-pipeline run --until {name}` first"
        )
    return ref


def _decide_promotion(config: PipelineConfig, results: dict[str, Any], summary: dict[str, Any]) -> promote.Decision:
    """Decide (or look up) whether the evaluated model becomes the champion; record the headline in the summary.

    Not a stage: the decision depends on the registry's current champion, so it is made (or looked up) every run.
    """
    evaluation = results["evaluate"]
    summary["metrics"] = {key: evaluation.meta[key] for key in ("test_accuracy", "test_loss", "first_20_predictions")}
    decision = promote.decide_promotion(results["train"], evaluation, config.registry_dir, config.promotion,
                                        run_id=summary["run_id"], log=get_run_logger().info,
                                        class_names=dataset(config, results).class_names, locks=config.lock_manager())
    summary["promotion"] = {"promoted": decision.promoted, "reason": decision.reason}
    return decision
